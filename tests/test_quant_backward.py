"""What the backward pass keeps of a quantized base without remat: its codes, never a float weight.

A frozen quantized weight is dequantized where a matmul uses it; that matmul's backward pass keeps the
weight's stored form (codes and scales, which the caller holds anyway) and dequantizes it again for
``dx`` (`_matmul.factored`, `_matmul.frozen`), where autodiff used to keep each layer's float ``W``.
The gradients must be exactly those of keeping ``W`` (``_eval._STORED = False``).
"""

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from linen_models import MODELS

import jaxlora
from jaxlora import _quantized
from jaxlora._trace import _eval

L, D, H = 4, 64, 160  # layers, model width, hidden width: no activation has a weight's shape
WEIGHTS = {(D, H), (H, D)}
FORMATS = [("nf4", True), ("nf4", False), ("int8", None)]
FORMAT_IDS = ["nf4-dq", "nf4", "int8"]


class _Layer(nn.Module):  # "up" gets LoRA, "down" stays frozen (no LoRA on it)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(H, name="up", dtype=self.dtype, param_dtype=self.dtype)(x)
        return x + nn.Dense(D, name="down", dtype=self.dtype, param_dtype=self.dtype)(nn.gelu(h)), None


class _Stack(nn.Module):
    """``L`` scanned layers, then a float head; ``remat`` "" (none), "block" or "nested" (remat(scan(remat)))."""

    dtype: jnp.dtype = jnp.float32
    remat: str = ""

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(_Layer) if self.remat else _Layer
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        if self.remat == "nested":
            stack = nn.remat(stack)
        h = stack(dtype=self.dtype, name="layers")(x, None)[0]
        return nn.Dense(8, name="head", dtype=self.dtype, param_dtype=self.dtype)(h)


def _quantize(params, fmt, double_quant):
    return jaxlora.quantize(params, fmt, **({} if double_quant is None else {"double_quant": double_quant}))


def _setup(fmt, double_quant, dtype=jnp.float32, rows=24, remat="", dora=False):
    model = _Stack(dtype=dtype, remat=remat)
    x = jax.random.normal(jax.random.key(3), (rows, D), dtype)
    params = model.init(jax.random.key(0), x)
    q = _quantize(params, fmt, double_quant)
    assert isinstance(q["params"]["layers"]["down"]["kernel"], jaxlora.Quantized)
    config = jaxlora.LoraConfig(rank=4, targets="up", dora=dora)
    lora = jaxlora.init(jax.random.key(1), q, config, fn=model.apply, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.05, lora)  # B non-zero
    return model, q, lora, x


def _saved(f, *args) -> list[tuple[str, tuple[int, ...], str]]:
    """``(dtype, shape, where from)`` of each value the backward pass of ``f`` keeps (`print_saved_residuals`)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    found = re.findall(r"^(\w+)\[([\d,]*)\] (.*)$", out.getvalue(), re.M)
    return [(dtype, tuple(int(d) for d in shape.split(",") if d), src) for dtype, shape, src in found]


def _float_weights(saved, weights=WEIGHTS) -> list:
    """The saved floats shaped like a weight, a stack of them, or either transposed."""
    shapes = weights | {s[::-1] for s in weights}
    return [(t, s) for t, s, _ in saved if t[0] in "fb" and s[-2:] in shapes]


@pytest.mark.parametrize("rows", [24, 128], ids=["factored", "merged"])  # lora_op's two forms on XLA's path
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("fmt", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_without_remat_the_backward_keeps_the_codes_not_a_float_weight(fmt, double_quant, dtype, rows):
    model, q, lora, x = _setup(fmt, double_quant, dtype, rows)
    loss = lambda lora, x: jnp.sum(jaxlora.apply(model.apply, q, lora, x).astype(jnp.float32))  # noqa: E731
    saved = _saved(loss, lora, x)
    assert not _float_weights(saved), f"a float weight outlives the forward pass: {_float_weights(saved)}"
    codes = {q["params"]["layers"][name]["kernel"].codes.shape for name in ("up", "down")}
    kept = [(s, src) for t, s, src in saved if t in ("u8", "i8") and s in codes]
    assert kept and all("output of" not in src for _, src in kept), kept  # the stacks themselves, not copies
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lora, x))
    for k, n in WEIGHTS:  # and no stacked float weight at all, as with remat
        assert not re.search(rf"(f32|bf16)\[{L},{k},{n}\]", text), f"a stacked float ({L}, {k}, {n}) weight was formed"


def test_the_old_backward_kept_a_float_weight(monkeypatch):
    """The check above can fail: keeping ``W`` (as before) saves each layer's float weight."""
    monkeypatch.setattr(_eval, "_STORED", False)
    model, q, lora, x = _setup("nf4", True)
    loss = lambda lora, x: jnp.sum(jaxlora.apply(model.apply, q, lora, x))  # noqa: E731
    assert {s for _, s in _float_weights(_saved(loss, lora, x))} == {(L, D, H), (L, H, D)}


