"""DoRA: the magnitude leaf, its forward and gradient against references, merge, checkpoints, PEFT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import delta_reference, reseal
from test_matmul import LAYOUTS, Wrap, _close, _dots

import jaxlora
from jaxlora import _matmul
from jaxlora._tree import weights


class Embed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(11, 6, name="proj")(ids)


def _setup(name, dtype=jnp.float32, rank=2):
    """A model, its input, params and a DoRA tree with non-zero B and a magnitude moved off its init."""
    if name == "embed":
        model, x = Embed(), jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
    else:
        make, shape = LAYOUTS[name]
        model = make() if name == "scan" else Wrap(make)
        x = jax.random.normal(jax.random.key(0), shape, dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), model.init(jax.random.key(1), x))
    config = jaxlora.LoraConfig(rank=rank, alpha=4, targets="mlp" if name == "scan" else "proj", dora=True)
    lora = jaxlora.init(jax.random.key(2), params, config, fn=model.apply, args=(x,))
    k1, k2 = jax.random.split(jax.random.key(3))
    lora = {
        p: jaxlora.LoraFactors(
            f.a, 0.3 * jax.random.normal(k1, f.b.shape), f.scale, f.roles, f.dropout,
            m=f.m * (1 + 0.2 * jax.random.normal(k2, f.m.shape)),
        )
        for p, f in lora.items()
    }  # fmt: skip
    return model, x, params, lora


def _norm_reference(w, roles):
    """Per-output-feature norm over the input axes, in m's layout (stacked, then output axes), NumPy."""
    w = np.asarray(w, np.float64)
    inputs = tuple(k for k, c in enumerate(roles) if c == "i")
    kept = [k for k, c in enumerate(roles) if c == "s"] + [k for k, c in enumerate(roles) if c == "o"]
    n = np.sqrt((w**2).sum(axis=inputs))
    return np.transpose(n, [sorted(kept).index(k) for k in kept])


def _expand_reference(g, roles):
    kept = [k for k, c in enumerate(roles) if c == "s"] + [k for k, c in enumerate(roles) if c == "o"]
    g = np.transpose(g, np.argsort([sorted(kept).index(k) for k in kept]))
    return g.reshape([g.shape[sorted(kept).index(k)] if c != "i" else 1 for k, c in enumerate(roles)])


def _dora_weight_reference(w, f):
    """``m / ‖W + ΔW‖ · (W + ΔW)`` in float64 NumPy."""
    wd = np.asarray(w, np.float64) + delta_reference(f.a, f.b, f.roles, f.scale)
    g = np.asarray(f.m, np.float64) / _norm_reference(wd, f.roles)
    return wd * _expand_reference(g, f.roles)


def _replace(params, lora, make):
    ws = weights(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for path, f in lora.items():
        leaves[ws[path].index] = make(leaves[ws[path].index], f)
    return jax.tree_util.tree_unflatten(treedef, leaves)


NAMES = [*sorted(LAYOUTS), "embed"]


@pytest.mark.parametrize("name", NAMES)
def test_init_magnitude_is_the_weight_norm(name):
    model, x, params, _ = _setup(name)
    config = jaxlora.LoraConfig(rank=2, targets="mlp" if name == "scan" else "proj", dora=True)
    lora = jaxlora.init(jax.random.key(2), params, config, fn=model.apply, args=(x,))
    (path, f), ws = next(iter(lora.items())), weights(params)
    np.testing.assert_allclose(f.m, _norm_reference(ws[path].leaf, f.roles), rtol=1e-6)
    np.testing.assert_allclose(jaxlora.apply(model.apply, params, lora, x), model.apply(params, x), atol=1e-6)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_numpy(name, merged, monkeypatch, maybe_jit):
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    model, x, params, lora = _setup(name)
    want = model.apply(_replace(params, lora, lambda w, f: _dora_weight_reference(w, f).astype(np.float32)), x)
    got = maybe_jit(lambda lora, x: jaxlora.apply(model.apply, params, lora, x))(lora, x)
    _close(got, want, 2e-5, 2e-5)


def _reference_loss(model):
    """The DoRA math in plain JAX, the norm under stop_gradient, differentiated by plain autodiff."""

    def dora_weight(w, f):
        wd = w.astype(jnp.float32) + f.scale * _einsum_delta(f)
        inputs = tuple(k for k, c in enumerate(f.roles) if c == "i")
        n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(wd**2, axis=inputs, keepdims=True)))
        kept = [k for k, c in enumerate(f.roles) if c == "s"] + [k for k, c in enumerate(f.roles) if c == "o"]
        m = jnp.transpose(f.m, np.argsort([sorted(kept).index(k) for k in kept])).reshape(n.shape)
        return m / n * wd

    return lambda lora, params, x: jnp.sum(jnp.sin(model.apply(_replace(params, lora, dora_weight), x)))


