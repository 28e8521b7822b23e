"""SGMV (a mixed batch's rows grouped by adapter, two ``lax.ragged_dot``s) and adapter ids per token.

Checked against NumPy per row (float64), and gradients against a plain JAX reference that gathers
each row's own factors; the SGMV programs are checked to group the whole batch at once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import jaxpr_parts

import jaxlora
from jaxlora import _matmul

FORMS = ["gather", "onehot", "sgmv"]


@pytest.fixture(params=FORMS)
def form(request, monkeypatch):
    monkeypatch.setattr(_matmul, "_STACK_FORM", request.param)
    return request.param


def _ragged_lhs(closed):
    """The lhs shape of every ``ragged_dot_general`` in a program (sub-jaxprs included)."""
    eqns, _ = jaxpr_parts(closed)
    return [tuple(e.invars[0].aval.shape) for e in eqns if str(e.primitive) == "ragged_dot_general"]


def _np_rows(x, ids, scale, a, b):
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    ids, scale = np.broadcast_to(ids, x.shape[:-1]), np.broadcast_to(scale, x.shape[:-1])
    out = np.zeros((*x.shape[:-1], b.shape[-1]))
    for r in np.ndindex(*x.shape[:-1]):
        out[r] = scale[r] * x[r] @ a[ids[r]] @ b[ids[r]]
    return out


@pytest.mark.parametrize("slots", [4, 40])  # every slot a group; the ids in use as groups (6 < 40)
def test_sgmv_under_vmap_groups_the_whole_batch_and_equals_numpy_per_row(slots):
    k = jax.random.split(jax.random.key(0), 4)
    a, b = jax.random.normal(k[0], (slots, 5, 2)), jax.random.normal(k[1], (slots, 2, 3))
    x = jax.random.normal(k[2], (6, 1, 7, 5))  # 6 examples of (1, 7) rows
    ids, scale = jnp.array([3, 0, 3, 1, 2, 0]), jnp.array([1.0, 2.0, 0.5, 0.0, -1.0, 2.0])
    one = lambda x, i, s, a, b: _matmul.sgmv(x, i.reshape(1, 1), s.reshape(1, 1), a, b)  # noqa: E731
    mapped = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    want = _np_rows(x, np.asarray(ids)[:, None, None], np.asarray(scale)[:, None, None], a, b)
    np.testing.assert_allclose(jax.jit(mapped)(x, ids, scale, a, b), want, rtol=1e-5, atol=1e-5)
    assert _ragged_lhs(jax.make_jaxpr(mapped)(x, ids, scale, a, b)) == [(42, 5), (42, 2)]  # 6·7 rows at once

    def loss(term, x, a, b):
        return jnp.sum(jnp.sin(term(x, ids, scale, a, b)))

    def reference(x, i, s, a, b):  # each example's own factors, gathered
        return s * jnp.einsum("ftk,kr,rn->ftn", x, a[i], b[i])

    got = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(mapped, x, a, b)
    want = jax.grad(loss, argnums=(1, 2, 3))(jax.vmap(reference, in_axes=(0, 0, 0, None, None)), x, a, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-4)
    unused = np.setdiff1d(np.arange(slots), ids)
    assert not np.asarray(got[1])[unused].any() and not np.asarray(got[2])[unused].any()


def test_sgmv_with_ids_per_row_and_an_inner_map_over_other_axes():
    k = jax.random.split(jax.random.key(1), 3)
    a, b = jax.random.normal(k[0], (3, 4, 2)), jax.random.normal(k[1], (3, 2, 5))
    x = jax.random.normal(k[2], (2, 6, 4))
    ids, scale = jnp.array([[0, 2, 2, 1, 0, 1], [1, 1, 0, 0, 2, 2]]), jnp.linspace(-1, 1, 12).reshape(2, 6)
    np.testing.assert_allclose(_matmul.sgmv(x, ids, scale, a, b), _np_rows(x, ids, scale, a, b), rtol=1e-5, atol=1e-5)
    # ids shared by the mapped axis (a map inside the model, such as over heads, not over the examples)
    got = jax.vmap(lambda x: _matmul.sgmv(x, ids[0], scale[0], a, b))(x)
    np.testing.assert_allclose(got, _np_rows(x, ids[0], scale[0], a, b), rtol=1e-5, atol=1e-5)


def _random(lora, seed):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(lora)))
    return {
        p: dataclasses.replace(
            f, a=jax.random.normal(next(keys), f.a.shape) / 2, b=jax.random.normal(next(keys), f.b.shape) / 2
        )
        for p, f in lora.items()
    }


def _attention():
    """A causal self-attention block on (batch, seq, d): tokens of one example interact."""
    d = 6
    keys = jax.random.split(jax.random.key(0), 4)
    params = {n: jax.random.normal(k, (d, d)) / 2 for n, k in zip("qkvo", keys)}

    def fn(p, x):
        q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
        s = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(d)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        h = jax.nn.softmax(jnp.where(causal[None], s, -1e9), axis=-1) @ v
        return jnp.tanh(h @ p["o"])

    adapters = {
        "sql": _random(jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=2)), 10),
        "chat": _random(
            jaxlora.init(jax.random.key(3), params, jaxlora.LoraConfig(rank=3, alpha=6, targets="q|v")), 11
        ),
        "math": _random(
            jaxlora.init(jax.random.key(4), params, jaxlora.LoraConfig(rank=1, alpha=0.5, targets="o")), 12
        ),
    }
    return params, fn, adapters


def _np_attention(params, adapters, names, x, ids):
    """Per example, each token's projections with the adapter of its own id, in float64."""
    x, ids = np.asarray(x, np.float64), np.asarray(ids)
    out = np.zeros_like(x)
    d = x.shape[-1]

    def w(name, i):
        m = np.asarray(params[name], np.float64)
        f = adapters[names[i]].get(name) if i >= 0 else None
        return m if f is None else m + f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)

    for e in range(x.shape[0]):
        proj = lambda n, h, e=e: np.stack([h[t] @ w(n, ids[e, t]) for t in range(h.shape[0])])  # noqa: E731
        q, k, v = proj("q", x[e]), proj("k", x[e]), proj("v", x[e])
        s = q @ k.T / np.sqrt(d) + np.where(np.tril(np.ones((len(q), len(q)))) > 0, 0, -1e9)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[e] = np.tanh(proj("o", (p / p.sum(-1, keepdims=True)) @ v))
    return out