def test_peak_memory_stays_below_a_float_copy_of_the_stack():
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(512, name="w", use_bias=False)(x), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Wide, variable_axes={"params": 0}, split_rngs={"params": True}, length=8)
            return stack(name="s")(x, None)[0]

    model, x = Net(), jax.random.normal(jax.random.key(0), (8, 512))
    params = model.init(jax.random.key(1), x)
    stack = 8 * 512 * 512 * 4  # bytes of the stack as float32
    for fmt in ("nf4", "int8"):
        q = jaxlora.quantize(params, fmt)
        adapted = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=4, targets="w"), fn=model.apply, args=(x,))
        for lora in ({}, adapted):  # frozen, then with LoRA

            def loss(lora, x, q=q):
                return jnp.sum(jaxlora.apply(model.apply, q, lora, x))

            memory = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(lora, x).compile().memory_analysis()
            if memory is None:  # (a backend that reports none)
                pytest.skip("no memory_analysis on this backend")
            assert memory.temp_size_in_bytes < stack / 2, (fmt, bool(lora), memory.temp_size_in_bytes, stack)


def _loss(model, q, variant):
    """``loss(floats, lora, x)``: ``floats`` are ``q``'s float leaves (head, biases), by index."""
    leaves, treedef = jax.tree_util.tree_flatten(q, is_leaf=_quantized.is_quantized)
    floats = {i: v for i, v in enumerate(leaves) if not _quantized.is_quantized(v)}
    key = {"dropout_key": jax.random.key(7)} if variant == "dropout" else {}

    def loss(floats, lora, x):
        p = jax.tree_util.tree_unflatten(treedef, [floats.get(i, v) for i, v in enumerate(leaves)])
        return jnp.mean(jnp.square(jaxlora.apply(model.apply, p, lora, x, **key).astype(jnp.float32)))

    return loss, floats


def _both_ways(monkeypatch, f, *args):
    """``f(*args)`` jitted, keeping the stored form, then keeping ``W`` (as before)."""
    got = jax.jit(f)(*args)
    monkeypatch.setattr(_eval, "_STORED", False)
    want = jax.jit(f)(*args)
    monkeypatch.setattr(_eval, "_STORED", True)
    return got, want


def _assert_equal(got, want):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=str(path))


@pytest.mark.parametrize(
    ("rows", "remat", "variant"),
    [(24, "", "lora"), (128, "", "lora"), (24, "nested", "lora"), (128, "block", "dropout"), (24, "", "dora")],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("fmt", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_gradients_are_those_of_keeping_the_float_weight(monkeypatch, fmt, double_quant, dtype, rows, remat, variant):
    model, q, lora, x = _setup(fmt, double_quant, dtype, rows, remat, dora=variant == "dora")
    if variant == "dropout":
        lora = {k: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, dropout=0.3) for k, f in lora.items()}
    loss, floats = _loss(model, q, variant)
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))  # the head and biases, A and B (and m), x
    got, want = _both_ways(monkeypatch, grad, floats, lora, x)
    _assert_equal(got, want)
    # and as from the dequantized weights given as floats (these differ only where XLA compiles the
    # dequantization differently: NF4's double-quantized absmax, a multiply-add, may round otherwise)
    deq_loss, deq_floats = _loss(model, jaxlora.dequantize(q), variant)
    deq = jax.jit(jax.value_and_grad(deq_loss, argnums=(0, 1, 2)))({i: deq_floats[i] for i in floats}, lora, x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(deq)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(np.abs(w).max()))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_layer_kind_gives_the_gradients_of_keeping_the_float_weight(monkeypatch, kind, fmt, dora):
    model, make_x, target = MODELS[kind]
    x = make_x()
    if fmt == "int8" and kind.startswith("embed"):
        pytest.skip("int8 scales run along the last axis: fine for tables too, covered by nf4 here")
    if dora and kind == "embed_tied":
        pytest.skip("no DoRA on a tied table's attend (an error, tests/test_dora.py)")
    params = model.init(jax.random.key(0), x)
    q = jaxlora.quantize(params, fmt, block_size=2, targets=target)
    config = jaxlora.LoraConfig(rank=2, targets=target, dora=dora)
    lora = jaxlora.init(jax.random.key(1), q, config, fn=model.apply, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.3, lora)
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    for adapter in ({}, lora):  # the frozen weight, then the adapted one
        loss = lambda lora, x: jnp.sum(jnp.sin(jaxlora.apply(model.apply, q, lora, x)))  # noqa: E731
        grad = jax.grad(loss, argnums=(0, 1) if floating else 0)
        if adapter or floating:
            _assert_equal(*_both_ways(monkeypatch, grad, adapter, x))