def _einsum_delta(f):
    """``a·b`` in W's layout, by letters (written apart from jaxlora's `delta`)."""
    s = [c for c in "ABCDEFGH"][: len(f.roles)]
    a = "".join(c for c, r in zip(s, f.roles) if r == "s") + "".join(c for c, r in zip(s, f.roles) if r == "i")
    b = "".join(c for c, r in zip(s, f.roles) if r == "s") + "R" + "".join(c for c, r in zip(s, f.roles) if r == "o")
    return jnp.einsum(f"{a}R,{b}->{''.join(s)}", f.a, f.b)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_autodiff_of_reference(name, merged, monkeypatch):
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    model, x, params, lora = _setup(name)
    fast = lambda lora, params, x: jnp.sum(jnp.sin(jaxlora.apply(model.apply, params, lora, x)))  # noqa: E731
    argnums = 0 if name == "embed" else (0, 2)
    got = jax.jit(jax.grad(fast, argnums=argnums))(lora, params, x)
    want = jax.grad(_reference_loss(model), argnums=argnums)(lora, params, x)
    _close(got, want, 2e-5, 2e-5)
    assert float(jnp.abs(jax.tree.leaves(got)[-1 if name == "embed" else 0]).max()) > 0  # signal reaches m


@pytest.mark.parametrize("merged", [False, True])
def test_dora_gradient_forms_no_weight_gradient(merged, monkeypatch):
    """As for LoRA: no dot contracts the tokens into a W-shaped array; the norm adds only rank-sized dots."""
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    model, x, params, lora = _setup("dense")
    x = jax.random.normal(jax.random.key(5), (64, 8))
    loss = lambda lora: jnp.sum(jaxlora.apply(model.apply, params, lora, x) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(lora).jaxpr
    w_shape = tuple(weights(params)["proj"].leaf.shape)
    assert not [d for d in _dots(jaxpr) if d[0] == w_shape and d[1] == x.shape[0]]


def test_weight_norm_without_the_sum_matches_the_sum():
    w = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))  # roles s, i, o, o
    a, b = jax.random.normal(jax.random.key(1), (2, 5, 3)), jax.random.normal(jax.random.key(2), (2, 3, 3, 4))
    f = jaxlora.LoraFactors(a, b, 0.7, "sioo")
    want = _norm_reference(np.asarray(w) + delta_reference(a, b, "sioo", 0.7), "sioo")
    np.testing.assert_allclose(_matmul.weight_norm(w, a, b, 0.7, "sioo"), want, rtol=1e-5)
    merged = w + _matmul.delta(f)
    np.testing.assert_allclose(_matmul.weight_norm(w, a, b, 0.7, "sioo", merged=merged), want, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_merge_and_unmerge(name):
    model, x, params, lora = _setup(name)
    merged, norms = jaxlora.merge(params, lora, return_norms=True)
    ws, ms = weights(params), weights(merged)
    for path, f in lora.items():
        np.testing.assert_allclose(ms[path].leaf, _dora_weight_reference(ws[path].leaf, f), rtol=1e-5, atol=1e-6)
    _close(model.apply(merged, x), jaxlora.apply(model.apply, params, lora, x), 2e-5, 2e-5)
    back = jaxlora.unmerge(merged, lora, norms=norms)
    for path in lora:
        np.testing.assert_allclose(weights(back)[path].leaf, ws[path].leaf, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(back) == jax.tree.structure(params)


def test_unmerge_without_norms_is_an_error():
    _, _, params, lora = _setup("dense")
    with pytest.raises(ValueError, match=r"DoRA modules \['proj'\] need the norms.*return_norms=True"):
        jaxlora.unmerge(jaxlora.merge(params, lora), lora)


def test_summary_mask_and_checkpoint_carry_the_magnitude(tmp_path):
    import optax

    from jaxlora import checkpoint

    _, _, params, lora = _setup("dense_general_in")
    f = lora["proj"]
    assert f.m.shape == (3, 4)
    assert jaxlora.summary(params, lora).trainable == f.a.size + f.b.size + f.m.size
    tree = {"base": params, "lora": lora}
    labels = jaxlora.mask(tree, trainable="lora", frozen="frozen")
    assert labels["lora"]["proj"].m == "lora"
    opt = optax.multi_transform({"lora": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    np.testing.assert_array_equal(updates["lora"]["proj"].m, -np.ones((3, 4)))
    checkpoint.save(tmp_path / "ckpt", lora, params=params)
    back = checkpoint.restore(tmp_path / "ckpt", params=params)
    np.testing.assert_array_equal(back["proj"].m, f.m)
    np.testing.assert_array_equal(back["proj"].b, f.b)


def test_shardings_give_m_the_output_axes_specs():
    from jax.sharding import PartitionSpec as P

    _, _, params, lora = _setup("scan")
    specs = {"params": {"layers": {"mlp": {"kernel": P("stage", "fsdp", "tp"), "bias": P()}}}}
    s = jaxlora.shardings(specs, lora)["layers/mlp"]
    assert (s.a, s.b, s.m) == (P("stage", "fsdp", None), P("stage", None, "tp"), P("stage", "tp"))


def test_fused_kernel_split_slices_the_magnitude():
    """A fused QKV kernel cut in three: each piece's m is its slice of the output axis."""

    def fn(p, x):
        q, k, v = jnp.split(p["qkv"], 3, axis=1)
        return (x @ q) * (x @ k) + x @ v

    params = {"qkv": jax.random.normal(jax.random.key(0), (8, 12))}
    x = jax.random.normal(jax.random.key(1), (3, 8))
    lora = jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=2, dora=True), fn=fn, args=(x,))
    f = lora["qkv"]
    f = jaxlora.LoraFactors(f.a, jnp.ones_like(f.b), f.scale, f.roles, m=f.m * jnp.linspace(0.5, 1.5, 12))
    w = _dora_weight_reference(params["qkv"], f).astype(np.float32)
    _close(jaxlora.apply(fn, params, {"qkv": f}, x), fn({"qkv": w}, x), 2e-5, 2e-5)


def test_errors():
    with pytest.raises(ValueError, match="dora must be True or False"):
        jaxlora.LoraConfig(dora="yes")
    abstract = {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)}
    with pytest.raises(ValueError, match="DoRA initialises its magnitude from the values.*pass the loaded weights"):
        jaxlora.init(jax.random.key(0), abstract, jaxlora.LoraConfig(rank=2, dora=True))
    _, _, params, lora = _setup("dense")
    bad = {"proj": jaxlora.LoraFactors(lora["proj"].a, lora["proj"].b, 1.0, "io", m=jnp.ones(3))}
    with pytest.raises(ValueError, match=r"needs a DoRA magnitude m \(6,\).*got \(3,\)"):
        jaxlora.summary(params, bad)


def test_tied_attend_is_refused():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(11, 6, name="embed")
            return embed.attend(jnp.tanh(embed(ids)))

    model, ids = Tied(), jnp.arange(4)[None]
    params = model.init(jax.random.key(0), ids)
    config = jaxlora.LoraConfig(rank=2, dora=True, targets=["embed"])  # "all-linear" leaves a tied table out
    lora = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=(ids,))
    with pytest.raises(jaxlora.UnsupportedError, match="contracted over its output axes.*use_dora=False"):
        jaxlora.apply(model.apply, params, lora, ids)


