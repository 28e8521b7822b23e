"""Remat: `jaxlora.remat_policy`, the LoRA op's named values, and what its backward pass keeps."""

import collections
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, jaxpr_parts
from jax import checkpoint_policies as cp
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

import jaxlora
from jaxlora import _matmul

D, R, L = 16, 4, 2

POLICIES = {
    "none": None,  # no jax.checkpoint at all
    "nothing": cp.nothing_saveable,
    "dots": cp.dots_with_no_batch_dims_saveable,
    "minimal": jaxlora.remat_policy("minimal"),
    "outputs": jaxlora.remat_policy("outputs"),
    "outputs+names": jaxlora.remat_policy("outputs", names=("h",)),
    "outputs of q": jaxlora.remat_policy("outputs", targets=("q",)),
}


def _layer(h, w):
    """A block: q and k share a normed input (named "h"), a gated product, o back to the residual."""
    x = checkpoint_name(h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6), "h")
    u = jax.nn.silu(x @ w["q"]) * (x @ w["k"])
    return h + u @ w["o"]


def _model(policy):
    def model(params, x):
        body = _layer if policy is None else jax.checkpoint(_layer, policy=policy)
        return jax.lax.scan(lambda h, w: (body(h, w), None), x, params)[0]

    return model


def _setup(dora, layers=(L,)):
    ks = jax.random.split(jax.random.key(0), 8)
    params = {n: jax.random.normal(k, (*layers, D, D)) / 4 for n, k in zip("qko", ks)}
    x = jax.random.normal(ks[3], (2, 8, D))
    config = jaxlora.LoraConfig(rank=R, alpha=8, targets=("q", "k", "o"), dora=dora)
    traced = dict(fn=_model(None), args=(x,)) if layers else {}  # stacked: init learns the roles "sio"
    lora = jaxlora.init(ks[4], params, config, **traced)
    leaves, tree = jax.tree.flatten(lora)  # B ≠ 0 and m ≠ ‖W‖, so every term matters
    noise = [0.1 * jax.random.normal(k, v.shape) for k, v in zip(jax.random.split(ks[5], len(leaves)), leaves)]
    return params, jax.tree.unflatten(tree, [v + n for v, n in zip(leaves, noise)]), x


def _reference(params, lora, x):
    """The adapted model by plain autodiff: W + scale·a·b (DoRA: m / sg(‖W + ΔW‖) · (W + ΔW)), no jaxlora."""
    merged = {}
    for n, w in params.items():
        f = lora[n]
        wm = w + f.scale * jnp.einsum("lir,lro->lio", f.a, f.b)
        if f.m is not None:
            wm = f.m[:, None, :] / jax.lax.stop_gradient(jnp.linalg.norm(wm, axis=1, keepdims=True)) * wm
        merged[n] = wm
    return _model(None)(merged, x)


def _loss(out):
    return jnp.mean(jnp.tanh(out) ** 2)


CASES = [(p, "factored") for p in POLICIES] + [(p, f) for f in ("merged", "dora") for p in ("nothing", "outputs")]


@pytest.mark.parametrize("policy, form", CASES)
def test_value_and_gradients_equal_under_every_policy(policy, form, monkeypatch):
    monkeypatch.setattr(_matmul, "_MERGED", form == "merged")
    params, lora, x = _setup(dora=form == "dora")
    model = _model(POLICIES[policy])
    got = jax.jit(jax.value_and_grad(lambda l, x: _loss(jaxlora.apply(model, params, l, x)), argnums=(0, 1)))
    want = jax.jit(jax.value_and_grad(lambda l, x: _loss(_reference(params, l, x)), argnums=(0, 1)))
    assert_trees_close(got(lora, x), want(lora, x), rtol=2e-5, atol=2e-6)


