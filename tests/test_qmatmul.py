"""The fused dequantize-and-multiply kernel (`jaxlora._qmatmul`) in Pallas's interpreter, against exact products."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_with_devices

import jaxlora
from jaxlora import _qmatmul
from jaxlora._quantized import dequantize_weight
from jaxlora._quantized import layer as layer_of


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(_qmatmul, "_MODE", "interpret")


def _quantized(fmt, block, double_quant, dtype, shape=(128, 384), seed=0):
    w = (jax.random.normal(jax.random.key(seed), shape) * 0.05).astype(dtype)
    kw = {} if fmt == "int8" else dict(block_size=block, double_quant=double_quant)
    return jaxlora.quantize({"w": w}, fmt, targets="w", **kw)["w"]


def _check(y, x, q, transpose=False, folded=None):
    """``y`` against the float64 product of ``x`` and the dequantized ``W`` (the values XLA's path multiplies).

    Both sides multiply the same ``W`` (the kernel dequantizes each tile to `dequantize_weight`'s values),
    so they differ only by float32 accumulation (``K·eps32`` of ``|x|·|W|``) and by the output's one
    rounding to its dtype (half an ulp: ``2**-9`` relative in bfloat16; the bound allows ``2**-8``).
    ``folded`` (default: one row forward under `_qmatmul.FOLD`): the one-row kernel never rounds ``W`` to
    ``x``'s dtype, so its ``W`` is the float32 one.
    """
    if folded is None:
        folded = _qmatmul._folded(x.shape[0], transpose)
    w = np.asarray(dequantize_weight(q, jnp.float32 if folded else x.dtype), np.float64)
    w = w.T if transpose else w
    x64 = np.asarray(x, np.float64)
    exact, scale = x64 @ w, np.abs(x64) @ np.abs(w)
    out_eps = 0.0 if y.dtype == jnp.float32 else 2.0**-8
    bound = out_eps * np.abs(exact) + 4 * w.shape[0] * 2.0**-24 * scale + 1e-30
    err = np.abs(np.asarray(y, np.float64) - exact)
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert np.all(err <= bound), f"max error {err.max():.3g}, at most {(err / bound).max():.3g} of the bound"


LAYOUTS = [  # format, NF4 block size, double quantization, dtype
    ("nf4", 64, True, jnp.bfloat16),  # bitsandbytes' default; its 3 absmax groups change mid-row
    ("nf4", 64, False, jnp.float32),
    ("nf4", 32, True, jnp.float32),
    ("nf4", 128, False, jnp.bfloat16),
    ("int8", None, None, jnp.bfloat16),
    ("int8", None, None, jnp.float32),
]


@pytest.mark.parametrize("fmt,block,double_quant,dtype", LAYOUTS)
def test_kernel_equals_the_exact_product_forward_and_transposed(fmt, block, double_quant, dtype):
    q = _quantized(fmt, block, double_quant, dtype)
    for rows in (1, 24):  # one row: the broadcast-and-sum path; 24 rows: tensor-core tiles of 32 rows
        x = jax.random.normal(jax.random.key(rows), (rows, 128), dtype)
        _check(_qmatmul.matmul(x, q, interpret=True), x, q)
    g = jax.random.normal(jax.random.key(7), (1 if dtype == jnp.bfloat16 else 3, 384), dtype)  # both paths
    _check(_qmatmul.matmul(g, q, transpose=True, interpret=True), g, q, transpose=True)


STACKED = [*LAYOUTS, ("nf4", 128, True, jnp.bfloat16)]  # the last pads its absmax codes: sliced per layer


@pytest.mark.parametrize("fmt,block,double_quant,dtype", STACKED)
def test_a_layer_read_inside_the_stack_equals_the_layer_sliced_out(fmt, block, double_quant, dtype):
    """``layer=i`` reads layer ``i``'s codes inside the whole stack (no copy): the same products, bit for
    bit, as the kernel on ``W[i]`` sliced out, for each layer, forward and transposed."""
    q = _quantized(fmt, block, double_quant, dtype, shape=(3, 128, 384), seed=4)
    x = jax.random.normal(jax.random.key(1), (1, 128), dtype)
    g = jax.random.normal(jax.random.key(2), (5, 384), dtype)
    stacked = jax.jit(functools.partial(_qmatmul.matmul, interpret=True), static_argnames="transpose")
    for i in range(3):
        one = layer_of(q, i)
        for v, transpose in ((x, False), (g, True)):
            got = stacked(v, q, layer=jnp.int32(i), transpose=transpose)
            np.testing.assert_array_equal(got, _qmatmul.matmul(v, one, transpose=transpose, interpret=True))
        _check(got, g, one, transpose=True)


def test_a_stack_past_int32_offsets_is_sliced_per_layer(monkeypatch):
    q = _quantized("nf4", 64, True, jnp.float32, shape=(2, 128, 256))
    x = jax.random.normal(jax.random.key(1), (1, 128))
    want = _qmatmul.matmul(x, q, layer=1, interpret=True)
    monkeypatch.setattr(_qmatmul, "_INDEX_LIMIT", 2 * 128 * 128)  # the stack's codes no longer fit
    codes = _qmatmul._stacked(q, 1)[0]
    assert codes.shape == (128, 128)  # the layer's own
    np.testing.assert_array_equal(_qmatmul.matmul(x, q, layer=1, interpret=True), want)


VARIANTS = [  # benchmark settings (`_qmatmul.configure`): each variant of the kernel the sweep times
    "16,256,4,1,4,1,prefetch2",  # one row folded (`_gemv_kernel`): 4 steps a program, 2 loaded ahead
    "32,128,4,1,2,1,prefetch0+tree",  # 2 programs of 4 steps, no loads ahead; the tree lookup
    "8,128,4,1,4096,1,one",  # one step a program (the other paths keep their tiles: a dot needs 16)
    "128,128,4,3,4096,1,reduce+tile",  # the tiled one-row path: K split to one step a program, summed each step
    "128,128,4,3,512,1,words+tile",  # uint32 words of codes: 8 NF4 (4 int8) column phases
    "64,128,4,3,2,1,reduce+words+tree+hints+tile",  # 2 programs: a loop of 4 steps
    "64,128,4,3,512,0,words+select",  # tensor-core tiles on the phases
]


@pytest.fixture
def variant(request):
    yield _qmatmul.configure(request.param)
    _qmatmul.configure("")


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("fmt,block,double_quant,dtype", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]])
def test_variants_equal_the_exact_product_forward_and_transposed(variant, fmt, block, double_quant, dtype):
    q = _quantized(fmt, block, double_quant, dtype, shape=(256, 256), seed=3)
    rows = 1 if variant["GEMV"] else 3
    x = jax.random.normal(jax.random.key(rows), (rows, 256), dtype)
    _check(_qmatmul.matmul(x, q, interpret=True), x, q)
    _check(_qmatmul.matmul(x, q, transpose=True, interpret=True), x, q, transpose=True)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")  # jax >= 0.11
def test_variants_lower_to_triton_without_a_gpu():
    """Pallas's Triton lowering runs on any host: every variant of the sweep's preset reaches Triton IR
    (the interpreter alone would accept ops Triton does not lower, e.g. a 4-way ``stack``)."""
    from benchmarks.qdecode import PRESETS

    q = {fmt: _quantized(fmt, 64, True, jnp.bfloat16, shape=(256, 256)) for fmt in ("nf4", "int8")}
    try:
        presets = PRESETS["h200"] + PRESETS["fold"]
        settings = {s.split(",", 5)[-1]: s for s in presets}  # one a (gemv, flags)
        for setting in [*settings.values(), "128,128,4,3,4096,1,readonly"]:  # and qdecode's diagnostic
            _qmatmul.configure(setting)
            for fmt, rows, transpose in (("nf4", 1, False), ("nf4", 1, True), ("int8", 16, False), ("int8", 1, False)):
                f = jax.jit(functools.partial(_qmatmul.matmul, transpose=transpose, interpret=False))
                traced = f.trace(jnp.ones((rows, 256), jnp.bfloat16), q[fmt])
                try:
                    hlo = traced.lower(lowering_platforms=("cuda",))
                except RuntimeError as e:  # jax 0.12 wants a GPU (or an abstract one) to lower for
                    if "No supported GPU devices found" not in str(e):
                        raise
                    pytest.skip(f"jax {jax.__version__} lowers for a GPU only with one: {str(e)[:60]}")
                assert "__gpu" in hlo.as_text(), setting  # the Triton kernel's custom call
    finally:
        _qmatmul.configure("")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU (CI has none)")
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")  # jax >= 0.11
@pytest.mark.parametrize("setting", ["", *VARIANTS])
def test_compiled_kernel_on_a_gpu_equals_the_exact_product(setting):
    """The device run's check: the kernel Triton compiles (not the interpreter), forward and transposed,
    under the defaults (every layout; 1, 8, 16, 40 and 64 rows) and each variant (three layouts; 1 and 16 rows)."""
    some = [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]]
    layouts, row_counts = (LAYOUTS, (1, 8, 16, 40, 64)) if not setting else (some, (1, 16))
    try:
        _qmatmul.configure(setting)
        for fmt, block, double_quant, dtype in layouts:
            q = _quantized(fmt, block, double_quant, dtype, shape=(512, 1024), seed=5)
            for rows in row_counts:
                x = jax.random.normal(jax.random.key(rows), (rows, 512), dtype)
                _check(jax.jit(_qmatmul.matmul)(x, q), x, q)
                g = jax.random.normal(jax.random.key(rows + 1), (rows, 1024), dtype)
                _check(jax.jit(functools.partial(_qmatmul.matmul, transpose=True))(g, q), g, q, transpose=True)
    finally:
        _qmatmul.configure("")


def test_configure_sets_every_switch_and_words_load_uint32():
    q = _quantized("int8", None, None, jnp.float32, shape=(512, 128))
    x = jnp.ones((1, 512))
    try:
        assert _qmatmul.configure("128,128,2,1,4096,1,words+reduce+tile") == {
            **_qmatmul._DEFAULTS, "WARPS": 2, "STAGES": 1, "PROGRAMS": 4096, "WORDS": True, "REDUCE": "step",
            "TILE_M": (128, 128), "WARPS_M": 2, "STAGES_M": 1, "PROGRAMS_M": 4096,  # every path takes the setting
            "GEMV_TILE": (128, 128), "GEMV_WARPS": 2, "GEMV_STAGES": 1, "GEMV_PROGRAMS": 4096, "FOLD": False,
        }  # fmt: skip
        jaxpr = str(jax.make_jaxpr(lambda x, q: _qmatmul.matmul(x, q, interpret=True))(x, q))
        assert "grid=(1, 1, 4)" in jaxpr and "uint32" in jaxpr  # one step a program: K split 4 ways
        assert _qmatmul.configure("64,128,4,3,512")["WORDS"] is False  # unnamed switches reset
        one = _qmatmul.configure("8,1024,8,2,2048,1,one+prefetch2")  # the one-row kernel's numbers alone
        assert one == {
            **_qmatmul._DEFAULTS, "GEMV_TILE": (8, 1024), "GEMV_WARPS": 8, "GEMV_STAGES": 2, "GEMV_PROGRAMS": 2048,
            "PREFETCH": 2,
        }  # fmt: skip
    finally:
        _qmatmul.configure("")
    assert _qmatmul.switches() == _qmatmul._DEFAULTS


@pytest.mark.parametrize(
    "setting,match",
    [
        ("128,128,4", "3 fields"),
        ("128,x,4,3,512", "'x' is not an integer"),
        ("128,128,4,3,512,1,fast", "unknown flag 'fast'"),
        ("128,128,4,3,512,1,tree+select", "more than one lookup"),
    ],
)
def test_configure_rejects_bad_settings(setting, match):
    with pytest.raises(ValueError, match=match):
        _qmatmul.configure(setting)
    assert _qmatmul.switches() == _qmatmul._DEFAULTS  # nothing set


def test_split_contraction_equals_one_program():
    q = _quantized("nf4", 64, True, jnp.float32, shape=(256, 128))
    x = jax.random.normal(jax.random.key(1), (2, 256))
    one = _qmatmul.matmul(x, q, splits=1, interpret=True)
    two = _qmatmul.matmul(x, q, splits=2, interpret=True)
    _check(two, x, q)
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6 * float(jnp.abs(one).max()))
    with pytest.raises(ValueError, match="splits=3 does not divide the contraction of 256"):
        _qmatmul.matmul(x, q, splits=3, interpret=True)


@pytest.mark.parametrize("fmt,block,double_quant,dtype", [LAYOUTS[0], LAYOUTS[4]])
def test_one_row_loads_ahead_and_splits_change_nothing_but_the_sum_order(fmt, block, double_quant, dtype):
    """The folded one-row kernel: loads issued 0, 1 or 2 steps ahead give the same bits (the arithmetic
    is the same); splitting the contraction only reorders a float32 sum; a non-power-of-2 width falls
    back to a narrower tile."""
    q = _quantized(fmt, block, double_quant, dtype, shape=(512, 640), seed=6)  # 640: 128-wide tiles only
    x = jax.random.normal(jax.random.key(1), (1, 512), dtype)
    outs = []
    try:
        for ahead in (0, 1, 2):
            _qmatmul.configure(f"16,512,4,1,4,1,one+prefetch{ahead}" if ahead != 1 else "16,512,4,1,4,1,one")
            outs.append(_qmatmul.matmul(x, q, interpret=True))
        _qmatmul.configure("16,512,4,1,4,1,one")
        one = _qmatmul.matmul(x, q, splits=1, interpret=True)
    finally:
        _qmatmul.configure("")
    for y in outs:
        np.testing.assert_array_equal(y, outs[0])
        _check(y, x, q)
    _check(one, x, q)


def test_the_default_split_takes_any_divisor_of_the_steps(monkeypatch):
    # 3 steps of 128 (as the 8B's 14,336 = 112 steps, not a power of 2): split 3 ways when the grid has room
    assert _qmatmul._splits(8, 384, 128) == 3
    monkeypatch.setattr(_qmatmul, "PROGRAMS", 16)
    assert _qmatmul._splits(8, 384, 128) == 1 and _qmatmul._splits(4, 14336, 128) == 4
    q = _quantized("int8", None, None, jnp.float32, shape=(384, 128))
    x = jax.random.normal(jax.random.key(1), (1, 384))
    _check(_qmatmul.matmul(x, q, splits=3, interpret=True), x, q)


@pytest.mark.parametrize("lookup", ["select", "tree"])
def test_select_lookups_equal_the_table_load(lookup):
    q = _quantized("nf4", 64, False, jnp.bfloat16, shape=(128, 128))
    x = jax.random.normal(jax.random.key(1), (1, 128), jnp.bfloat16)
    y = _qmatmul.matmul(x, q, lookup=lookup, interpret=True)
    np.testing.assert_array_equal(y, _qmatmul.matmul(x, q, lookup="gather", interpret=True))
    with pytest.raises(ValueError, match="lookup='table': expected one of"):
        _qmatmul.matmul(x, q, lookup="table", interpret=True)


def test_non_finite_group_decodes_to_nan_as_the_reference_does():
    w = jnp.ones((128, 128)).at[0, 0].set(jnp.inf)
    q = jax.jit(lambda w: jaxlora.quantize({"w": w}, "nf4", targets="w")["w"])(w)  # under jit: no check
    y = _qmatmul.matmul(jnp.ones((1, 128)), q, interpret=True)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(_qmatmul.reference(jnp.ones((1, 128)), q)))
    assert bool(jnp.all(jnp.isnan(y)))  # one group of 256 blocks holds every block here


@pytest.mark.parametrize(
    "make,rows,why",
    [
        (lambda: _quantized("int8", None, None, jnp.float32, shape=(128, 200)), 1, "not a multiple of the"),
        (lambda: _quantized("nf4", 16, True, jnp.float32, shape=(96, 128)), 1, "not a multiple of the"),
        (lambda: _quantized("nf4", 48, True, jnp.float32, shape=(128, 384)), 1, "not a power of 2"),
        (lambda: _quantized("nf4", 64, True, jnp.float32, shape=(2, 64, 128)), 1, "is not 2-D"),
        (lambda: _quantized("nf4", 64, True, jnp.float32, shape=(128, 128)), _qmatmul.MAX_ROWS + 1, "rows"),
        # an empty batch (a server's empty decode or prefill group): the kernel's row tiles would not fit
        (lambda: _quantized("int8", None, None, jnp.float32, shape=(128, 128)), 0, "no rows"),
    ],
)
def test_uncovered_shapes_fall_back_to_xla(interpret, make, rows, why):
    q = make()
    assert why in _qmatmul.covers(q, rows, jnp.float32)
    assert _qmatmul.mode(q, rows, jnp.float32) == "xla"  # even with the kernel forced
    if q.outer:
        return
    x = jnp.ones((rows, q.shape[0]))
    np.testing.assert_array_equal(_qmatmul.dot(x, q), _qmatmul.reference(x, q))
    if rows <= _qmatmul.MAX_ROWS:  # (matmul itself takes many rows: the benchmarks time it there)
        with pytest.raises(ValueError, match="does not cover x .* falls back"):
            _qmatmul.matmul(x, q, interpret=True)


def test_an_empty_batch_through_a_scanned_stack_gives_empty_outputs(interpret):
    """Zero rows once reached the kernel (0 <= MAX_ROWS), whose 16-row tiles do not fit an empty x: a
    TypeError from deep in Pallas where XLA's path returns the empty result."""
    q = {"w": _quantized("nf4", 64, True, jnp.float32, shape=(2, 128, 128))}
    fn = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]  # noqa: E731
    config = jaxlora.LoraConfig(rank=2, targets="w")
    lora = jaxlora.init(jax.random.key(0), q, config, fn=fn, args=(jnp.ones((1, 128)),))
    for shape in ((0, 128), (3, 0, 128)):
        x = jnp.ones(shape)
        assert jax.jit(lambda q, lora, x: jaxlora.apply(fn, q, lora, x))(q, lora, x).shape == shape
        g = jax.grad(lambda lora, x: jnp.sum(jaxlora.apply(fn, q, lora, x)), argnums=(0, 1))(lora, x)
        assert g[1].shape == shape and not np.any(np.asarray(g[0]["w"].a))  # no rows: no gradient


def test_mode_is_xla_off_gpu_and_follows_the_switch(monkeypatch):
    q = _quantized("nf4", 64, True, jnp.float32, shape=(128, 128))
    assert _qmatmul.mode(q, 1, jnp.float32) == ("kernel" if jax.default_backend() == "gpu" else "xla")
    assert _qmatmul.mode(q, 1, jnp.float64) == "xla"  # an uncovered dtype
    for forced in _qmatmul.MODES:
        monkeypatch.setattr(_qmatmul, "_MODE", forced)
        assert _qmatmul.mode(q, 1, jnp.float32) == forced


def test_rows_past_the_transposed_limit_take_xla_for_dx(interpret, monkeypatch):
    # MAX_ROWS raised for the forward (a decode batch of 40); the activation gradient stays on XLA's path
    monkeypatch.setattr(_qmatmul, "MAX_ROWS", 64)
    q = _quantized("nf4", 64, True, jnp.bfloat16, shape=(128, 256))
    x = jax.random.normal(jax.random.key(1), (40, 128), jnp.bfloat16)
    c = jax.random.normal(jax.random.key(2), (40, 256), jnp.bfloat16)
    loss = lambda x: jnp.sum(_qmatmul.dot(x, q).astype(jnp.float32) * c)  # noqa: E731
    calls = _pallas_calls(jax.make_jaxpr(jax.grad(loss))(x).jaxpr)
    assert len(calls) == 1  # the forward's; dx is XLA's
    _check(_qmatmul.dot(x, q), x, q)
    _check(jax.jit(jax.grad(loss))(x), c.astype(jnp.bfloat16), q, transpose=True)


def test_dot_gradients_for_x_and_for_the_float_leaves(interpret):
    q = _quantized("nf4", 64, True, jnp.float32, shape=(128, 128))
    x = jax.random.normal(jax.random.key(1), (3, 128))
    c = jax.random.normal(jax.random.key(2), (3, 128))
    loss = lambda f: lambda x, q: jnp.sum(f(x, q) * c)  # noqa: E731
    dx = jax.jit(jax.grad(loss(_qmatmul.dot)))(x, q)
    _check(dx, c, q, transpose=True)  # dx = c·Wᵀ, by the transposed kernel
    # the quantized leaves are frozen in jaxlora; differentiated anyway, their float leaves get XLA's gradient
    got = jax.grad(loss(_qmatmul.dot), argnums=1, allow_int=True)(x, q)
    want = jax.grad(loss(_qmatmul.reference), argnums=1, allow_int=True)(x, q)
    for name in ("scale_scale", "scale_mean"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)


def _pallas_calls(jaxpr) -> list:
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            found.append(e)
        for sub in _subjaxprs(e):
            found += _pallas_calls(sub)
    return found


def _subjaxprs(e):
    for v in e.params.values():
        for j in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(j, "eqns"):
                yield j
            elif hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                yield j.jaxpr


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(256, name="up", dtype=jnp.bfloat16)(x)  # (128, 256): the kernel's
        h = nn.Dense(64, name="mid", dtype=jnp.bfloat16)(nn.gelu(h))  # (256, 64): falls back (64 columns)
        return x + nn.Dense(128, name="down", dtype=jnp.bfloat16)(h), None  # (64, 128): falls back (64 rows)


class _ScanRemat(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("fmt", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_apply_uses_the_kernel_with_lora_riding_along(monkeypatch, fmt):
    model, x = _ScanRemat(), jax.random.normal(jax.random.key(3), (2, 4, 128))
    q = jaxlora.quantize(model.init(jax.random.key(0), x), fmt)  # float32 params, cast to bf16 by Dense
    config = jaxlora.LoraConfig(rank=4, targets=("up", "down"))  # "mid" quantized, no adapter
    lora = jaxlora.init(jax.random.key(1), q, config, fn=model.apply, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.05, lora)
    results = {}
    for forced in ("interpret", "xla"):
        monkeypatch.setattr(_qmatmul, "_MODE", forced)  # read when traced: a new function for each (jit caches)
        loss = lambda lora: jnp.sum(jaxlora.apply(model.apply, q, lora, x).astype(jnp.float32) ** 2)  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(lora)
        calls = _pallas_calls(jaxpr.jaxpr)
        assert len(calls) >= 2 if forced == "interpret" else not calls  # "up": x·W and g·Wᵀ ("down" falls back)
        # inside the scan each call reads the whole stack's codes (2 layers of 128 rows): none copied out
        codes = lambda v: v.aval.shape[0] == 2 * 128 and v.aval.dtype in (jnp.uint8, jnp.int8)  # noqa: E731
        assert all(any(codes(v) for v in e.invars) for e in calls)
        results[forced] = jax.jit(jax.value_and_grad(loss))(lora)
    (got, g), (want, g_want) = results["interpret"], results["xla"]
    # the same bf16 W and factors; the kernel and XLA differ by f32 summation order and bf16 roundings
    np.testing.assert_allclose(got, want, rtol=2e-3)
    for path in lora:
        for name in ("a", "b"):
            a, b = getattr(g[path], name), getattr(g_want[path], name)
            np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * float(jnp.abs(b).max()))


def _dots_in_kernels(jaxpr) -> list:
    found = [e for call in _pallas_calls(jaxpr) for e in _eqns(call.params["jaxpr"])]
    return [e for e in found if e.primitive.name == "dot_general"]


def _eqns(jaxpr) -> list:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return [x for e in jaxpr.eqns for x in [e, *(y for sub in _subjaxprs(e) for y in _eqns(sub))]]


def test_the_kernel_multiplies_at_the_precision_the_model_asks_for(interpret):
    """A float32 Dense with precision=HIGHEST: XLA's dot computes in IEEE float32; the kernel's tile
    products once dropped the precision, and Pallas's Triton lowering multiplies float32 tiles with
    precision None in TF32 (10-bit mantissas: ~1e-3 relative). The interpreter on a CPU computes exactly
    either way, so the test reads the kernels' own dot_general equations (what the Triton lowering reads),
    forward and for dx, and checks the values against float64 products."""
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    model = nn.Dense(128, precision=jax.lax.Precision.HIGHEST, use_bias=False)
    x = jax.random.normal(jax.random.key(1), (3, 128))  # 3 rows: the tensor-core tiles, not the one-row sums
    q = jaxlora.quantize(model.init(jax.random.key(0), x), "int8")
    loss = lambda x: jnp.sum(jnp.sin(jaxlora.apply(model.apply, q, {}, x)))  # noqa: E731
    dots = _dots_in_kernels(jax.make_jaxpr(jax.grad(loss))(x).jaxpr)
    assert len(dots) == 2 and all(e.params["precision"] == highest for e in dots), [e.params for e in dots]
    w = q["params"]["kernel"]
    _check(jaxlora.apply(model.apply, q, {}, x), x, w)
    g = jnp.cos(jaxlora.apply(model.apply, q, {}, x))
    _check(jax.grad(loss)(x), g, w, transpose=True)


class _RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(256, name="up")(x)  # its output feeds gelu: "outputs" saves it
        return x + nn.Dense(128, name="down")(nn.gelu(h))


@pytest.mark.parametrize("keep", ["minimal", "outputs"])
def test_remat_policies_save_the_same_named_values_on_the_kernel_path(monkeypatch, keep):
    """jaxlora.remat_policy saves values that lora_op names ("lora_xa", "lora_out/<path>"); the kernel path
    (_qdot) named none, so under a policy its backward recomputed x·a and re-ran the kernel forward (a
    weight read a layer) where XLA's path kept them. Both paths must save the same named values."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals  # (the public way to list them)

    model = nn.remat(_RematBlock, policy=jaxlora.remat_policy(keep))()
    x = jnp.ones((1, 128))
    q = jaxlora.quantize(model.init(jax.random.key(0), x), "nf4")
    lora = jaxlora.init(jax.random.key(1), q, jaxlora.LoraConfig(rank=2), fn=model.apply, args=(x,))
    names = {}
    for forced in ("interpret", "xla"):
        monkeypatch.setattr(_qmatmul, "_MODE", forced)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda lora: jnp.sum(jaxlora.apply(model.apply, q, lora, x)), lora)
        names[forced] = sorted(re.findall(r"named '([^']+)'", out.getvalue()))
    assert names["xla"] == (["lora_xa"] * 2 if keep == "minimal" else ["lora_out/up", "lora_xa", "lora_xa"])
    assert names["interpret"] == names["xla"]


@pytest.mark.slow
def test_sharded_result_equals_single_device():
    out = run_with_devices(
        """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxlora
from jaxlora import _qmatmul
_qmatmul._MODE = "interpret"
w = {"kernel": jax.random.normal(jax.random.key(0), (128, 256)) * 0.05}
fn = lambda p, x: x @ p["kernel"]
x = jax.random.normal(jax.random.key(1), (8, 128))
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
for fmt in ("nf4", "int8"):
    q = jaxlora.quantize(w, fmt)
    lora = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=2, targets="kernel"), fn=fn, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.1, lora)
    f = jax.jit(lambda q, lora, x: jaxlora.apply(fn, q, lora, x))
    assert "pallas_call" in str(jax.make_jaxpr(f)(q, lora, x))
    one = f(q, lora, x)
    q8 = jax.device_put(q, jaxlora.quantized_shardings(q, {"kernel": NamedSharding(mesh, P(None, "model"))}))
    x8 = jax.device_put(x, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(f(q8, lora, x8), one, rtol=1e-6, atol=1e-6)  # the kernel on sharded arrays
    with jax.set_mesh(mesh):  # a mesh in context: XLA's dequantize-then-matmul, per shard by the partitioner
        assert "pallas_call" not in str(jax.make_jaxpr(f)(q8, lora, x8))
        np.testing.assert_allclose(f(q8, lora, x8), one, rtol=1e-5, atol=1e-5)
    print(fmt, "ok")
"""
    )
    assert "nf4 ok" in out and "int8 ok" in out


@pytest.mark.slow
def test_qdecode_benchmark_runs_and_checks_the_kernel_against_xla(tmp_path, monkeypatch):
    import json
    import sys

    from benchmarks import qdecode

    out = tmp_path / "q.json"
    modes = ["bf16", "nf4_xla", "nf4_kernel", "nf4_kernel_sliced", "nf4_kernel_read_only", "nf4_codes_xla"]
    argv = ["qdecode", "--shape", "2,128,256", "--batches", "1", "--modes", *modes]
    sweep = ["--sweep", "128,128,4,3,4096,1,reduce+words", "64,128,4,3,512", "--sweep-batches", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, *sweep, "--copy-mib", "8", "--out", str(out)])
    try:
        qdecode.main()
    finally:
        _qmatmul.configure("")
    res = json.loads(out.read_text())
    assert res["sweep"]["chosen"] == res["qmatmul_setting"] in ("128,128,4,3,4096,1,reduce+words", "64,128,4,3,512")
    assert all(r[f"{fmt}_b1_err"] < 2e-2 for r in res["sweep"]["rows"] for fmt in ("nf4", "int8"))
    assert set(res["sweep"]["best"]) == {"nf4_b1", "int8_b1"}
    rows = {r["mode"]: r for r in res["results"]}
    for mode in ("nf4_kernel", "nf4_kernel_sliced"):  # the layer read in place, and the scan's slice
        assert rows[mode]["against"] == "nf4_xla" and rows[mode]["rel_err"] < 2e-2
    assert rows["nf4_kernel_read_only"]["against"] is None and "ms" in rows["nf4_codes_xla"]  # diagnostics
    assert {"floor_ms", "x_floor", "TBps", "vs_bf16"} <= set(rows["nf4_kernel"])  # each figure beside its floor
