"""init_from_weights (PiSSA, OLoRA, randomized SVD): NumPy references, output unchanged at step 0,
PEFT's own inits on the same weights, and the export as a plain LoRA loaded by PEFT on the original base."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import checkpoint as ckpt


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(12, name="fc1")(x))
        h = nn.DenseGeneral((2, 5), name="heads")(h)  # kernel (12, 2, 5): I = 12, O = 10
        return nn.Dense(6, name="fc2")(h.reshape(h.shape[:-2] + (10,)))


@pytest.fixture(scope="module")
def model():
    net, x = Net(), jax.random.normal(jax.random.key(0), (4, 16))
    return net, net.init(jax.random.key(1), x), x


def _product(f):
    """scale·a·b as (I, O), or (L, I, O) for a stacked weight (NumPy)."""
    a, b, r = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64), f.rank
    if "s" in f.roles:
        return f.scale * np.einsum("lir,lro->lio", a, b)
    return f.scale * a.reshape(-1, r) @ b.reshape(r, -1)


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_numpy_and_keeps_the_output(model, method, rslora):
    net, params, x = model
    config = jaxlora.LoraConfig(rank=3, alpha=5, rslora=rslora)
    residual, lora = jaxlora.init_from_weights(
        jax.random.key(2), params, config, method=method, fn=net.apply, args=(x,)
    )
    assert set(lora) == {"fc1", "heads", "fc2"} and lora["heads"].roles == "ioo"
    for path, f in lora.items():
        w = np.asarray(params["params"][path]["kernel"], np.float64)
        m = w.reshape(w.shape[0], -1)  # (I, O)
        if method == "pissa":
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            want = (u[:, :3] * s[:3]) @ vt[:3]
            np.testing.assert_allclose(np.linalg.norm(f.a, axis=0) ** 2, s[:3] / f.scale, rtol=1e-4)
        else:
            q, r = np.linalg.qr(m.T)  # PEFT's QR of the (out, in) weight
            want = f.scale * (q[:, :3] @ r[:3]).T
            np.testing.assert_allclose(np.abs(np.asarray(f.b).reshape(3, -1)), np.abs(q[:, :3].T), atol=1e-5)
        np.testing.assert_allclose(_product(f).reshape(m.shape), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(residual["params"][path]["kernel"]).reshape(m.shape), m - want, atol=1e-5)
    base = net.apply(params, x)
    got = jaxlora.apply(net.apply, residual, lora, x)
    np.testing.assert_allclose(got, base, atol=1e-5 * float(np.abs(base).max()))  # step 0 equals the base model
    np.testing.assert_array_equal(residual["params"]["fc1"]["bias"], params["params"]["fc1"]["bias"])


def test_randomized_svd_and_stacked_layers():
    k = jax.random.split(jax.random.key(0), 3)
    low = jnp.einsum("lir,lro->lio", jax.random.normal(k[0], (3, 40, 4)), jax.random.normal(k[1], (3, 4, 30)))
    params = {"w": low + 1e-3 * jax.random.normal(k[2], low.shape)}  # rank 4 + noise, per layer
    fn = lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["w"])  # noqa: E731 (stacked: roles "sio")
    x = jnp.ones((3, 2, 40))
    config = jaxlora.LoraConfig(rank=4)
    exact_res, exact = jaxlora.init_from_weights(jax.random.key(1), params, config, fn=fn, args=(x,))
    fast_res, fast = jaxlora.init_from_weights(jax.random.key(1), params, config, niter=2, fn=fn, args=(x,))
    assert fast["w"].roles == "sio" and fast["w"].a.shape == (3, 40, 4)
    for layer in range(3):  # per layer: the top-4 part of each layer's matrix
        u, s, vt = np.linalg.svd(np.asarray(params["w"][layer], np.float64))
        np.testing.assert_allclose(_product(exact["w"])[layer], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
        np.testing.assert_allclose(_product(fast["w"])[layer], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-3)
    for res in (exact_res, fast_res):
        np.testing.assert_allclose(
            jaxlora.apply(fn, res, fast if res is fast_res else exact, x), fn(params, x), atol=1e-3
        )
    assert float(jnp.abs(fast_res["w"]).max()) < 1e-2  # only the noise is left


def test_errors(model):
    net, params, x = model
    config = jaxlora.LoraConfig(rank=2)
    with pytest.raises(ValueError, match='method must be "pissa" or "olora"'):
        jaxlora.init_from_weights(jax.random.key(0), params, config, method="loftq", fn=net.apply, args=(x,))
    with pytest.raises(ValueError, match="non-negative int for PiSSA"):
        jaxlora.init_from_weights(jax.random.key(0), params, config, method="olora", niter=2, fn=net.apply, args=(x,))
    shapes = jax.eval_shape(lambda: params)
    with pytest.raises(TypeError, match="needs the weights, but params holds only the shape of 'fc1'"):
        jaxlora.init_from_weights(jax.random.key(0), shapes, config, fn=net.apply, args=(x,))
    _, lora0 = jaxlora.init_from_weights(jax.random.key(0), params, config, fn=net.apply, args=(x,))
    with pytest.raises(ValueError, match="'fc2': initial= needs the factors init_from_weights returned"):
        ckpt.save_peft("/nonexistent", lora0, initial={p: f for p, f in lora0.items() if p != "fc2"})


def test_dora_saved_modules_and_quantized_base(model, tmp_path):
    """DoRA's m carries over (‖W_res + ΔW‖ = ‖W‖); saved modules pass through; a quantized base is refused."""
    net, params, x = model
    config = jaxlora.LoraConfig(rank=2, targets=["fc1", "heads"], dora=True, modules_to_save=["fc2"])
    residual, lora = jaxlora.init_from_weights(jax.random.key(0), params, config, fn=net.apply, args=(x,))
    plain = jaxlora.init(jax.random.key(0), params, config, fn=net.apply, args=(x,))
    assert isinstance(lora["fc2"], jaxlora.SavedModule)
    np.testing.assert_array_equal(lora["heads"].m, plain["heads"].m)  # the norms of the original W
    np.testing.assert_allclose(jaxlora.apply(net.apply, residual, lora, x), net.apply(params, x), atol=1e-5)
    trained = {p: f if isinstance(f, jaxlora.SavedModule) else jaxlora.LoraFactors(
        f.a, f.b * 1.5, f.scale, f.roles, f.dropout, m=f.m * 1.1) for p, f in lora.items()}  # fmt: skip
    out = ckpt.save_peft(tmp_path / "conv", trained, params=params, config=config, initial=lora)
    back = ckpt.load_peft(out, params=params)  # a DoRA LoRA of rank 2r on the ORIGINAL weights
    assert back["heads"].rank == 4 and isinstance(back["fc2"], jaxlora.SavedModule)
    np.testing.assert_allclose(
        jaxlora.apply(net.apply, params, back, x), jaxlora.apply(net.apply, residual, trained, x), atol=2e-5
    )
    with pytest.raises(ValueError, match=r"modules_to_save train \['fc2'\] .* are quantized .* exclude="):
        jaxlora.init(jax.random.key(0), jaxlora.quantize(params, "int8"), config, fn=net.apply, args=(x,))
    qparams = jaxlora.quantize(params, "int8", exclude="fc2")
    with pytest.raises(TypeError, match=r"\['fc1', 'heads'\] are quantized .* quantize the residual"):
        jaxlora.init_from_weights(jax.random.key(0), qparams, config, fn=net.apply, args=(x,))


