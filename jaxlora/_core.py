"""The functional verbs: `init`, `apply`, `merge`, `unmerge`, `summary`."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from . import _quantized, _saved, _stack, _trace
from ._config import LoraConfig
from ._linen import recording_kinds
from ._matmul import LoraFactors, delta, expand_magnitude, factor_shapes, magnitude_shape, weight_norm
from ._saved import SavedModule
from ._tree import Weight, inside, is_array, nearest, select, select_saved, weights

Params = TypeVar("Params")
Lora = dict[str, LoraFactors | SavedModule]  # SavedModule: a module of LoraConfig.modules_to_save
FACTORED = {"dot_general", "ragged_dot", "conv", "gather"}  # the ops a LoRA weight can feed
NOT_MATRICES = ("bias", "scale", "offset")  # leaf names that are never LoRA weights
_NEEDS_TRACE = (
    "Pass the function that uses the weights so init can trace it (nothing is computed): "
    "jaxlora.init(key, params, config, fn=model.apply, args=(x,)); args may be jax.ShapeDtypeStruct."
)


def _probe(fn: Callable[..., Any], params: Any, args: tuple[Any, ...], candidates: dict[str, Weight]) -> _trace.Context:
    ctx = _trace.Context(probing=True)
    tagged = {w.index: (path, None) for path, w in candidates.items()}
    # array leaves go through eval_shape; the rest (an Equinox module's function fields) stay static, as in apply
    leaves, treedef = jax.tree_util.tree_flatten((params, tuple(args)), is_leaf=_quantized.is_quantized)
    dynamic = [i for i, leaf in enumerate(leaves) if is_array(leaf) or _quantized.is_quantized(leaf)]

    def probe(*values):
        full = list(leaves)
        for i, v in zip(dynamic, values):
            full[i] = v
        p, a = jax.tree_util.tree_unflatten(treedef, full)
        return _trace.run(fn, p, a, {}, tagged, ctx)

    with recording_kinds(fn) as kinds:
        jax.eval_shape(probe, *(leaves[i] for i in dynamic))
    for path, kind in kinds.items():  # name the module kind where LoRA cannot adapt it
        if path in ctx.ops and not ctx.ops[path] & FACTORED:
            ctx.ops[path] = {f"({kind}) {use}" for use in ctx.ops[path]}
    return ctx


def _roles(path: str, w: Weight, ctx: _trace.Context | None) -> str:
    if ctx is None:
        if len(w.leaf.shape) == 2:
            return "oi" if w.name == "weight" else "io"  # PyTorch/Equinox (out, in); Flax (in, out)
        raise ValueError(
            f"{path!r}: weight {jax.tree_util.keystr(w.keypath)} has shape {tuple(w.leaf.shape)}; with more than "
            "two axes its input, output and stacked-layer axes cannot be told from the shape. " + _NEEDS_TRACE
        )
    seen = ctx.usage.get(path, {})
    if len(seen) < len(w.leaf.shape) or not {"i", "o"} <= set(seen.values()):
        uses = sorted(ctx.ops.get(path, set())) or ["none"]
        raise ValueError(
            f"{path!r}: weight {jax.tree_util.keystr(w.keypath)} {tuple(w.leaf.shape)} never reaches a matmul, "
            f"convolution or lookup in fn (its uses: {uses}); LoRA cannot adapt it. Leave it out of "
            "LoraConfig.targets (or add it to exclude)."
        )
    return "".join(seen[k] for k in range(len(w.leaf.shape)))


def linear_weights(ctx: _trace.Context, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """The weights a probe saw feed a matmul, as ``"all-linear"`` takes them: each mapped to ``""``, or to
    why it is left out (as PEFT leaves out the output embedding and never adapts an embedding table):

    * a lookup table (``gather``), also where it is tied and multiplies too (``Embed.attend``);
    * the output head: a weight whose matmul alone gives one of ``fn``'s outputs (through no later
      matmul and no other weight's output), with as many outputs as a lookup table has rows (the
      vocabulary; a classifier head of an encoder stays in, as in PEFT).
    """
    tables = {p for p, ops in ctx.ops.items() if "gather" in ops}
    size = lambda p, role: math.prod(  # noqa: E731
        shapes[p][k] for k, r in ctx.usage.get(p, {}).items() if r == role and k < len(shapes[p])
    )
    vocab = {size(p, "i") for p in tables if p in shapes}
    out = {}
    for p, ops in ctx.ops.items():
        if not ops & {"dot_general", "ragged_dot"} or p not in shapes:
            continue
        if p in tables:
            out[p] = "a lookup table, tied as the output head" if "dot_general" in ops else "a lookup table"
        elif p in ctx.outputs and size(p, "o") in vocab:
            out[p] = "the output head: its matmul alone gives fn's output, over the vocabulary"
        else:
            out[p] = ""
    return out


def init(
    key: jax.Array,
    params: Params,
    config: LoraConfig,
    *,
    fn: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
) -> Lora:
    """Make the LoRA factors for every weight of ``params`` that ``config`` targets.

    Args:
      key: a PRNG key; each module's ``A`` uses ``fold_in(key, crc32(path))``, so adding a target
        leaves the others' init unchanged.
      params: the frozen parameters (a Linen variables dict, an ``nnx.State``, any pytree); leaves may
        be arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``), so nothing is materialised.
      config: what to adapt.
      fn, args: optional: a function ``fn(params, *args)`` that uses the weights, such as
        ``model.apply``. Init traces it abstractly to learn which axes of each weight are inputs,
        outputs or stacked layers (needed for weights with more than two axes: DenseGeneral, Einsum,
        Conv, scanned layers), and which weights feed a matmul (``"all-linear"``).

    Returns:
      A dict from module path to `LoraFactors` with ``a`` random and ``b`` zero, so the adapted model
      starts equal to the base.

    Raises:
      ValueError: for a target that matches nothing (naming the closest paths), a rank larger than a
        weight allows, or a weight whose layout cannot be known.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"params": {"dense": {"kernel": jnp.ones((4, 6))}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> lora["dense"].a.shape, lora["dense"].b.shape
      ((4, 2), (2, 6))
    """
    saved = select_saved(params, config.modules_to_save) if config.modules_to_save else {}
    packed = [p for p, w in weights(params).items() if inside(p, saved) and _quantized.is_quantized(w.leaf)]
    if packed:
        raise ValueError(
            f"jaxlora.init: modules_to_save train {sorted(saved)} in full, but their weights {packed} are quantized "
            "(codes cannot train); quantize with exclude= naming them (jaxlora.quantize(params, fmt, exclude=...))."
        )
    candidates = {p: w for p, w in weights(params).items() if not inside(p, saved)}  # no factors in a saved module
    ctx = _probe(fn, params, args, candidates) if fn is not None else None
    if ctx is None:  # no trace: a stacked bias or norm scale is 2-D too, so go by name
        candidates = {p: w for p, w in candidates.items() if w.name not in NOT_MATRICES}
    refused = {}
    if ctx is not None:  # traced: what reaches a matmul, convolution or lookup
        refused = {
            p: " and ".join(sorted(ctx.ops.get(p, {"unused by fn"})))
            for p in candidates
            if not ctx.ops.get(p, set()) & FACTORED
        }
        candidates = {p: w for p, w in candidates.items() if p not in refused}
    linear = None if ctx is None else linear_weights(ctx, {p: tuple(w.leaf.shape) for p, w in candidates.items()})
    chosen = select(candidates, config, linear, refused)
    layouts, problems = {}, []
    for path in chosen:
        try:
            layouts[path] = _roles(path, candidates[path], ctx)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("jaxlora.init cannot lay out these weights:\n  " + "\n  ".join(problems))
    lora: Lora = {}
    for path, roles in layouts.items():
        w, r = candidates[path], config.rank_for(path)
        shape = tuple(w.leaf.shape)
        experts = math.prod(shape[k] for k in ctx.experts.get(path, ())) if ctx is not None else 1
        if config.expert_rank == "split" and experts > 1:
            if r < experts:
                problems.append(
                    f"{path!r}: rank {r} split across {experts} experts (expert_rank='split') leaves less than 1 "
                    f"each; use rank >= {experts} (rank_pattern={{{path!r}: {experts}}}) or expert_rank='per_expert'."
                )
                continue
            r //= experts
        fan_in = math.prod(d for d, c in zip(shape, roles) if c == "i")
        fan_out = math.prod(d for d, c in zip(shape, roles) if c == "o")
        if r > min(fan_in, fan_out):
            problems.append(
                f"{path!r}: rank {r} exceeds min(inputs={fan_in}, outputs={fan_out}) of weight {shape}; "
                f"use a smaller rank (rank_pattern={{{path!r}: {min(fan_in, fan_out)}}} sets it for this module)."
            )
            continue
        a_shape, b_shape = factor_shapes(shape, roles, r)
        k = jax.random.fold_in(key, _trace.path_seed(path))
        lookup = ctx is not None and ctx.ops.get(path, set()) == {"gather"} or ctx is None and w.name == "embedding"
        if config.init == "gaussian":
            a = jax.random.normal(k, a_shape, config.dtype) / r
        elif lookup:  # a row lookup has one-hot inputs (fan-in 1): PEFT's N(0, 1) on the random side
            a = jax.random.normal(k, a_shape, config.dtype)
        else:  # PEFT's kaiming_uniform(a=sqrt(5)) on lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, a_shape, config.dtype, -bound, bound)
        b, scale, m = jnp.zeros(b_shape, config.dtype), config.scale_for(path), None
        if config.dora:  # DoRA: m = ‖W + ΔW‖ per output feature (‖W‖, as B = 0), like PEFT
            if isinstance(w.leaf, jax.ShapeDtypeStruct):
                problems.append(
                    f"{path!r}: DoRA initialises its magnitude from the values of weight {shape}, but params holds "
                    f"only its shape ({type(w.leaf).__name__}); pass the loaded weights."
                )
                continue
            m = weight_norm(_float32(w.leaf), a, b, scale, roles).astype(config.dtype)  # QLoRA: dequantized
        lora[path] = LoraFactors(a=a, b=b, scale=scale, roles=roles, dropout=config.dropout, m=m)
    if problems:
        raise ValueError("jaxlora.init:\n  " + "\n  ".join(problems))
    lora.update({path: _saved.copy(leaves, path) for path, leaves in saved.items()})
    return lora


def _fit(params: Any, lora: Mapping[str, LoraFactors]) -> dict[str, Weight]:
    """The targeted weights of ``params``; raises once, listing every way ``lora`` does not fit."""
    if not isinstance(lora, Mapping):
        raise TypeError(f"lora must be the dict that jaxlora.init returns, got {type(lora).__name__}.")
    candidates = weights(params)
    problems = []
    try:
        _saved.fit(params, {p: f for p, f in lora.items() if isinstance(f, SavedModule)})
    except ValueError as e:
        problems += str(e).splitlines()[1:]
    for path, f in lora.items():
        if isinstance(f, SavedModule):
            continue
        if not isinstance(f, LoraFactors):
            problems.append(f"{path!r}: expected LoraFactors, got {type(f).__name__}.")
        elif path not in candidates:
            problems.append(f"{path!r} is not an adaptable weight of params; {nearest(path, candidates)}.")
        else:
            shape = tuple(candidates[path].leaf.shape)
            if len(f.roles) != len(shape):
                problems.append(
                    f"{path!r}: weight {shape} but the LoRA factors were made for {len(f.roles)}-D roles {f.roles!r}."
                )
                continue
            want = factor_shapes(shape, f.roles, f.a.shape[-1])
            if (tuple(f.a.shape), tuple(f.b.shape)) != want:
                problems.append(
                    f"{path!r}: weight {shape} needs a {want[0]} and b {want[1]}, "
                    f"got a {tuple(f.a.shape)} and b {tuple(f.b.shape)}."
                )
            elif f.m is not None and tuple(f.m.shape) != magnitude_shape(shape, f.roles):
                problems.append(
                    f"{path!r}: weight {shape} needs a DoRA magnitude m {magnitude_shape(shape, f.roles)} "
                    f"(stacked, then output axes), got {tuple(f.m.shape)}."
                )
    if problems:
        raise ValueError(
            "The LoRA tree does not fit params (was it made for another model? "
            "re-run jaxlora.init on these params):\n  " + "\n  ".join(problems)
        )
    return {path: candidates[path] for path, f in lora.items() if isinstance(f, LoraFactors)}


def _split(lora: Mapping[str, Any]) -> tuple[dict[str, LoraFactors], dict[str, SavedModule]]:
    """The factors and the saved modules of a LoRA tree."""
    saved = {p: f for p, f in lora.items() if isinstance(f, SavedModule)}
    return {p: f for p, f in lora.items() if p not in saved}, saved


def apply(
    fn: Callable[..., Any],
    params: Any,
    lora: Mapping[str, LoraFactors],
    *args: Any,
    dropout_key: jax.Array | None = None,
    unsupported: str = "error",
    adapter_ids: jax.typing.ArrayLike | None = None,
    example_axes: tuple[Any, ...] | None = None,
    example_out_axes: Any = 0,
    **kwargs: Any,
) -> Any:
    """Call ``fn(params, *args, **kwargs)`` with every targeted weight computed as ``W + scale·B·A``.

    Each targeted matmul, convolution or lookup computes ``op(x, W) + scale · (x·A)·B`` (or, where a
    batch has many tokens, ``op(x, W + ΔW)`` on a transient sum: fewer bytes moved; ``W`` is never
    changed); ``params`` are constants of the computation, so differentiating with respect to
    ``lora`` computes no gradient for ``W``. Works eagerly and under ``jit``, ``grad``, ``vmap``, and
    through ``remat``, ``scan``, ``cond`` and nested ``jit`` inside ``fn``. At ``B = 0`` the output is
    ``fn(params, ...)``'s: bit for bit op by op, within a few ulps where XLA compiles the two apart.
    Under ``jit``, pass ``params`` in as an argument of the jitted function: closed over, every weight
    is compiled into the program as a constant (minutes of compilation for an 8B model).

    Args:
      fn: any function whose first argument is ``params`` (``model.apply``; a function of an
        ``nnx.State``; plain JAX).
      params: the frozen parameters.
      lora: the tree from `init`.
      *args, **kwargs: the rest of ``fn``'s arguments; array leaves are traced, other leaves static.
      dropout_key: a PRNG key to turn on LoRA dropout (the rate is ``LoraConfig.dropout``); without
        it, as in inference, there is no dropout, and a tree with dropout warns that it is off (a
        ``UserWarning``, once per call site under Python's default filter).
      unsupported: ``"error"`` (default) raises when a targeted weight reaches an op jaxlora cannot
        factor; ``"merge"`` computes that one use with the merged weight ``W + ΔW`` instead.
      adapter_ids: with a `LoraStack` as ``lora``: one int per example, an index into ``stack.names``
        (-1: the base alone). ``fn`` is mapped over the examples (``jax.vmap``) and sees each as a batch
        of one; each example's rows use their own adapter at every targeted op. Or one int per token,
        with the token axes' shape (``(batch, seq)``), followed to the rows of each targeted Dense-like
        product (docs/design.md says what is followed and what is refused). An id outside
        ``[-1, n)`` raises a ValueError when the ids are concrete (eagerly, or numpy ids under
        ``jit``); traced ids cannot be checked, so such an example's scale is NaN: its output row
        (and the gradient it sends) is NaN, never the base model's output in silence.
      example_axes: with ``adapter_ids``: one entry per positional argument after ``params``, its
        example axis (an int, or a pytree of them) or None for an argument all examples share. By
        default each array argument's axis 0 is its example axis (0-d arrays are shared).
      example_out_axes: with ``adapter_ids``: where the examples go in the outputs, as ``jax.vmap``'s
        ``out_axes`` (default 0). An output whose axis there has size 1 in ``fn``'s batch of one gets
        the examples in its place (logits ``(1, t, v)`` -> ``(batch, t, v)``); others gain an axis
        (a scalar loss -> one per example).

    Returns:
      What ``fn`` returns.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> jaxlora.apply(lambda p, x: x @ p["w"], params, lora, jnp.ones((1, 4))).shape
      (1, 6)
    """
    if unsupported not in _trace.FALLBACKS:
        raise ValueError(f"unsupported must be one of {_trace.FALLBACKS}, got {unsupported!r}.")
    if dropout_key is None:
        _warn_dropout_off(lora)

    if isinstance(lora, _stack.LoraStack) or adapter_ids is not None or example_axes is not None:
        if not isinstance(lora, _stack.LoraStack) or adapter_ids is None:
            raise TypeError(
                "adapter_ids= goes with a LoraStack (jaxlora.stack({name: lora, ...})), and a LoraStack needs "
                f"adapter_ids= (one index into stack.names per example); got {type(lora).__name__} and "
                f"adapter_ids={'None' if adapter_ids is None else 'given'}."
            )
        targets = _fit(params, {p: lora.factors(p) for p in lora.paths})
        return _stack.apply_stack(
            fn, params, lora, targets, args, kwargs, adapter_ids=adapter_ids, example_axes=example_axes,
            example_out_axes=example_out_axes, dropout_key=dropout_key, unsupported=unsupported,
        )  # fmt: skip
    targets = _fit(params, lora)
    factors, saved = _split(lora)
    tagged = {targets[path].index: (path, f) for path, f in factors.items()}
    kernels = frozenset(p for p in factors if targets[p].name == "kernel")
    ctx = _trace.Context(fallback=unsupported, dropout_key=dropout_key, kernels=kernels)
    return _trace.run(fn, _saved.substitute(params, saved), args, kwargs, tagged, ctx)


def _warn_dropout_off(lora: Any) -> None:
    """Warn that a tree with LoRA dropout runs without it (no ``dropout_key``)."""
    if isinstance(lora, _stack.LoraStack):  # {path: rate} pairs
        rates = {p: r for p, r in lora.dropout if r > 0}
    elif isinstance(lora, Mapping):
        rates = {p: f.dropout for p, f in lora.items() if isinstance(f, LoraFactors) and f.dropout > 0}
    else:
        return
    if not rates:
        return
    level, frame = 3, sys._getframe(2)  # point at the caller's line, past jaxlora's own front-ends
    while frame is not None and frame.f_globals.get("__name__", "").startswith("jaxlora."):
        level, frame = level + 1, frame.f_back
    shown = sorted(rates)[:3] + (["..."] if len(rates) > 3 else [])
    warnings.warn(
        f"LoRA dropout is off: {len(rates)} modules have dropout {sorted(set(rates.values()))} ({', '.join(shown)}) "
        "but jaxlora.apply got no dropout_key. To train with it, pass dropout_key=jax.random.fold_in(key, step); "
        "for evaluation this is right (dropout only acts in training).",
        UserWarning,
        stacklevel=level,
    )


def _float32(w: Any) -> jax.Array:
    """``W`` in float32: a quantized weight (`jaxlora.quantize`) dequantized."""
    return _quantized.dequantize_weight(w, jnp.float32) if _quantized.is_quantized(w) else w.astype(jnp.float32)


def merged_weight(w: Any, f: LoraFactors, dtype: Any = None) -> tuple[jax.Array, jax.Array | None]:
    """``W + ΔW`` (DoRA: ``m / ‖W + ΔW‖ · (W + ΔW)``) in float32, cast to ``dtype`` (default: ``W``'s);
    and the DoRA norm. A quantized ``W`` is dequantized first."""
    full = _float32(w)
    merged = full + delta(f, jnp.float32)
    dtype = dtype or w.dtype
    if f.m is None:
        return merged.astype(dtype), None
    n = weight_norm(full, f.a, f.b, f.scale, f.roles, merged=merged)
    return (merged * expand_magnitude(f.m.astype(jnp.float32) / n, f.roles)).astype(dtype), n


def _shift(
    params: Params, lora: Mapping[str, LoraFactors], sign: float, norms: Mapping[str, Any] | None, dtype: Any = None
) -> Any:
    targets = _fit(params, lora)
    lora, saved = _split(lora)
    if saved and sign < 0:
        raise ValueError(
            f"unmerge cannot restore the original weights of the saved modules {sorted(saved)} (modules_to_save "
            "replace them); keep the original params, or unmerge only the factors: "
            "{p: f for p, f in lora.items() if isinstance(f, jaxlora.LoraFactors)}."
        )
    params = _saved.substitute(params, saved, cast=True)
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_quantized.is_quantized)
    missing = [p for p, f in lora.items() if f.m is not None and (norms is None or p not in norms)]
    if sign < 0 and missing:
        raise ValueError(
            f"jaxlora.unmerge: the DoRA modules {missing} need the norms ‖W + ΔW‖ of the weights before merging: "
            "m / ‖W + ΔW‖ · (W + ΔW) is the same for every positive rescaling of W + ΔW, so the merged weight "
            "alone does not determine W. Fix: merged, norms = jaxlora.merge(params, lora, return_norms=True), "
            "then jaxlora.unmerge(merged, lora, norms=norms)."
        )
    found = {}
    for path, f in lora.items():
        i = targets[path].index
        w = leaves[i]
        if isinstance(w, jax.ShapeDtypeStruct):
            raise TypeError(
                f"merge needs real weights, but params holds only the shape of {path!r} ({w}); "
                "pass the loaded arrays, not jax.eval_shape output."
            )
        if sign > 0:
            leaves[i], n = merged_weight(w, f, dtype)
            if n is not None:
                found[path] = n
        elif f.m is None:
            leaves[i] = (_float32(w) - delta(f, jnp.float32)).astype(dtype or w.dtype)
        else:  # W = W' · ‖W + ΔW‖ / m - ΔW
            w32, d = _float32(w), delta(f, jnp.float32)
            g = f.m.astype(jnp.float32) / jnp.asarray(norms[path], jnp.float32)
            leaves[i] = (w32 / expand_magnitude(g, f.roles) - d).astype(dtype or w.dtype)
    if dtype is not None:  # a float model: every other quantized weight dequantized too
        leaves = [_quantized.dequantize_weight(x, dtype) if _quantized.is_quantized(x) else x for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves), found


def merge(
    params: Params,
    lora: Mapping[str, LoraFactors],
    *,
    dtype: Any = None,
    quantize: bool = False,
    return_norms: bool = False,
) -> Any:
    """``params`` with each targeted ``W`` replaced by ``W + scale·B·A`` (summed in float32).

    The leaves of saved modules (``modules_to_save``) are replaced by their trained copies.

    Same structure and dtypes as ``params``; under ``jax.jit`` the outputs keep the inputs'
    shardings, and ``jax.jit(jaxlora.merge, donate_argnums=0)`` reuses their memory. A DoRA module
    (``m`` set) becomes ``m / ‖W + ΔW‖ · (W + ΔW)``, computed in float32.

    Args:
      params: the frozen parameters.
      lora: the tree from `init`.
      return_norms: also return ``{path: ‖W + ΔW‖}`` for the DoRA modules (shaped like ``m``), which
        `unmerge` needs to invert a DoRA merge.

    Returns:
      The merged params, or ``(merged, norms)`` with ``return_norms``.

    On a quantized base (`jaxlora.quantize`), each targeted weight is dequantized, merged and
    returned as a float array in ``dtype`` (default: the weight's own float dtype); with ``dtype``
    given, every other quantized weight is dequantized to it too, so the result is a float model.
    With ``quantize=True`` the merged weights are quantized again in their own format and the result
    is ``(qparams, report)``: per module, ``{"error": ‖Q(W') − W'‖ / ‖W'‖, "of_delta": ‖Q(W') − W'‖ /
    ‖ΔW‖}`` (float32 arrays), the error the re-quantization adds to the merged weight ``W'``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.zeros((4, 6))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> bool((jaxlora.merge(params, lora)["w"] == 0).all())  # B = 0 at init
      True
    """
    if not quantize:
        merged, norms = _shift(params, lora, 1.0, None, dtype)
        return (merged, norms) if return_norms else merged
    if return_norms:
        raise ValueError(
            "merge: quantize=True and return_norms=True do not combine: a re-quantized DoRA merge "
            "cannot be unmerged exactly. Merge with return_norms=True alone, then jaxlora.quantize."
        )
    targets = _fit(params, lora)
    factors, saved = _split(lora)
    leaves, treedef = jax.tree_util.tree_flatten(
        _saved.substitute(params, saved, cast=True), is_leaf=_quantized.is_quantized
    )
    not_quantized = [p for p in factors if not _quantized.is_quantized(leaves[targets[p].index])]
    if not_quantized:
        raise ValueError(
            f"merge(..., quantize=True) re-quantizes quantized weights, but {not_quantized} are not quantized; "
            "pass the params from jaxlora.quantize (or merge without quantize=True)."
        )
    merged = jax.tree_util.tree_leaves(_shift(params, lora, 1.0, None, jnp.float32)[0], is_leaf=_quantized.is_quantized)
    report = {}
    for path, f in factors.items():
        i = targets[path].index
        q = leaves[i]
        w = merged[i]
        back = _quantized.encode(  # in q's layout: a 3-D weight that is no stack stays one block run
            w.astype(q.dtype), q.format, block_size=q.block_size, double_quant=q.double_quant, stacked=len(q.outer)
        )
        err = jnp.linalg.norm(_quantized.dequantize_weight(back, jnp.float32) - w)
        report[path] = {
            "error": err / jnp.linalg.norm(w),
            "of_delta": err / jnp.linalg.norm(delta(f, jnp.float32)),
        }
        leaves[i] = back
    return jax.tree_util.tree_unflatten(treedef, leaves), report


def unmerge(params: Params, lora: Mapping[str, LoraFactors], *, norms: Mapping[str, Any] | None = None) -> Params:
    """The inverse of `merge`: ``W - scale·B·A``, exact up to the weights' dtype rounding.

    A DoRA module needs ``norms``, the ``‖W + ΔW‖`` that ``merge(..., return_norms=True)`` returns
    (the merged weight alone does not determine ``W``: every positive rescaling of ``W + ΔW`` merges
    to the same weight); then ``W = W' · ‖W + ΔW‖ / m - ΔW``.

    Raises:
      ValueError: for a DoRA module without its entry in ``norms``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> bool((jaxlora.unmerge(jaxlora.merge(params, lora), lora)["w"] == 1).all())
      True
    """
    return _shift(params, lora, -1.0, norms)[0]


class ModuleSummary(NamedTuple):
    """One adapted weight: its path, shape, rank and LoRA parameter count."""

    path: str
    weight_shape: tuple[int, ...]
    rank: int
    trainable: int


class Summary(NamedTuple):
    """Trainable-parameter counts, per module and in total; ``str()`` prints a table and PEFT's line."""

    modules: tuple[ModuleSummary, ...]
    trainable: int
    total: int
    base_bytes: int = 0  # bytes of params as stored (quantized weights by their codes and scales)

    @property
    def bytes_per_parameter(self) -> float:
        """Stored bytes of ``params`` per base parameter (2 for bfloat16, ~0.516 for NF4 weights)."""
        base = self.total - self.trainable
        return self.base_bytes / base if base else 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len(m.path) for m in self.modules] + [6])
        rows = [f"{'module':<{width}}  {'weight':>20}  {'rank':>4}  {'trainable':>12}"]
        rows += [
            f"{m.path:<{width}}  {str(m.weight_shape):>20}  {m.rank or 'full':>4}  {m.trainable:>12,}"
            for m in self.modules
        ]
        rows.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        )
        if self.base_bytes:
            rows.append(f"base: {self.base_bytes:,} bytes ({self.bytes_per_parameter:.3f} bytes a parameter)")
        return "\n".join(rows)


def summary(params: Any, lora: Mapping[str, LoraFactors]) -> Summary:
    """Count trainable (LoRA) and all parameters, like PEFT's ``print_trainable_parameters``.

    Works on abstract trees (``jax.eval_shape`` output): only shapes are read.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((768, 768))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=8))
      >>> print(jaxlora.summary(params, lora).trainable)
      12288
    """
    targets = _fit(params, lora)
    modules = tuple(
        ModuleSummary(
            path,
            tuple(targets[path].leaf.shape),
            f.a.shape[-1],
            math.prod(f.a.shape) + math.prod(f.b.shape) + (0 if f.m is None else math.prod(f.m.shape)),
        )
        if isinstance(f, LoraFactors)
        else ModuleSummary(path, (), 0, f.size)  # a saved module: rank 0, trained in full
        for path, f in lora.items()
    )
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_quantized.is_quantized)
    base = sum(math.prod(leaf.shape) for leaf in leaves if hasattr(leaf, "shape"))
    trainable = sum(m.trainable for m in modules)
    return Summary(modules, trainable, base + trainable, _quantized.nbytes(params))