def test_ids_per_token_in_an_attention_block_equal_numpy_per_token(form):
    params, fn, adapters = _attention()
    stk = jaxlora.stack(adapters)
    x = jax.random.normal(jax.random.key(5), (3, 5, 6))
    ids = jnp.array([[0, 0, 1, 1, -1], [2, 2, 2, 0, 1], [-1, -1, 1, 0, 2]])  # requests packed in rows
    traces = []

    def run(s, x, i):
        traces.append(1)
        return jaxlora.apply(fn, params, s, x, adapter_ids=i)

    run = jax.jit(run)
    got = run(stk, x, ids)
    np.testing.assert_allclose(got, _np_attention(params, adapters, stk.names, x, ids), rtol=2e-5, atol=2e-5)
    ids2 = jnp.array([[1, 2, 0, -1, 1], [0, 0, 0, 0, 0], [2, 1, 0, 1, 2]])
    got = run(stk, x, ids2)
    np.testing.assert_allclose(got, _np_attention(params, adapters, stk.names, x, ids2), rtol=2e-5, atol=2e-5)
    assert len(traces) == 1  # new ids: no retrace
    bad = np.asarray(run(stk, x, jnp.array([[0, 0, 1, 1, 3], [2, 2, 2, 0, 1], [-1, -1, 1, 0, 2]])))
    assert np.isnan(bad[0, 4]).all() and np.isfinite(bad[1:]).all()  # (token 4's NaN value reaches all of row 0)
    with pytest.raises(ValueError, match=r"adapter_ids \[3\] are out of range"):
        jaxlora.apply(fn, params, stk, x, adapter_ids=ids.at[0, 4].set(3))


def _per_token_reference(fn_names, params, stk, x, ids):
    """Per token, the attention block with each row's factors gathered from the stack (plain JAX)."""

    def proj(name, h, e):
        y = h @ params[name]
        if name not in stk.a:
            return y
        slot = jnp.clip(ids[e], 0, stk.slots - 1)
        scale = jnp.where(ids[e] >= 0, jnp.asarray(stk.scale[name])[slot], 0.0)
        a, b = stk.a[name][:, slot].transpose(1, 0, 2), stk.b[name][slot]  # (t, d, R), (t, R, d)
        return y + scale[:, None] * jnp.einsum("td,tdr,tro->to", h, a, b)

    outs = []
    for e in range(x.shape[0]):
        h = x[e]
        q, k, v = proj("q", h, e), proj("k", h, e), proj("v", h, e)
        s = q @ k.T / np.sqrt(h.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((len(h), len(h)), bool)), s, -1e9)
        outs.append(jnp.tanh(proj("o", jax.nn.softmax(s, axis=-1) @ v, e)))
    return jnp.stack(outs)