def _peft_model():
    from test_peft import NAMES, Net

    net, ids = Net(), (jnp.arange(14).reshape(2, 7) * 7) % 50
    return net, net.init(jax.random.key(0), ids), ids, NAMES


def test_torch_peft_loads_jaxlora_dora_adapter(tmp_path):
    """jaxlora -> PEFT: peft.PeftModel computes the outputs jaxlora computes (Embed, Dense, DenseGeneral)."""
    from test_peft import _torch_twin

    from jaxlora import checkpoint

    net, params, ids, names = _peft_model()
    torch, twin = _torch_twin(params)
    import peft

    config = jaxlora.LoraConfig(rank=4, alpha=8, targets=list(names), rank_pattern={"heads": 2}, dora=True)
    lora = jaxlora.init(jax.random.key(2), params, config, fn=net.apply, args=(ids,))
    keys = iter(jax.random.split(jax.random.key(3), 2 * len(lora)))
    lora = {
        p: jaxlora.LoraFactors(
            f.a, 0.5 * jax.random.normal(next(keys), f.b.shape), f.scale, f.roles, f.dropout,
            m=f.m * (1 + 0.3 * jax.random.normal(next(keys), f.m.shape)),
        )
        for p, f in lora.items()
    }  # fmt: skip
    out = checkpoint.save_peft(tmp_path, lora, params=params, names=names, config=config)
    import json

    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(torch.tensor(np.asarray(ids))).numpy()
    want = np.asarray(jaxlora.apply(net.apply, params, lora, ids))
    assert np.abs(want - np.asarray(net.apply(params, ids))).max() > 0.1  # the adapter changes the output
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)
    back = checkpoint.load_peft(tmp_path, params=params, names=names, fn=net.apply, args=(ids,))
    for p, f in lora.items():
        np.testing.assert_array_equal(back[p].m, f.m)