# ---- cross-check against PEFT ---------------------------------------------------------------------


def _twin(params):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[peft]'")
    pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]'")

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.heads, self.fc2 = torch.nn.Linear(16, 12), torch.nn.Linear(12, 10), torch.nn.Linear(10, 6)

        def forward(self, x):
            return self.fc2(self.heads(torch.tanh(self.fc1(x))))

    twin, p = Twin(), params["params"]
    with torch.no_grad():
        for name in ("fc1", "heads", "fc2"):
            getattr(twin, name).weight.copy_(
                torch.tensor(np.asarray(p[name]["kernel"]).reshape(-1, getattr(twin, name).out_features).T)
            )
            getattr(twin, name).bias.copy_(torch.tensor(np.asarray(p[name]["bias"]).reshape(-1)))
    return torch, twin.eval()


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_matches_peft_init(model, method):
    net, params, x = model
    torch, twin = _twin(params)
    import peft

    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "heads", "fc2"], init_lora_weights=method)
    pm = peft.get_peft_model(twin, cfg)
    config = jaxlora.LoraConfig(rank=3, alpha=5)
    residual, lora = jaxlora.init_from_weights(
        jax.random.key(0), params, config, method=method, fn=net.apply, args=(x,)
    )
    for path, f in lora.items():
        layer = getattr(pm.base_model.model, path)
        w_res = layer.base_layer.weight.detach().numpy()  # (out, in)
        np.testing.assert_allclose(
            np.asarray(residual["params"][path]["kernel"]).reshape(w_res.shape[1], -1).T, w_res, atol=1e-5
        )
        want = layer.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(_product(f).reshape(want.shape[1], -1).T, want, atol=1e-5)
        a, peft_a = np.asarray(f.a).reshape(-1, 3).T, layer.lora_A["default"].weight.detach().numpy()
        sign = np.sign(np.sum(a * peft_a, axis=1))  # each rank component up to its sign
        np.testing.assert_allclose(a * sign[:, None], peft_a, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_the_conversion_on_the_original_base(tmp_path, model, rslora):
    net, params, x = model
    torch, twin = _twin(params)
    import json

    import peft

    config = jaxlora.LoraConfig(rank=3, alpha=5, rslora=rslora)
    residual, lora0 = jaxlora.init_from_weights(jax.random.key(0), params, config, fn=net.apply, args=(x,))
    keys = iter(jax.random.split(jax.random.key(5), 2 * len(lora0)))
    trained = {  # a stand-in for training: both factors moved
        p: jaxlora.LoraFactors(
            f.a + 0.1 * jax.random.normal(next(keys), f.a.shape),
            f.b + 0.1 * jax.random.normal(next(keys), f.b.shape),
            f.scale,
            f.roles,
        )
        for p, f in lora0.items()
    }
    ckpt.save_peft(tmp_path, trained, params=params, config=config, initial=lora0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == pytest.approx(5 * (np.sqrt(2) if rslora else 2))
    want = jaxlora.apply(net.apply, residual, trained, x)
    assert np.abs(np.asarray(want) - np.asarray(net.apply(params, x))).max() > 0.05  # training changed the output
    loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()  # on the ORIGINAL weights
    with torch.no_grad():
        got = loaded(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
