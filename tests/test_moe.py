"""LoRA on mixture-of-experts weights: ``ragged_dot`` (tokens sorted by expert), capacity einsums,
fused gate/up expert weights sliced apart; everything keyed on roles (merge, shardings, checkpoints)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, delta_reference
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import _matmul

E, TOP_K, D, FF, TOKENS = 4, 2, 8, 12, 10


class Moe(nn.Module):
    """A Mixtral-style sparse MLP: router, top-k, SwiGLU experts through ``ragged_dot``.

    ``fused``: one ``(experts, d, 2·ff)`` gate/up weight sliced apart (``W[..., :ff]``, ``W[..., ff:]``).
    """

    fused: bool = False

    @nn.compact
    def __call__(self, x):  # (tokens, d)
        weights, idx = lax.top_k(nn.Dense(E, use_bias=False, name="router")(x), TOP_K)
        weights = jax.nn.softmax(weights, axis=-1)
        order = jnp.argsort(idx.reshape(-1))
        sizes = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.int32)
        xs = x[order // TOP_K]  # the rows sorted by expert
        init = nn.initializers.normal(0.3)
        if self.fused:
            gate_up = self.param("gate_up", init, (E, D, 2 * FF))
            gate, up = gate_up[..., :FF], gate_up[..., FF:]
        else:
            gate, up = self.param("gate", init, (E, D, FF)), self.param("up", init, (E, D, FF))
        h = nn.silu(lax.ragged_dot(xs, gate, sizes)) * lax.ragged_dot(xs, up, sizes)
        y = lax.ragged_dot(h, self.param("down", init, (E, FF, D)), sizes) * weights.reshape(-1)[order][:, None]
        return jnp.zeros_like(x).at[order // TOP_K].add(y)


def _setup(fused=False, rank=3, **config):
    model = Moe(fused=fused)
    x = jax.random.normal(jax.random.key(0), (TOKENS, D))
    params = model.init(jax.random.key(1), x)
    targets = ["gate_up" if fused else "gate", *([] if fused else ["up"]), "down", "router"]
    cfg = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=targets, **config)
    lora = jaxlora.init(jax.random.key(2), params, cfg, fn=model.apply, args=(x,))
    keys = iter(jax.random.split(jax.random.key(3), 2 * len(lora)))
    lora = {  # B is zero at init: give it values
        p: jaxlora.LoraFactors(f.a, 0.2 * jax.random.normal(next(keys), f.b.shape), f.scale, f.roles, f.dropout)
        for p, f in lora.items()
    }
    return model, x, params, lora


def _reference(params, lora, x, fused=False):
    """The layer with NumPy, per token and expert, on ``W + s·B·A`` merged expert by expert."""
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items() if k != "router"}
    router = np.asarray(params["params"]["router"]["kernel"], np.float64)
    for path, f in lora.items():
        d = delta_reference(f.a, f.b, f.roles, f.scale)
        if path == "router":
            router = router + d
        else:
            p[path] = p[path] + d
    if fused:
        p["gate"], p["up"] = p["gate_up"][..., :FF], p["gate_up"][..., FF:]
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    for n, row in enumerate(x):
        logits = row @ router
        top = np.argsort(-logits, kind="stable")[:TOP_K]
        w = np.exp(logits[top] - logits[top].max())
        for e, we in zip(top, w / w.sum()):
            out[n] += we * ((silu(row @ p["gate"][e]) * (row @ p["up"][e])) @ p["down"][e])
    return out


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("merged", [False, True])
def test_values_against_numpy(fused, merged, maybe_jit, monkeypatch):
    monkeypatch.setattr(_matmul, "_MERGED", merged)  # factored form, and the transient W + ΔW per expert
    model, x, params, lora = _setup(fused)
    assert {p: f.roles for p, f in lora.items() if p != "router"} == {
        p: "sio" for p in (["gate_up"] if fused else ["gate", "up"]) + ["down"]
    }
    assert lora["down"].a.shape == (E, FF, 3) and lora["down"].b.shape == (E, 3, D)
    y = maybe_jit(lambda lora, x: jaxlora.apply(model.apply, params, lora, x))(lora, x)
    np.testing.assert_allclose(y, _reference(params, lora, x, fused), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_gradients_match_merged_reference(merged, monkeypatch):
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    model, x, params, lora = _setup(fused=True)
    loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731
    fast = jax.jit(jax.grad(lambda lora, x: loss(jaxlora.apply(model.apply, params, lora, x)), argnums=(0, 1)))
    plain = jax.grad(lambda lora, x: loss(model.apply(jaxlora.merge(params, lora), x)), argnums=(0, 1))
    assert_trees_close(fast(lora, x), plain(lora, x), rtol=1e-4, atol=1e-5)


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars)
        for v in eqn.params.values():
            for u in v if isinstance(v, (tuple, list)) else [v]:
                sub = getattr(u, "jaxpr", u)
                if hasattr(sub, "eqns"):
                    yield from _shapes(sub)


def test_no_expert_shaped_gradient(monkeypatch):
    """The backward pass computes factor-sized gradients only: no (experts, in, out) array at all."""
    monkeypatch.setattr(_matmul, "_MERGED", False)
    model, x, params, lora = _setup()
    jaxpr = jax.make_jaxpr(jax.grad(lambda lora: jnp.sum(jaxlora.apply(model.apply, params, lora, x) ** 2)))(lora)
    shapes = set(_shapes(jaxpr.jaxpr))
    assert (TOKENS * TOP_K, 3) in shapes  # the rank-r rows of the LoRA term are there
    assert not shapes & {(E, D, FF), (E, FF, D)}, shapes


def test_capacity_einsum():
    """Capacity-based MoE: ``einsum("ecd,edf->ecf")``, the expert axis a dot_general batch axis."""
    w = jax.random.normal(jax.random.key(0), (E, D, FF))
    params = {"experts": {"w": w}}
    x = jax.random.normal(jax.random.key(1), (E, 5, D))
    fn = lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["experts"]["w"])  # noqa: E731
    lora = jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=2, alpha=3.0), fn=fn, args=(x,))
    f = lora["experts/w"]
    f = jaxlora.LoraFactors(f.a, jax.random.normal(jax.random.key(3), f.b.shape), f.scale, f.roles)
    assert f.roles == "sio" and f.a.shape == (E, D, 2) and f.b.shape == (E, 2, FF)
    y = jax.jit(lambda lora: jaxlora.apply(fn, params, lora, x))({"experts/w": f})
    merged = np.asarray(w, np.float64) + delta_reference(f.a, f.b, f.roles, f.scale)
    np.testing.assert_allclose(y, np.einsum("ecd,edf->ecf", np.asarray(x, np.float64), merged), rtol=1e-4, atol=1e-5)


def test_contracted_ragged_axis():
    """``ragged_dot_general`` with the ragged axis contracted (a ragged_dot's weight-gradient form)."""
    w = jax.random.normal(jax.random.key(0), (TOKENS, FF))
    params = {"w": {"kernel": w}}
    x = jax.random.normal(jax.random.key(1), (TOKENS, D))
    sizes = jnp.array([3, 0, 4, 3], jnp.int32)
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=(0,), rhs_group_dimensions=()
    )
    fn = lambda p, x: lax.ragged_dot_general(x, p["w"]["kernel"], sizes, dims)  # noqa: E731
    # (experts, d, ff): for each group, x[rows]ᵀ · W[rows]
    lora = jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(x,))
    f = lora["w"]
    f = jaxlora.LoraFactors(f.a, jax.random.normal(jax.random.key(3), f.b.shape), f.scale, f.roles)
    y = jaxlora.apply(fn, params, {"w": f}, x)
    merged = np.asarray(w, np.float64) + delta_reference(f.a, f.b, f.roles, f.scale)
    bounds = np.cumsum([0, *np.asarray(sizes)])
    xn = np.asarray(x, np.float64)
    want = np.stack([xn[s:e].T @ merged[s:e] for s, e in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_split_rank_across_experts():
    _, _, _, lora = _setup(rank=8, expert_rank="split", rank_pattern={"router": 4})
    assert lora["gate"].a.shape == (E, D, 2) and lora["gate"].b.shape == (E, 2, FF)  # 8 // 4 experts
    assert lora["router"].a.shape == (D, 4)  # not an expert weight: its whole rank
    assert lora["gate"].scale == 2.0  # alpha / rank, as configured
    with pytest.raises(ValueError, match=r"'gate': rank 3 split across 4 experts .* use rank >= 4"):
        _setup(rank=3, expert_rank="split")
    with pytest.raises(ValueError, match="expert_rank must be"):
        jaxlora.LoraConfig(expert_rank="half")


def test_merge_unmerge_summary_mask():
    model, x, params, lora = _setup()
    merged = jaxlora.merge(params, lora)
    want = np.asarray(params["params"]["down"]) + delta_reference(lora["down"].a, lora["down"].b, "sio", 2.0)
    np.testing.assert_allclose(merged["params"]["down"], want, rtol=1e-5, atol=1e-6)
    assert_trees_close(jaxlora.unmerge(merged, lora), params, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        model.apply(merged, x), jaxlora.apply(model.apply, params, lora, x), rtol=1e-4, atol=1e-5
    )
    s = jaxlora.summary(params, lora)
    assert s.trainable == sum(f.a.size + f.b.size for f in lora.values())
    # one optax step on the LoRA tree alone
    opt = optax.adam(1e-2)
    grads = jax.grad(lambda lora: jnp.sum(jaxlora.apply(model.apply, params, lora, x) ** 2))(lora)
    updates, _ = opt.update(grads, opt.init(lora))
    assert jax.tree.structure(optax.apply_updates(lora, updates)) == jax.tree.structure(lora)


def test_shardings_follow_expert_axis():
    """Expert parallelism: the factors' expert axis takes W's mesh axis."""
    _, _, params, lora = _setup()
    specs = jax.tree.map(lambda _: None, params)
    specs["params"]["down"] = P("expert", "tensor", None)
    specs["params"]["gate"] = P("expert", None, "tensor")
    out = jaxlora.shardings(specs, lora)
    assert (out["down"].a, out["down"].b) == (P("expert", "tensor", None), P("expert", None, None))
    assert (out["gate"].a, out["gate"].b) == (P("expert", None, None), P("expert", None, "tensor"))


def test_orbax_round_trip(tmp_path):
    _, _, params, lora = _setup(fused=True)
    jaxlora.checkpoint.save(tmp_path / "ckpt", lora, params=params)
    back = jaxlora.checkpoint.restore(tmp_path / "ckpt", params=params)
    assert {p: f.roles for p, f in back.items()} == {p: f.roles for p, f in lora.items()}
    assert_trees_close(back, lora, rtol=0, atol=0)


def test_dropout_on_experts():
    model, x, params, lora = _setup()
    lora = {p: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, dropout=0.5) for p, f in lora.items()}
    with pytest.warns(UserWarning, match="LoRA dropout is off"):
        y0 = jaxlora.apply(model.apply, params, lora, x)
    y1 = jaxlora.apply(model.apply, params, lora, x, dropout_key=jax.random.key(5))
    g = jax.grad(lambda l: jnp.sum(jaxlora.apply(model.apply, params, l, x, dropout_key=jax.random.key(5))))(lora)
    assert not np.allclose(y0, y1) and np.all(np.isfinite(g["down"].a))


def test_errors():
    model, x, params, lora = _setup()
    bad = dict(lora, down=jaxlora.LoraFactors(jnp.zeros((FF, E, 3)), jnp.zeros((FF, 3, D)), 1.0, "iso"))
    with pytest.raises(ValueError, match=r"'down' .* used by `ragged_dot` with group axes"):
        jaxlora.apply(model.apply, params, bad, x)
    w = {"w": jnp.ones((TOKENS, D))}
    fn = lambda p, g: lax.ragged_dot(p["w"], g, jnp.array([5, 5], jnp.int32))  # noqa: E731
    with pytest.raises(ValueError, match=r"'w' is the ragged \(token\) operand of `ragged_dot`"):
        jaxlora.apply(fn, w, {"w": jaxlora.LoraFactors(jnp.ones((D, 1)), jnp.ones((1, TOKENS)), 1.0, "oi")},
                      jnp.ones((2, D, 3)))  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"'down': stacked-layer axis or expert axis \(roles 'sio'.*experts of a ragged_dot.*target_parameters",
    ):
        jaxlora.checkpoint.save_peft("/nonexistent/never", lora)


