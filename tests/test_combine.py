"""jaxlora.combine: NumPy references for the exact methods, PEFT's add_weighted_adapter for all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import checkpoint as ckpt

PARAMS = {"params": {"fc1": {"kernel": jnp.ones((8, 12)), "bias": jnp.zeros(12)}, "fc2": {"kernel": jnp.ones((12, 6))}}}


def _adapter(seed, rank=3, alpha=6, params=PARAMS, **kw):
    lora = jaxlora.init(jax.random.key(seed), params, jaxlora.LoraConfig(rank=rank, alpha=alpha, **kw))
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(lora)))
    return {
        p: jaxlora.LoraFactors(f.a, jax.random.normal(next(keys), f.b.shape), f.scale, f.roles) for p, f in lora.items()
    }


def _dw(f):
    return f.scale * np.einsum("...ir,...ro->...io", np.asarray(f.a, np.float64), np.asarray(f.b, np.float64))


def test_cat_is_exact_and_ranks_add():
    one, two = _adapter(0, rank=3), _adapter(1, rank=2, alpha=8)
    out = jaxlora.combine([one, two], [0.7, -1.5], method="cat")
    assert out["fc1"].rank == 5 and out["fc1"].scale == 1.0
    for p in out:
        np.testing.assert_allclose(_dw(out[p]), 0.7 * _dw(one[p]) - 1.5 * _dw(two[p]), rtol=1e-5, atol=1e-5)


def test_svd_is_best_rank_r_of_weighted_sum_per_layer():
    stacked = {"w": jnp.ones((3, 10, 7))}
    fn = lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["w"])  # noqa: E731 (a stacked weight: roles "sio")
    lora = jaxlora.init(jax.random.key(0), stacked, jaxlora.LoraConfig(rank=3), fn=fn, args=(jnp.ones((3, 2, 10)),))
    assert lora["w"].roles == "sio"
    one, two = (
        {
            "w": jaxlora.LoraFactors(
                jax.random.normal(jax.random.key(s), lora["w"].a.shape),
                jax.random.normal(jax.random.key(s + 9), lora["w"].b.shape),
                0.5,
                "sio",
            )
        }
        for s in (1, 2)
    )
    out = jaxlora.combine([one, two], [1.0, 0.3], method="svd", rank=4)
    assert out["w"].a.shape == (3, 10, 4) and out["w"].b.shape == (3, 4, 7)
    want = _dw(one["w"]) + 0.3 * _dw(two["w"])
    for layer in range(3):  # Eckart-Young, layer by layer
        u, s, vt = np.linalg.svd(want[layer])
        np.testing.assert_allclose(_dw(out["w"])[layer], (u[:, :4] * s[:4]) @ vt[:4], rtol=1e-4, atol=1e-4)


def _np_merge(ts, w, method, density, rng=None):
    """NumPy reference of PEFT's merges (independent of jaxlora.combine)."""
    ts = [np.asarray(t, np.float64) for t in ts]
    if method in ("ties", "magnitude_prune"):
        pruned = []
        for t in ts:
            k = int(density * t.size)
            thresh = np.sort(np.abs(t).ravel())[::-1][k - 1]
            pruned.append(np.where(np.abs(t) >= thresh, t, 0))
        ts = pruned
    stack, w = np.stack(ts), np.asarray(w).reshape(-1, *[1] * ts[0].ndim)
    if method == "ties":
        agree = np.sign(stack) == np.where(stack.sum(0) >= 0, 1, -1)
        return (stack * w * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return (stack * w).sum(0)


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd"])
def test_merges_match_numpy(method):
    one, two, three = _adapter(0), _adapter(1, alpha=12), _adapter(2)
    ws = [0.5, -0.8, 1.2]
    out = jaxlora.combine([one, two, three], ws, method=method, density=0.4)
    for p in out:
        fs = [one[p], two[p], three[p]]
        if method.endswith("_svd"):
            d = _np_merge([_dw(f) for f in fs], ws, method[:-4], 0.4)
            u, s, vt = np.linalg.svd(d)
            np.testing.assert_allclose(_dw(out[p]), (u[:, :3] * s[:3]) @ vt[:3], rtol=1e-4, atol=1e-4)
        else:
            sw = np.array([w * f.scale for w, f in zip(ws, fs)])
            a = _np_merge([f.a for f in fs], np.sign(sw) * np.sqrt(np.abs(sw)), method, 0.4)
            b = _np_merge([f.b for f in fs], np.sqrt(np.abs(sw)), method, 0.4)
            np.testing.assert_allclose(out[p].a, a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[p].b, b, rtol=1e-5, atol=1e-6)


def test_dare_drops_and_rescales():
    one, two = _adapter(0), _adapter(1)
    out = jaxlora.combine([one], [2.0], method="dare_linear", density=0.5, key=jax.random.key(3))
    sw = np.sqrt(2.0 * one["fc1"].scale)
    a, ref = np.asarray(out["fc1"].a), sw * np.asarray(one["fc1"].a) / 0.5
    kept = a != 0  # each entry is dropped or rescaled by 1/density exactly
    np.testing.assert_allclose(a[kept], ref[kept], rtol=1e-6)
    assert 0.2 < kept.mean() < 0.8
    again = jaxlora.combine([one], [2.0], method="dare_linear", density=0.5, key=jax.random.key(3))
    np.testing.assert_array_equal(again["fc1"].a, out["fc1"].a)  # the key decides the mask
    dense = jaxlora.combine([one, two], [1.0, 0.5], method="dare_ties", density=1.0, key=jax.random.key(0))
    ties = jaxlora.combine([one, two], [1.0, 0.5], method="ties", density=1.0)
    np.testing.assert_allclose(dense["fc2"].a, ties["fc2"].a)  # density 1 prunes nothing


def test_errors():
    one, two = _adapter(0, rank=3), _adapter(1, rank=2)
    with pytest.raises(ValueError, match="method must be one of"):
        jaxlora.combine([one], [1.0], method="mean")
    with pytest.raises(ValueError, match="one weight per adapter"):
        jaxlora.combine([one, two], [1.0], method="cat")
    with pytest.raises(ValueError, match="needs density="):
        jaxlora.combine([one], [1.0], method="ties")
    with pytest.raises(ValueError, match="pass key="):
        jaxlora.combine([one], [1.0], method="dare_linear", density=0.5)
    with pytest.raises(ValueError, match=r"'fc1': method 'linear' needs equal ranks, got \[3, 2\]"):
        jaxlora.combine([one, two], [1.0, 1.0], method="linear")
    with pytest.raises(ValueError, match="rank 20 exceeds"):
        jaxlora.combine([one, two], [1.0, 1.0], method="svd", rank=20)
    dora = {
        p: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, f.dropout, m=jnp.ones(f.b.shape[-1])) for p, f in one.items()
    }
    with pytest.raises(ValueError, match="'fc1': DoRA adapters .* cannot be combined"):
        jaxlora.combine([dora, one], [1.0, 1.0], method="cat")
    head = {"fc2": jaxlora.SavedModule({"kernel": jnp.ones((12, 6))})}
    assert jaxlora.combine([{"fc1": one["fc1"]}, head], [1.0, 2.0], method="cat")["fc2"] is head["fc2"]
    with pytest.raises(ValueError, match="'fc2': 2 adapters train this module in full"):
        jaxlora.combine([head, head], [1.0, 1.0], method="cat")
    other = _adapter(0, params={"params": {"fc1": {"kernel": jnp.ones((5, 12))}}})
    with pytest.raises(ValueError, match="'fc1': the adapters were made for different weights"):
        jaxlora.combine([one, other], [1.0, 1.0], method="cat")