def test_peft_made_dora_adapter_loads_into_jaxlora(tmp_path):
    """PEFT -> jaxlora: a DoRA adapter peft made (random B, magnitudes moved) gives peft's outputs."""
    from test_peft import _torch_twin

    from jaxlora import checkpoint

    net, params, ids, names = _peft_model()
    torch, twin = _torch_twin(params)
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["embed", "fc1", "heads", "fc2"], rank_pattern={"fc2": 2},
        init_lora_weights=False, use_dora=True,
    )  # fmt: skip
    peft_model = peft.get_peft_model(twin, cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        want = peft_model(torch.tensor(np.asarray(ids))).numpy()
    lora = checkpoint.load_peft(tmp_path, params=params, names=names, fn=net.apply, args=(ids,))
    assert lora["heads"].m.shape == (2, 8) and lora["tok"].m.shape == (16,)
    got = jaxlora.apply(net.apply, params, lora, ids)
    assert np.abs(want - np.asarray(net.apply(params, ids))).max() > 0.1
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)
    merged = jaxlora.merge(params, lora)  # and merged, as PEFT's merge_and_unload
    with torch.no_grad():
        unloaded = peft_model.merge_and_unload()(torch.tensor(np.asarray(ids))).numpy()
    np.testing.assert_allclose(net.apply(merged, ids), unloaded, atol=5e-5, rtol=1e-5)


def test_peft_dora_errors(tmp_path):
    from jaxlora import checkpoint

    net, params, ids, names = _peft_model()
    dora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets="proj_in", dora=True))
    plain = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets="proj_out"))
    with pytest.raises(ValueError, match=r"some modules use DoRA and some do not \(\['proj_out'\]"):
        checkpoint.save_peft(tmp_path, dora | plain, params=params)
    checkpoint.save_peft(tmp_path, dora, params=params)
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False}))
    reseal(tmp_path)
    with pytest.raises(ValueError, match="'proj_in': use_dora is False but lora_magnitude_vector is present"):
        checkpoint.load_peft(tmp_path, params=params)


def test_merged_exports_apply_dora(tmp_path):
    """save_merged writes jaxlora.merge's weights; merge_safetensors of a PEFT DoRA adapter matches peft's own merge."""
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[peft]'")
    peft = pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]'")
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from jaxlora import checkpoint

    _, _, params, lora = _setup("dense")
    checkpoint.save_merged(tmp_path / "m.safetensors", params, lora)
    got = load_file(tmp_path / "m.safetensors")["proj/kernel"]
    np.testing.assert_allclose(got, jaxlora.merge(params, lora)["params"]["proj"]["kernel"], rtol=1e-6)

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.emb = torch.nn.Linear(8, 6), torch.nn.Embedding(11, 6)

    torch.manual_seed(0)
    twin = Twin()
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(tmp_path / "base.safetensors"))
    cfg = peft.LoraConfig(r=2, target_modules=["fc", "emb"], init_lora_weights=False, use_dora=True)
    model = peft.get_peft_model(twin, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "adapter"))
    out = checkpoint.merge_safetensors(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "o.safetensors")
    want = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    merged = load_file(out)
    for k in ("fc.weight", "emb.weight"):
        np.testing.assert_allclose(merged[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dense", "scan"])
def test_bfloat16_model_stays_bfloat16(name):
    model, x, params, lora = _setup(name, jnp.bfloat16)
    want = model.apply(_replace(params, lora, lambda w, f: _dora_weight_reference(w, f).astype(np.float32)), x)
    got = jax.jit(lambda lora, x: jaxlora.apply(model.apply, params, lora, x))(lora, x)
    assert got.dtype == jnp.bfloat16
    _close(got, want, 3e-2, 3e-2)
    grads = jax.jit(jax.grad(lambda l: jnp.sum(jaxlora.apply(model.apply, params, l, x).astype(jnp.float32))))(lora)
    assert all(g.m.dtype == jnp.float32 and bool(jnp.isfinite(g.m).all()) for g in grads.values())


def test_nnx_dora_merge_and_unmerge():
    from flax import nnx

    model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    lora = jaxlora.nnx.init(jax.random.key(0), model, jaxlora.LoraConfig(rank=2, dora=True))
    (path, f), = lora.items()  # fmt: skip
    lora = {path: jaxlora.LoraFactors(f.a, jnp.ones_like(f.b), f.scale, f.roles, m=2 * f.m)}
    merged, norms = jaxlora.nnx.merge(model, lora, return_norms=True)
    np.testing.assert_allclose(merged.kernel[...], _dora_weight_reference(model.kernel[...], lora[path]), rtol=1e-5)
    back = jaxlora.nnx.unmerge(merged, lora, norms=norms)
    np.testing.assert_allclose(back.kernel[...], model.kernel[...], rtol=1e-5, atol=1e-6)