def test_ids_per_token_gradients_reach_each_tokens_own_adapter(form):
    params, fn, adapters = _attention()
    stk = jaxlora.stack(adapters)
    x = jax.random.normal(jax.random.key(6), (2, 4, 6))
    ids = jnp.array([[0, 1, -1, 1], [2, 2, 0, 0]])
    loss = lambda s: jnp.sum(jnp.sin(3 * jaxlora.apply(fn, params, s, x, adapter_ids=ids)))  # noqa: E731
    want = jax.grad(lambda s: jnp.sum(jnp.sin(3 * _per_token_reference("qkvo", params, s, x, ids))))(stk)
    got = jax.jit(jax.grad(loss))(stk)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_ids_per_token_follow_rows_a_model_flattens():
    params, fn, adapters = _attention()
    stk = jaxlora.stack(adapters)
    flat = lambda p, x: (x.reshape(-1, x.shape[-1]) @ p["q"]).reshape(*x.shape[:-1], -1)  # noqa: E731
    x, ids = jax.random.normal(jax.random.key(7), (2, 3, 6)), jnp.array([[0, 1, 2], [2, -1, 0]])
    got = jaxlora.apply(flat, params, stk, x, adapter_ids=ids)
    for e in range(2):
        for t in range(3):
            i = int(ids[e, t])
            want = x[e, t] @ params["q"]
            if i >= 0:
                f = adapters[stk.names[i]].get("q")
                want = want if f is None else want + f.scale * x[e, t] @ f.a @ f.b
            np.testing.assert_allclose(got[e, t], want, rtol=2e-5, atol=2e-5)


def test_ids_per_token_are_refused_where_the_rows_cannot_be_followed():
    params, fn, adapters = _attention()
    stk = jaxlora.stack(adapters)
    x, ids = jnp.ones((2, 6, 6)), jnp.zeros((2, 6), jnp.int32)
    wide = {"w": jnp.ones((6, 3))}
    across = lambda p, x: jnp.swapaxes(x, 1, 2) @ p["w"]  # noqa: E731  (contracts the tokens)
    wide_stk = jaxlora.stack({"one": jaxlora.init(jax.random.key(0), wide, jaxlora.LoraConfig(rank=2))})
    with pytest.raises(
        jaxlora.UnsupportedError, match=r"(?s)per token \(\(6,\) per example\).*'w'.*free axes \(1, 5\)"
    ):
        jaxlora.apply(across, wide, wide_stk, x[:, :, :5], adapter_ids=ids)
    with pytest.raises(jaxlora.UnsupportedError, match=r"free axes \(1, 6\) do not start with the token axes \(5,\)"):
        jaxlora.apply(fn, params, stk, x, adapter_ids=jnp.zeros((2, 5), jnp.int32))
    conv_params = {"k": jnp.ones((3, 6, 6))}
    conv = lambda p, x: jax.lax.conv_general_dilated(x, p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))  # noqa: E731
    conv_lora = jaxlora.init(
        jax.random.key(0), conv_params, jaxlora.LoraConfig(rank=2, targets="k"), fn=conv, args=(x,)
    )
    conv_stk = jaxlora.stack({"one": conv_lora})
    with pytest.raises(jaxlora.UnsupportedError, match="an op other than a dot_general without batch axes"):
        jaxlora.apply(conv, conv_params, conv_stk, x, adapter_ids=ids)