# ---- cross-check against PEFT's add_weighted_adapter ---------------------------------------------


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[peft]'")
    peft = pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]'")

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)

    one, two = _adapter(0), _adapter(1, alpha=12)
    dirs = []
    for i, lora in enumerate((one, two)):
        d = tmp_path_factory.mktemp(f"adapter{i}")
        ckpt.save_peft(d, lora, params=PARAMS)
        dirs.append(str(d))
    model = peft.PeftModel.from_pretrained(Twin(), dirs[0], adapter_name="one")
    model.load_adapter(dirs[1], adapter_name="two")
    return torch, model, one, two


@pytest.mark.parametrize(
    "method",
    ["cat", "linear", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd", "dare_linear", "dare_ties"],
)
def test_matches_peft(peft_pair, method):
    torch, model, one, two = peft_pair
    ws, density = [0.6, -1.3], 0.5
    if method.startswith("dare"):  # PEFT draws its mask from torch's RNG: compare where nothing is dropped
        density = 1.0
    name = f"c_{method}"
    add = lambda: model.add_weighted_adapter(  # noqa: E731
        ["one", "two"], ws, name, combination_type=method, density=density, svd_rank=3
    )
    if density >= 1:
        with pytest.warns(UserWarning, match="no pruning will be performed"):
            add()
    else:
        add()
    got = jaxlora.combine([one, two], ws, method=method, density=density, rank=3, key=jax.random.key(0))
    for p, f in got.items():
        layer = getattr(model.base_model.model, p)
        want = layer.get_delta_weight(name).detach().numpy()  # (out, in)
        np.testing.assert_allclose(_dw(f).T, want, rtol=1e-5, atol=1e-5)
        assert f.rank == layer.r[name]
