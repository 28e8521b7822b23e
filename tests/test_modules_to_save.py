"""modules_to_save: a head and a norm trained in full beside the factors, through apply, merge, optax,
Orbax and PEFT files (the PEFT keys checked with peft itself)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import checkpoint as ckpt


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(12, name="fc")(x))
        h = nn.LayerNorm(name="ln")(h)
        return nn.Dense(3, name="head")(h)


@pytest.fixture(scope="module")
def model():
    net, x = Net(), jax.random.normal(jax.random.key(0), (5, 8))
    return net, net.init(jax.random.key(1), x), x


CONFIG = jaxlora.LoraConfig(rank=2, targets="all-linear", modules_to_save=["head", "ln"])


def _trained(model, steps=5):
    net, params, x = model
    lora = jaxlora.init(jax.random.key(2), params, CONFIG, fn=net.apply, args=(x,))
    target = jnp.ones((5, 3))
    loss = lambda lora: jnp.mean((jaxlora.apply(net.apply, params, lora, x) - target) ** 2)  # noqa: E731
    opt = optax.adam(1e-2)
    state = opt.init(lora)
    for _ in range(steps):
        updates, state = opt.update(jax.grad(loss)(lora), state, lora)
        lora = optax.apply_updates(lora, updates)
    return lora


def test_init_apply_merge(model):
    net, params, x = model
    lora = jaxlora.init(jax.random.key(2), params, CONFIG, fn=net.apply, args=(x,))
    assert set(lora) == {"fc", "head", "ln"}  # "all-linear" would have adapted head: the saved copy wins
    assert isinstance(lora["head"], jaxlora.SavedModule) and set(lora["head"].weights) == {"kernel", "bias"}
    assert set(lora["ln"].weights) == {"scale", "bias"}
    np.testing.assert_array_equal(jaxlora.apply(net.apply, params, lora, x), net.apply(params, x))
    trained = _trained(model)
    assert np.abs(np.asarray(trained["head"].weights["kernel"] - params["params"]["head"]["kernel"])).max() > 1e-3
    assert np.abs(np.asarray(trained["ln"].weights["scale"] - 1)).max() > 1e-3  # the norm trained too
    merged = jaxlora.merge(params, trained)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], trained["head"].weights["kernel"])
    np.testing.assert_array_equal(merged["params"]["ln"]["scale"], trained["ln"].weights["scale"])
    # NumPy reference: the same network with the trained head, norm and fc + ΔW
    p = jax.tree.map(np.asarray, merged["params"])
    h = np.tanh(np.asarray(x) @ p["fc"]["kernel"] + p["fc"]["bias"])
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * p["ln"]["scale"] + p["ln"]["bias"]
    want = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(jaxlora.apply(net.apply, params, trained, x), want, atol=1e-5)
    np.testing.assert_allclose(net.apply(merged, x), want, atol=1e-5)
    labels = jaxlora.mask(trained, trainable="t", frozen="f")
    assert labels["head"].weights["bias"] == "t" and labels["fc"].a == "t"
    s = jaxlora.summary(params, trained)
    assert s.trainable == 8 * 2 + 2 * 12 + (12 * 3 + 3) + 2 * 12 and "full" in str(s)


def test_orbax_round_trip(tmp_path, model):
    net, params, x = model
    lora = _trained(model, steps=2)
    ckpt.save(tmp_path / "a", lora, params=params, config=CONFIG)
    back = ckpt.restore(tmp_path / "a", params=params)
    assert isinstance(back["ln"], jaxlora.SavedModule)
    np.testing.assert_array_equal(back["head"].weights["kernel"], lora["head"].weights["kernel"])
    np.testing.assert_array_equal(back["fc"].b, lora["fc"].b)
    assert ckpt.info(tmp_path / "a").trainable == jaxlora.summary(params, lora).trainable


def test_errors(model):
    net, params, x = model
    with pytest.raises(ValueError, match="modules_to_save pattern 'haed' matches no module; closest module paths"):
        jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(modules_to_save="haed"))
    with pytest.raises(ValueError, match="modules_to_save pattern .* is not a valid regex"):
        jaxlora.LoraConfig(modules_to_save="(")
    lora = _trained(model, steps=1)
    with pytest.raises(
        ValueError, match=r"unmerge cannot restore the original weights of the saved modules \['head', 'ln'\]"
    ):
        jaxlora.unmerge(params, lora)
    bad = dict(lora, head=jaxlora.SavedModule({"kernel": jnp.ones((12, 4)), "bias": jnp.ones(3)}))
    with pytest.raises(
        ValueError, match=r"'head': saved module shapes differ from params: kernel \(12, 4\) vs \(12, 3\)"
    ):
        jaxlora.apply(net.apply, params, bad, x)
    with pytest.raises(TypeError, match="modules_to_save copies 'head', but params holds only the shapes"):
        jaxlora.init(jax.random.key(0), jax.eval_shape(lambda: params), CONFIG, fn=net.apply, args=(x,))


# ---- PEFT's modules_to_save keys, checked with peft -------------------------------------------------


def _twin(params):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[peft]'")
    pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]'")

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.ln, self.head = (
                torch.nn.Linear(8, 12),
                torch.nn.LayerNorm(12, eps=1e-6),
                torch.nn.Linear(12, 3),
            )

        def forward(self, x):
            return self.head(self.ln(torch.tanh(self.fc(x))))

    twin, p, t = Twin(), params["params"], lambda a: torch.tensor(np.asarray(a))
    with torch.no_grad():
        for name in ("fc", "head"):
            getattr(twin, name).weight.copy_(t(p[name]["kernel"]).T)
            getattr(twin, name).bias.copy_(t(p[name]["bias"]))
        twin.ln.weight.copy_(t(p["ln"]["scale"]))
        twin.ln.bias.copy_(t(p["ln"]["bias"]))
    return torch, twin.eval()


def test_peft_loads_jaxlora_saved_modules(tmp_path, model):
    net, params, x = model
    torch, twin = _twin(params)
    import peft

    lora = _trained(model)
    ckpt.save_peft(tmp_path, lora, params=params, config=CONFIG)
    loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    assert sorted(loaded.peft_config["default"].modules_to_save) == ["head", "ln"]
    with torch.no_grad():
        got = loaded(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(got, jaxlora.apply(net.apply, params, lora, x), atol=2e-5, rtol=1e-5)
    back = ckpt.load_peft(tmp_path, params=params)
    np.testing.assert_array_equal(back["head"].weights["kernel"], lora["head"].weights["kernel"])


def test_peft_made_saved_modules_load_into_jaxlora(tmp_path, model):
    net, params, x = model
    torch, twin = _twin(params)
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["head", "ln"], init_lora_weights=False)
    pm = peft.get_peft_model(twin, cfg).eval()
    with torch.no_grad():  # "train" the copies
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        want = pm(torch.tensor(np.asarray(x))).numpy()
    pm.save_pretrained(str(tmp_path))
    lora = ckpt.load_peft(tmp_path, params=params)
    assert isinstance(lora["head"], jaxlora.SavedModule) and set(lora["ln"].weights) == {"scale", "bias"}
    np.testing.assert_allclose(jaxlora.apply(net.apply, params, lora, x), want, atol=2e-5, rtol=1e-5)


def test_shardings_follow_the_copied_leaves(model):
    from jax.sharding import PartitionSpec as P

    net, params, x = model
    lora = jaxlora.init(jax.random.key(2), params, CONFIG, fn=net.apply, args=(x,))
    specs = jax.tree.map(lambda _: P(), params)
    specs["params"]["head"]["kernel"] = P("data", None)
    s = jaxlora.shardings(specs, lora)
    assert s["head"].weights["kernel"] == P("data", None) and s["head"].weights["bias"] == P()
    assert s["ln"].weights["scale"] == P() and s["fc"].a == P(None, None)