def _saved(f, *args) -> collections.Counter:
    """What ``jax.vjp(f, *args)`` keeps for the backward pass, by kind: the weights and factors left out."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    kinds = collections.Counter()
    for line in out.getvalue().splitlines():
        shape, what = line.split(" ", 1)
        if "from a constant" in what or "from the argument l[" in what:
            continue  # W (a buffer the caller holds) and the factors themselves
        name = re.search(r"named '([^']+)'", what)
        kinds[name.group(1) if name else "argument x" if "from the argument x" in what else what] += 1
        assert name is None or name.group(1) != "lora_xa" or shape.endswith(f",{R}]"), line  # rank-r
    return kinds


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize(
    "policy, want",
    [
        ("nothing", {"argument x": 1}),
        ("minimal", {"argument x": 1, "lora_xa": 3}),
        # q and k feed silu(q)·k, so the backward needs their outputs; o's output it does not
        ("outputs", {"argument x": 1, "lora_xa": 3, "lora_out/q": 1, "lora_out/k": 1}),
        ("outputs+names", {"argument x": 1, "lora_xa": 3, "lora_out/q": 1, "lora_out/k": 1, "h": 1}),
        ("outputs of q", {"argument x": 1, "lora_xa": 3, "lora_out/q": 1}),
        # x·A of each op, and the two summands x·W and (x·A)·B of q and k, where "outputs" keeps their sum
        ("dots", {"argument x": 1}),
    ],
)
def test_saved_residuals_are_the_named_values(policy, want, merged, monkeypatch):
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    params, lora, x = _setup(dora=False, layers=())
    block = jax.checkpoint(lambda p, x: _layer(x, p), policy=POLICIES[policy])
    saved = _saved(lambda l, x: jaxlora.apply(block, params, l, x).sum(), lora, x)
    dots = {k: v for k, v in saved.items() if k.startswith("output of dot_general")}
    if policy == "dots":  # x·A of q, k, o; x·W (or x·(W + ΔW)) of q, k, and (x·A)·B when factored
        assert sum(dots.values()) == 3 + (2 if merged else 4), saved
        saved = collections.Counter({k: v for k, v in saved.items() if k not in dots})
    assert saved == want


def test_a_saved_xa_is_not_made_again():
    """The forward uses the named ``x·A`` itself: where "minimal" saves it, recomputing q's and k's outputs
    (which silu(q)·k needs) reuses it; whole-block remat makes all three ``x·A`` again."""
    params, lora, x = _setup(dora=False, layers=())

    def shrinks(policy):  # products with a (D, R) factor: x·A, and dt·Aᵀ for dx
        block = jax.checkpoint(lambda p, x: _layer(x, p), policy=POLICIES[policy])
        eqns, _ = jaxpr_parts(jax.make_jaxpr(jax.grad(lambda l, x: jaxlora.apply(block, params, l, x).sum()))(lora, x))
        return sum(e.primitive.name == "dot_general" and e.invars[1].aval.shape == (D, R) for e in eqns)

    assert shrinks("minimal") == shrinks("outputs") == shrinks("nothing") - 3


@pytest.mark.parametrize("dropout", [False, True])
def test_the_lora_backward_keeps_x_and_xa_only(dropout):
    """Without remat, a lone op keeps its LoRA input and ``x·A``: with dropout, not ``x`` beside the
    dropped-out input; never the float32 factor ``a`` it only needs the dtype of."""
    params = {"w": jax.random.normal(jax.random.key(0), (D, D))}
    config = jaxlora.LoraConfig(rank=R, targets=("w",), dropout=0.5 if dropout else 0.0)
    lora = jaxlora.init(jax.random.key(1), params, config)
    x = jax.random.normal(jax.random.key(2), (2, 8, D))
    key = jax.random.key(3) if dropout else None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda l, x: jaxlora.apply(lambda p, x: x @ p["w"], params, l, x, dropout_key=key).sum(),
                              lora, x)  # fmt: skip
    lines = out.getvalue().splitlines()
    assert any("from the argument x" in line for line in lines) != dropout, lines
    assert sum("named 'lora_xa'" in line for line in lines) == 1, lines
    assert not any("argument l['w'].a" in line for line in lines), lines
    if not dropout:  # x, x·A, the cast a (here a copy: the scale folded in), b, W
        assert len(lines) == 5, lines


def test_policies_reach_linen_remat():
    """``nn.remat(..., policy=jaxlora.remat_policy())`` around a block that apply adapts."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(D, name="down")(jax.nn.silu(nn.Dense(2 * D, name="up")(x)))

    class Model(nn.Module):
        policy: object

        @nn.compact
        def __call__(self, x):
            return (nn.remat(Block, policy=self.policy) if self.policy else Block)(name="block")(x)

    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    params = Model(None).init(jax.random.key(1), x)
    lora = jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=R, targets=("up", "down")))
    lora = jax.tree.map(lambda v: v + 0.1, lora)

    def grads(policy):
        return jax.grad(lambda l: _loss(jaxlora.apply(Model(policy).apply, params, l, x)))(lora)

    assert_trees_close(grads(jaxlora.remat_policy("outputs")), grads(None), rtol=1e-5, atol=1e-6)
    saved = _saved(lambda l, x: jaxlora.apply(Model(jaxlora.remat_policy()).apply, params, l, x).sum(), lora, x)
    assert saved == {"argument x": 1, "lora_xa": 2, "lora_out/block/up": 1}


def test_remat_policy_errors():
    with pytest.raises(ValueError, match=r"keep='everything' is not a level; expected one of \['minimal', 'outputs'\]"):
        jaxlora.remat_policy("everything")
    with pytest.raises(TypeError, match=r"names must be a sequence of strings, got 'h'; e.g. names=\(.gate., .up.\)"):
        jaxlora.remat_policy(names="h")
    with pytest.raises(TypeError, match=r"names must be a sequence of strings, got \(1,\)"):
        jaxlora.remat_policy(names=(1,))
    with pytest.raises(TypeError, match=r"targets must be a sequence of strings, got 'gate'"):
        jaxlora.remat_policy(targets="gate")
    with pytest.raises(ValueError, match=r"targets=\('gate',\) selects outputs to save; pass keep=\"outputs\""):
        jaxlora.remat_policy("minimal", targets=("gate",))


def test_remat_policy_saves_only_its_names():
    policy = jaxlora.remat_policy("minimal", names=("h",))
    x = jnp.ones((3, D))

    def f(x):
        h = checkpoint_name(jnp.sin(x), "h")
        return checkpoint_name(jnp.sin(h)[:, :R], "lora_xa") * checkpoint_name(jnp.sin(h)[:, :R], "lora_out")

    saved = _saved(jax.checkpoint(lambda x: f(x).sum(), policy=policy), x)
    assert saved == {"argument x": 1, "h": 1, "lora_xa": 1}, saved
    np.testing.assert_allclose(jax.grad(jax.checkpoint(lambda x: f(x).sum(), policy=policy))(x),
                               jax.grad(lambda x: f(x).sum())(x), rtol=1e-6)  # fmt: skip