def test_dora_on_expert_weights_is_refused():
    model, x, params, _ = _setup()
    cfg = jaxlora.LoraConfig(rank=2, targets=["gate", "up", "down"], dora=True)
    lora = jaxlora.init(jax.random.key(2), params, cfg, fn=model.apply, args=(x,))
    with pytest.raises(jaxlora.UnsupportedError, match=r"'(gate|up|down)' has a DoRA magnitude .*ragged_dot"):
        jaxlora.apply(model.apply, params, lora, x)


def test_mixed_adapter_batches_are_refused_with_the_cause():
    """JAX cannot vmap ragged_dot with a shared weight; the error says so before JAX's own does."""
    model, x, params, lora = _setup()
    fn = lambda p, x: model.apply(p, x.reshape(-1, D)).reshape(x.shape)  # noqa: E731  (batch, tokens, d)
    xs = jnp.stack([x, 2 * x])
    with pytest.raises(NotImplementedError, match="ragged_dot vmap over any dim but 0"):
        jax.vmap(lambda x: fn(params, x))(xs)  # the JAX limitation itself, without jaxlora
    router_only = {"router": lora["router"]}  # experts not even targeted: the base ragged_dot cannot vmap
    for adapters in (lora, router_only):
        stk = jaxlora.stack({"a": adapters, "b": adapters})
        with pytest.raises(jaxlora.UnsupportedError, match=r"(?s)JAX cannot vmap `ragged_dot`.*one adapter at a time"):
            jaxlora.apply(fn, params, stk, xs, adapter_ids=jnp.array([0, 1]))