def test_sgmv_decode_reads_each_adapter_in_use_once_for_the_whole_batch(monkeypatch):
    """The program of a mixed batch under SGMV: each op's two ragged_dots see every example's rows,
    and no per-example copy of the factors (batch, d, R) is made."""
    monkeypatch.setattr(_matmul, "_STACK_FORM", "sgmv")
    params, fn, adapters = _attention()
    stk = jaxlora.stack(adapters, rank=4)
    x, ids = jnp.ones((5, 1, 6)), jnp.array([0, 2, -1, 1, 0])
    jaxpr = jax.make_jaxpr(lambda s, x, i: jaxlora.apply(fn, params, s, x, adapter_ids=i))(stk, x, ids)
    assert sorted(set(_ragged_lhs(jaxpr))) == [(5, 4), (5, 6)]  # 5 rows (1 token each) at once
    assert len(_ragged_lhs(jaxpr)) == 2 * 4  # q, k, v, o: shrink and expand each
    eqns, _ = jaxpr_parts(jaxpr)
    copies = [e for e in eqns for v in e.outvars if tuple(getattr(v.aval, "shape", ())) == (5, 6, 4)]
    assert copies == []


def test_a_batch_without_rows_gives_empty_outputs_and_zero_gradients(form):
    params, fn, adapters = _attention()
    stk = jaxlora.stack(adapters)
    for ids, x in (  # no examples; examples of no tokens (ids per token)
        (jnp.zeros((0,), jnp.int32), jnp.ones((0, 5, 6))),
        (jnp.zeros((2, 0), jnp.int32), jnp.ones((2, 0, 6))),
    ):
        out = jax.jit(lambda s, x, i: jaxlora.apply(fn, params, s, x, adapter_ids=i))(stk, x, ids)
        assert out.shape == x.shape
        grads = jax.grad(lambda s, x=x, i=ids: jnp.sum(jaxlora.apply(fn, params, s, x, adapter_ids=i)))(stk)
        assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_stack_form_by_cost_and_forced(monkeypatch):
    big = 8 * 16 * 8192
    assert _matmul.stack_form(64, 1, big, 2, 8) == "gather"  # the CPU: measured, the gather everywhere
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _matmul.stack_form(64, 1, big, 2, 8) == "onehot"  # decode over a small stack
    assert _matmul.stack_form(8, 1024, big, 2, 8) == "gather"  # prefill
    monkeypatch.setattr(_matmul, "_SGMV_BY_COST", True)
    assert _matmul.stack_form(8, 1024, big, 2, 8) == "sgmv"
    assert _matmul.stack_form(8, 1024, big, 2, 8, sgmv=False) == "gather"
    monkeypatch.setattr(_matmul, "_STACK_FORM", "sgmv")
    assert _matmul.stack_form(8, 1024, big, 2, 8, sgmv=False) == "gather"  # forced, where the op has it
    monkeypatch.setattr(_matmul, "_STACK_FORM", "onehot")
    assert _matmul.stack_form(8, 1024, big, 2, 8) == "onehot"
    monkeypatch.setattr(_matmul, "_STACK_FORM", "bgmv")
    with pytest.raises(
        ValueError, match=r"_STACK_FORM must be None or one of \('gather', 'onehot', 'sgmv'\), got 'bgmv'"
    ):
        _matmul.stack_form(8, 1024, big, 2, 8)


@pytest.mark.slow
def test_sgmv_gradient_through_scan_and_remat_is_each_adapters_own(monkeypatch):
    from test_stack import _scanned

    monkeypatch.setattr(_matmul, "_STACK_FORM", "sgmv")
    model, tokens, params, adapters = _scanned()
    # factors of a third-ish size: with N(0, 1) ones the gradients reach 1e5, where float32 rounding
    # alone (each program's own order of sums) exceeds the 1e-4 tolerance on the smallest entries
    adapters = jax.tree.map(lambda t: 0.3 * t, adapters)
    stk = jaxlora.stack(adapters)
    ids = jnp.array([2, 0, 0, 1])
    target = jax.random.normal(jax.random.key(3), (4, 3, 10))
    loss = lambda s: jnp.sum((jaxlora.apply(model.apply, params, s, tokens, adapter_ids=ids) - target) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(stk)
    assert (12, 8) in _ragged_lhs(jaxpr)  # the scanned, rematerialized Dense: 4 examples x 3 tokens at once
    grads = jaxlora.unstack(jax.jit(jax.grad(loss))(stk))
    for j, name in enumerate(stk.names):
        rows = np.flatnonzero(np.asarray(ids) == j)
        alone = jax.grad(
            lambda f, r=rows: jnp.sum((jaxlora.apply(model.apply, params, f, tokens[r]) - target[r]) ** 2)
        )(adapters[name])
        for path in alone:
            np.testing.assert_allclose(grads[name][path].a, alone[path].a, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(grads[name][path].b, alone[path].b, rtol=1e-4, atol=1e-4)
