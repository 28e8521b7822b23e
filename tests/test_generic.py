"""LoRA on any JAX function: equinox-style and haiku-style models, JAX transforms, views of W, refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, delta_reference
from jax import lax

import jaxlora

D, L = 4, 3


def _weights(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 0.5


def _x(shape=(2, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _lora(params, fn, x, targets="all-linear", rank=2):
    """LoRA factors with a non-zero B, so the LoRA branch contributes."""
    lora = jaxlora.init(
        jax.random.key(2), params, jaxlora.LoraConfig(rank=rank, alpha=3.0, targets=targets), fn=fn, args=(x,)
    )
    return {
        p: dataclasses.replace(f, b=jax.random.normal(jax.random.key(7 + i), f.b.shape))
        for i, (p, f) in enumerate(sorted(lora.items()))
    }


def _numpy_merged(params, lora):
    """params with each targeted W replaced by W + ΔW, ΔW from NumPy."""
    found = jaxlora._tree.weights(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for path, f in lora.items():
        i = found[path].index
        leaves[i] = jnp.asarray(
            np.asarray(leaves[i], np.float64) + delta_reference(f.a, f.b, f.roles, f.scale), jnp.float32
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check(fn, params, x, lora, maybe_jit=lambda f: f, rtol=2e-5):
    """apply equals fn on NumPy-merged weights, and the LoRA branch is not a no-op."""
    got = maybe_jit(lambda p, l, x: jaxlora.apply(fn, p, l, x))(params, lora, x)
    want = fn(_numpy_merged(params, lora), x)
    assert not np.allclose(want, fn(params, x), atol=1e-3), "the LoRA branch should change the output"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------- models written without Flax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:  # equinox-style: weight (out, in), bias, called on one example
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return self.weight @ x + self.bias


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLP:
    layers: list

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


def _mlp():
    return MLP([Linear(_weights((8, D), 0), jnp.zeros(8)), Linear(_weights((3, 8), 1), jnp.zeros(3) + 0.1)])


def test_equinox_style_module(maybe_jit):
    model, x = _mlp(), _x()
    fn = lambda m, x: jax.vmap(m)(x)  # equinox calls a module on one example and vmaps it
    lora = _lora(model, fn, x)
    assert sorted(lora) == ["layers/0", "layers/1"]
    assert lora["layers/0"].roles == "oi" and lora["layers/0"].a.shape == (D, 2)
    _check(fn, model, x, lora, maybe_jit)


def test_equinox_style_against_plain_numpy():
    model, x = _mlp(), _x()
    fn = lambda m, x: jax.vmap(m)(x)
    lora = _lora(model, fn, x)
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(model.layers):
        f = lora[f"layers/{i}"]
        w, a, b = (np.asarray(v, np.float64) for v in (layer.weight, f.a, f.b))
        h = h @ w.T + f.scale * (h @ a) @ b + np.asarray(layer.bias)  # W·x + scale·B·A·x, PEFT's orientation
        if i == 0:
            h = np.asarray(jax.nn.gelu(h))
    np.testing.assert_allclose(jaxlora.apply(fn, model, lora, x), h, rtol=1e-5, atol=1e-5)


def _haiku_style(params, x):  # a transformed haiku function: nested dicts, "w" and "b"
    h = jax.nn.relu(jnp.dot(x, params["mlp/~/linear_0"]["w"]) + params["mlp/~/linear_0"]["b"][None])
    return jnp.dot(h, params["mlp/~/linear_1"]["w"]) + params["mlp/~/linear_1"]["b"][None]


def test_haiku_style_names_with_a_slash_are_refused():
    params = {"mlp/~/linear_0": {"w": _weights((D, 8)), "b": jnp.zeros(8)}}
    with pytest.raises(ValueError, match="contain '/'"):
        jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))


def test_haiku_style_function(maybe_jit):
    params = {
        name: {"w": _weights(shape, i), "b": jnp.zeros(shape[1])}
        for i, (name, shape) in enumerate([("linear_0", (D, 8)), ("linear_1", (8, 3))])
    }
    fn = lambda p, x: _haiku_style({f"mlp/~/{k}": v for k, v in p.items()}, x)
    lora = _lora(params, fn, x := _x())
    assert sorted(lora) == ["linear_0/w", "linear_1/w"]  # haiku's "w" is no weight name: it stays in the path
    _check(fn, params, x, lora, maybe_jit)


# --------------------------------------------------------------------------- transforms inside fn


def _scan(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]


def _remat_scan(p, x):
    return lax.scan(jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None)), x, p["w"])[0]


def _fori(p, x):  # W[i] with a traced i: dynamic_slice + squeeze of the stacked axis
    return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ p["w"][i]), x)


def _python_loop(p, x):  # W[0], W[1], ...: static slices
    for i in range(L):
        x = jnp.tanh(x @ p["w"][i])
    return x


def _cond(p, x):
    return lax.cond(x.sum() > 0, lambda h: jnp.sin(h @ p["w"][0]), lambda h: jnp.cos(h @ p["w"][1]), x)


def _nested_jit(p, x):
    inner = jax.jit(lambda w, h: jnp.tanh(h @ w))
    return jax.jit(lambda w, h: inner(w[1], inner(w[0], h)))(p["w"], x)


def _checkpoint(p, x):
    return jax.checkpoint(lambda w, h: jnp.tanh(h @ w[0]) @ w[2], policy=jax.checkpoint_policies.nothing_saveable)(
        p["w"], x
    )


@jax.custom_jvp
def _matmul_jvp(h, w):
    return h @ w


_matmul_jvp.defjvp(
    lambda primals, tangents: (_matmul_jvp(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1])
)


@jax.custom_vjp
def _matmul_vjp(h, w):
    return h @ w


_matmul_vjp.defvjp(lambda h, w: (h @ w, (h, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def _vmap_batched(p, x):  # an ensemble: each layer sees its own input
    xs = jnp.broadcast_to(x, (L, *x.shape)) * jnp.arange(1.0, L + 1)[:, None, None]
    return jax.vmap(lambda w, h: h @ w)(p["w"], xs)


TRANSFORMS = {
    "scan": _scan,
    "remat_scan": _remat_scan,
    "fori_loop": _fori,
    "python_loop": _python_loop,
    "cond": _cond,
    "nested_jit": _nested_jit,
    "checkpoint": _checkpoint,
    "custom_jvp": lambda p, x: jnp.tanh(_matmul_jvp(x, p["w"][0])),
    "custom_vjp": lambda p, x: jnp.tanh(_matmul_vjp(x, p["w"][1])),
    "vmap": _vmap_batched,
    "optimization_barrier": lambda p, x: jnp.tanh(x @ lax.optimization_barrier((p["w"], x))[0][2]),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_over_a_stacked_weight(name, maybe_jit):
    fn, params, x = TRANSFORMS[name], {"w": _weights((L, D, D))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "sio", "the layer axis is a stacked axis: one A and B per layer"
    assert lora["w"].a.shape == (L, D, 2) and lora["w"].b.shape == (L, 2, D)
    _check(fn, params, x, lora, maybe_jit)


@pytest.mark.parametrize(
    "name",
    [
        "scan",
        "remat_scan",
        "python_loop",
        "cond",
        "nested_jit",
        "checkpoint",
        "custom_jvp",
        "custom_vjp",
        "optimization_barrier",
    ],
)
def test_gradients_through_transforms_match_the_merged_model(name):
    fn, params, x = TRANSFORMS[name], {"w": _weights((L, D, D))}, _x()
    lora = _lora(params, fn, x)
    got = jax.grad(lambda l: jnp.sum(jaxlora.apply(fn, params, l, x) ** 2))(lora)
    want = jax.grad(lambda l: jnp.sum(fn(jaxlora.merge(params, l), x) ** 2))(lora)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(lora)  # grads on A and B only
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_while_loop(maybe_jit):
    def fn(p, x):
        body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"][c[0] % 2]))
        return lax.while_loop(lambda c: c[0] < 4, body, (0, x))[1]

    params, x = {"w": _weights((2, D, D))}, _x()
    _check(fn, params, x, _lora(params, fn, x), maybe_jit)


def test_vmap_over_layers_with_a_shared_input_factors_the_flattened_weight():
    # vmap(in_axes=(0, None)) makes one dot_general whose layer axis is an output axis: the trace cannot
    # tell it from an (in, layers, out) kernel, so A is shared across the layers. Documented; still exact.
    fn, params, x = (lambda p, x: jax.vmap(lambda w: x @ w)(p["w"])), {"w": _weights((L, D, D))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "oio"
    _check(fn, params, x, lora)


# --------------------------------------------------------------------------- views of W: reshape, slices


def test_reshape_that_splits_the_output_axis(maybe_jit):
    fn = lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"].reshape(D, 2, 4))
    params, x = {"w": _weights((D, 8))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "io"
    _check(fn, params, x, lora, maybe_jit)


def test_reshape_that_merges_the_head_axes(maybe_jit):
    fn = lambda p, x: x @ p["w"].reshape(D, 8)  # a (d, heads, head_dim) kernel used as (d, heads * head_dim)
    params, x = {"w": _weights((D, 2, 4))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "ioo" and lora["w"].b.shape == (2, 2, 4)
    _check(fn, params, x, lora, maybe_jit)


def test_reshape_after_a_transpose_and_inside_a_scan(maybe_jit):
    def fn(p, x):
        step = lambda h, w: (jnp.tanh(jnp.einsum("bhk,hko->bo", h.reshape(2, 2, 2), w.T.reshape(2, 2, D))), None)
        return lax.scan(step, x, p["w"])[0]

    params, x = {"w": _weights((L, D, D))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "soi"
    _check(fn, params, x, lora, maybe_jit)


def test_stacked_axis_split_by_a_reshape_into_nested_scans(maybe_jit):
    def fn(p, x):  # 6 layers run as 3 groups of 2: two stacked axes, one per scan
        inner = lambda h, w: (jnp.tanh(h @ w), None)
        return lax.scan(lambda h, ws: (lax.scan(inner, h, ws)[0], None), x, p["w"].reshape(3, 2, D, D))[0]

    params, x = {"w": _weights((6, D, D))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "sio" and lora["w"].a.shape == (6, D, 2)
    _check(fn, params, x, lora, maybe_jit)


def test_fused_qkv_split_and_slice(maybe_jit):
    def fn(p, x):
        q, k, v = jnp.split(p["qkv"], 3, axis=1)
        return jax.nn.softmax((x @ q) * (x @ k)) * (x @ v) + x @ p["out"][:, 2:6]

    params, x = {"qkv": _weights((D, 12)), "out": _weights((D, 8), 3)}, _x()
    lora = _lora(params, fn, x)
    assert lora["qkv"].b.shape == (2, 12), "one LoRA for the fused weight, as PEFT does for a fused Linear"
    _check(fn, params, x, lora, maybe_jit, rtol=1e-4)


def test_dtype_cast_and_transpose_of_the_weight():
    fn = lambda p, x: (x.astype(jnp.bfloat16) @ p["w"].T.astype(jnp.bfloat16)).astype(jnp.float32)
    params, x = {"w": _weights((6, D))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "oi"
    _check(fn, params, x, lora, rtol=5e-2)


# --------------------------------------------------------------------------- refusals and the merge fallback


def _lora_for_matmul(shape):
    params = {"w": _weights(shape)}
    return params, _lora(params, lambda p, x: x @ p["w"], _x((2, shape[0])))


REFUSALS = {
    "elementwise": (lambda p, x: x @ (2.0 * p["w"]), "used by `mul`"),
    "reduction": (lambda p, x: x @ p["w"] + jnp.sum(p["w"] ** 2), "used by `integer_pow`"),
    "slice_then_mul": (lambda p, x: x[:, :2] @ (2.0 * p["w"][1:3]), "used by `mul`"),
    "reshape_then_mul": (lambda p, x: x @ (2.0 * p["w"].reshape(D, 2, 2)).reshape(D, D), "used by `mul`"),
    "returned": (lambda p, x: (x @ p["w"], p["w"]), "returned by the function"),
    "loop_carry": (
        lambda p, x: lax.scan(lambda w, _: (jnp.tanh(w), None), p["w"], None, length=2)[0],
        "carried through a loop",
    ),
    "regroup_reshape": (lambda p, x: x[:, :2] @ p["w"].reshape(2, 2 * D), r"reshaped from \(4, 4\) to \(2, 8\)"),
    "conv_input": (
        lambda p, x: lax.conv_general_dilated(p["w"].reshape(1, 1, D, D), jnp.ones((1, 1, 1, 1)), (1, 1), "VALID"),
        "the input \\(not the kernel\\) of a convolution",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_unsupported_use_raises_naming_op_and_path(name):
    params, lora = _lora_for_matmul((D, D))
    fn, message = REFUSALS[name]
    with pytest.raises(jaxlora.UnsupportedError, match=rf"LoRA weight 'w' is {message}.*unsupported=\"merge\""):
        jaxlora.apply(fn, params, lora, _x())


@pytest.mark.parametrize(
    "name", ["elementwise", "reduction", "regroup_reshape", "conv_input", "slice_then_mul", "reshape_then_mul"]
)
def test_merge_fallback_uses_the_merged_weight_for_that_use(name, maybe_jit):
    params, lora = _lora_for_matmul((D, D))
    fn, x = REFUSALS[name][0], _x()
    got = maybe_jit(lambda p, l, x: jaxlora.apply(fn, p, l, x, unsupported="merge"))(params, lora, x)
    np.testing.assert_allclose(got, fn(_numpy_merged(params, lora), x), rtol=2e-5, atol=2e-5)


def test_merge_fallback_only_where_needed_and_gradients_flow():
    params, lora = _lora_for_matmul((D, D))
    fn, x = REFUSALS["reduction"][0], _x()
    got = jax.grad(lambda l: jnp.sum(jaxlora.apply(fn, params, l, x, unsupported="merge")))(lora)
    want = jax.grad(lambda l: jnp.sum(fn(jaxlora.merge(params, l), x)))(lora)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_lora_weights_multiplied_together():
    params = {"u": _weights((D, D)), "v": _weights((D, D), 1)}
    lora = _lora(params, lambda p, x: x @ p["u"] @ p["v"], _x())
    with pytest.raises(jaxlora.UnsupportedError, match=r"multiplies two LoRA weights \['u', 'v'\]"):
        jaxlora.apply(lambda p, x: x @ (p["u"] @ p["v"]), params, lora, _x())


def test_reshape_merging_input_and_output_axes():
    params = {"w": _weights((D, 2, 4))}
    lora = _lora(params, lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"]), _x())
    assert lora["w"].roles == "ioo"
    with pytest.raises(
        jaxlora.UnsupportedError,
        match=r"'w'.*`reshape` \(4, 2, 4\) -> \(8, 4\), merging axes of different roles \('io'\)",
    ):
        jaxlora.apply(lambda p, x: jnp.concatenate([x, x], 1) @ p["w"].reshape(8, 4), params, lora, _x())


def test_contraction_mixing_input_and_output_axes():
    params = {"w": _weights((D, 2, 4))}
    lora = _lora(params, lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"]), _x())
    with pytest.raises(
        jaxlora.UnsupportedError, match="`dot_general` contracting axes .* mix its input and output axes"
    ):
        jaxlora.apply(lambda p, x: jnp.einsum("bdh,dhk->bk", jnp.ones((2, D, 2)), p["w"]), params, lora, _x())


def test_scan_over_a_non_stacked_axis():
    params = {"w": _weights((L, D, D))}
    lora = _lora(params, _scan, _x())
    fn = lambda p, x: lax.scan(lambda c, w: (c, x @ w), 0.0, jnp.swapaxes(p["w"], 0, 2))[1]
    with pytest.raises(
        jaxlora.UnsupportedError, match="`scan` scanning over its axis 2, which is not its leading stacked"
    ):
        jaxlora.apply(fn, params, lora, _x())


def test_grouped_convolution_kernel():
    conv = lambda w, x, groups: lax.conv_general_dilated(
        x, w, (1,), "SAME", feature_group_count=groups, dimension_numbers=("NWC", "WIO", "NWC")
    )
    params, x = {"w": _weights((3, 2, 4))}, _x((1, 5, 2))
    lora = _lora(params, lambda p, x: conv(p["w"], x, 1), x, targets="w")
    with pytest.raises(jaxlora.UnsupportedError, match="'w' is the kernel of a grouped convolution"):
        jaxlora.apply(lambda p, x: conv(p["w"], jnp.concatenate([x, x], -1), 2), params, lora, x)


@pytest.mark.slow
def test_example_plain_jax_finetune():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "plain_jax_finetune.py"
    spec = importlib.util.spec_from_file_location("plain_jax_finetune", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plain_jax_finetune"] = module
    spec.loader.exec_module(module)
    result = module.main(lora_steps=60, rank=4)
    assert result["loss_after"] < 0.5 * result["loss_before"], result
    assert result["merged_vs_unmerged_max_abs"] < 1e-4


def test_gather_that_is_not_a_row_lookup():
    params, lora = _lora_for_matmul((D, D))
    with pytest.raises(jaxlora.UnsupportedError, match="'w'.*`gather` in a way other than a row lookup"):
        jaxlora.apply(lambda p, x: x @ jnp.take(p["w"], jnp.array([2, 0, 1, 3]), axis=1), params, lora, _x())


def test_matmul_that_does_not_batch_over_the_stacked_axis():
    params = {"w": _weights((L, D, D))}
    lora = _lora(params, _scan, _x())
    with pytest.raises(jaxlora.UnsupportedError, match=r"'w'.*`dot_general` with batch axes \(\) that are not exactly"):
        jaxlora.apply(lambda p, x: jnp.einsum("bd,ldo->lbo", x, p["w"]), params, lora, _x())


# --------------------------------------------------------------------------- weights handed back by inner calls


def _jit_hands_back(p, x):
    w, h = jax.jit(lambda w, h: (w, jnp.tanh(h @ w[0])))(p["w"], x)
    return h @ w[1]


def _remat_hands_back(p, x):
    w, h = jax.checkpoint(lambda w, h: (w, jnp.tanh(h @ w[0])))(p["w"], x)
    return h @ w[2]


def _scan_hands_back(p, x):  # nnx.scan returns the layer state as the stacked output, like this
    h, ws = lax.scan(lambda h, w: (jnp.tanh(h @ w), w), x, p["w"])
    return h @ ws[1]


def _cond_hands_back(p, x):
    w, h = lax.cond(x.sum() > 0, lambda w, h: (w, h @ w[0]), lambda w, h: (w, -h @ w[1]), p["w"], x)
    return jnp.tanh(h) @ w[2]


@pytest.mark.parametrize("fn", [_jit_hands_back, _remat_hands_back, _scan_hands_back, _cond_hands_back])
def test_a_weight_handed_back_unchanged_keeps_its_lora(fn, maybe_jit):
    params, x = {"w": _weights((L, D, D))}, _x()
    lora = _lora(params, fn, x)
    assert lora["w"].roles == "sio"
    _check(fn, params, x, lora, maybe_jit)


def test_a_weight_handed_back_by_only_one_branch():
    params, lora = _lora_for_matmul((D, D))
    fn = lambda p, x: x @ lax.cond(x.sum() > 0, lambda w: w, lambda w: jnp.zeros_like(w), p["w"])
    with pytest.raises(jaxlora.UnsupportedError, match="'w' is returned unchanged by only some branches of a `cond`"):
        jaxlora.apply(fn, params, lora, _x())


def test_a_stacked_slice_handed_to_the_carry():
    params = {"w": _weights((L, D, D))}
    lora = _lora(params, _scan, _x())
    fn = lambda p, x: x @ lax.scan(lambda c, w: (w, None), jnp.zeros((D, D)), p["w"])[0]
    with pytest.raises(jaxlora.UnsupportedError, match="'w' is carried through a loop"):
        jaxlora.apply(fn, params, lora, _x())


@pytest.mark.parametrize("spelling", ["named", "bare"])
def test_scan_operand_counts_in_both_spellings(spelling):
    """``scan_counts``, what the rewrite reads: JAX <= 0.10 names num_consts/num_carry in the scan
    equation's params, JAX >= 0.11 does not (they are read off the avals). Both spellings are built
    from this JAX's own equation, so each runs on every supported version."""
    import types

    from jaxlora._trace import scan_counts

    def f(w, c, x):  # one loop constant (c), one carry, two scanned operands (x, w)
        return lax.scan(lambda carry, xw: (carry + jnp.sum(xw[0] @ xw[1]) * c, xw[0] @ xw[1]), jnp.zeros(()), (x, w))

    jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 4, 5)), jnp.ones(()), jnp.ones((3, 2, 4)))
    eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
    assert scan_counts(eqn) == (1, 1)  # this JAX's own spelling
    params = {k: v for k, v in eqn.params.items() if k not in ("num_consts", "num_carry")}
    if spelling == "named":
        params.update(num_consts=1, num_carry=1)
    assert scan_counts(types.SimpleNamespace(params=params, invars=eqn.invars, outvars=eqn.outvars)) == (1, 1)