def test_views_of_a_weight_keep_the_codes_too(monkeypatch):
    """A weight cast, transposed or sliced before its matmul (Hugging Face's (out, in) kernels, a bfloat16
    weight computed in float32): the view is taken again in the backward pass, from the codes."""

    def fn(p, x):
        def layer(h, w):
            up, down = w
            u = jnp.tanh(h @ up.astype(jnp.float32).T)  # stored (out, in) in bfloat16, used in float32
            return h + u @ down[:, :D], None  # a slice of a wider weight

        return jax.lax.scan(layer, x, (p["up"], p["down"]))[0]

    keys = jax.random.split(jax.random.key(0), 2)
    p = {"up": jax.random.normal(keys[0], (L, H, D), jnp.bfloat16) / 8, "down": jax.random.normal(keys[1], (L, H, 96))}
    x = jax.random.normal(jax.random.key(1), (24, D))
    for fmt in ("nf4", "int8"):
        q = jaxlora.quantize(p, fmt, fn=fn, args=(x,))
        assert all(isinstance(v, jaxlora.Quantized) for v in q.values())
        for targets in ("up", "down"):
            lora = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=4, targets=targets), fn=fn, args=(x,))
            lora = jax.tree_util.tree_map(lambda v: v + 0.05, lora)

            def loss(lora, x, q=q):
                return jnp.sum(jnp.sin(jaxlora.apply(fn, q, lora, x)))

            kept = _float_weights(_saved(loss, lora, x), {(H, D), (H, 96)})
            assert not kept, kept
            _assert_equal(*_both_ways(monkeypatch, jax.grad(loss, argnums=(0, 1)), lora, x))


def test_gradients_of_the_quantized_scales_are_unchanged(monkeypatch):
    """Differentiating the quantized leaves themselves (their float scales) still gives ``dW``'s share."""
    model, q, lora, x = _setup("int8", None)

    def loss(scales, lora, x):
        p = jax.tree_util.tree_map(lambda v: v, q)
        for name in ("up", "down"):
            w = p["params"]["layers"][name]["kernel"]
            p["params"]["layers"][name]["kernel"] = _quantized.Quantized(
                w.codes, scales[name], format=w.format, inner=w.inner, dtype=w.dtype
            )
        return jnp.sum(jnp.sin(jaxlora.apply(model.apply, p, lora, x)))

    scales = {name: q["params"]["layers"][name]["kernel"].scale for name in ("up", "down")}
    got, want = _both_ways(monkeypatch, jax.grad(loss, argnums=(0, 1, 2)), scales, lora, x)
    _assert_equal(got, want)
    assert all(float(jnp.abs(g).max()) > 0 for g in got[0].values())


class _NnxLayer(nnx.Module):
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(D, H, rngs=rngs), nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(x)))


class _NnxStack(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.split_rngs(splits=L)(nnx.vmap(_NnxLayer, in_axes=0, out_axes=0))(rngs)

    def __call__(self, x):
        return nnx.scan(lambda layer, h: layer(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, x)


@pytest.mark.parametrize(("fmt", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_nnx_scan_keeps_the_codes(monkeypatch, fmt, double_quant):
    graphdef, state = nnx.split(_NnxStack(nnx.Rngs(0)), nnx.Param)
    fn = jaxlora.nnx.call(graphdef)
    x = jax.random.normal(jax.random.key(1), (24, D))
    q = _quantize(state, fmt, double_quant)
    lora = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=4, targets="up"), fn=fn, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.05, lora)
    loss = lambda lora, x: jnp.sum(jnp.sin(jaxlora.apply(fn, q, lora, x)))  # noqa: E731
    saved = _saved(loss, lora, x)
    assert not _float_weights(saved), _float_weights(saved)
    _assert_equal(*_both_ways(monkeypatch, jax.grad(loss, argnums=(0, 1)), lora, x))
