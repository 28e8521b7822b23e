"""The checks every third-party model test runs (tests/test_models_*.py), on any ``fn(params, *args)``.

Each check compares jaxlora against a reference that does not go through the code under test's
factored path: the base function itself (B = 0), the base function on ``jaxlora.merge``'s dense
weights (merge equals apply; gradients), each adapter alone (mixed batches), the base function on
dequantized weights (NF4). Tolerances are float32's, relative to the output's scale.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_base_output, assert_trees_close, assert_ulps_close

import jaxlora


@dataclasses.dataclass
class Case:
    """A model under test: ``fn(params, *args)`` returns a float array (logits)."""

    fn: Callable[..., Any]
    params: Any
    args: tuple
    config: jaxlora.LoraConfig
    lora: dict = dataclasses.field(default_factory=dict)  # from jaxlora.init(..., fn=fn, args=args): B = 0
    name: str = ""

    def __post_init__(self):  # one jitted program each, shared by every check (same structures: no recompile)
        self.base = jax.jit(self.fn)
        self.run = jax.jit(lambda p, l, *a: jaxlora.apply(self.fn, p, l, *a))


def make_case(fn, params, args, config, name="", key=0) -> Case:
    lora = jaxlora.init(jax.random.key(key), params, config, fn=fn, args=args)
    return Case(fn, params, args, config, lora, name)


def randomize(lora: dict, seed: int, std: float = 0.05) -> dict:
    """The same factors with ``b`` (and ``a``) drawn at random, so that ΔW is not zero."""
    out = {}
    for i, (path, f) in enumerate(sorted(lora.items())):
        ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
        a = jax.random.normal(ka, f.a.shape, f.a.dtype) * (1.0 / np.sqrt(np.prod(f.a.shape[:-1]) or 1))
        b = jax.random.normal(kb, f.b.shape, f.b.dtype) * std
        out[path] = dataclasses.replace(f, a=a, b=b)
    return out


def rel_close(got, want, rtol: float = 2e-5) -> None:
    """``|got - want| <= rtol · max|want|``, elementwise (float32 sums of a few dozen terms)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"max |got - want| = {err:.3g} = {err / scale:.3g} of the output's scale (> {rtol})"


def check_b0(case: Case, *, eager: bool = False, ulps: float = 4) -> None:
    """B = 0 gives the base output: under jit within ``ulps``; with ``eager``, also op by op bit for bit."""
    if eager:
        got = jaxlora.apply(case.fn, case.params, case.lora, *case.args)
        assert_base_output(got, case.fn(case.params, *case.args), exact=True)
    assert_ulps_close(case.run(case.params, case.lora, *case.args), case.base(case.params, *case.args), ulps=ulps)


def check_merge(case: Case, seed: int = 1) -> None:
    """``apply`` with random factors equals the base function on ``merge``'s dense weights."""
    lora = randomize(case.lora, seed)
    got = case.run(case.params, lora, *case.args)
    want = case.base(jaxlora.merge(case.params, lora), *case.args)
    assert float(np.abs(np.asarray(got) - np.asarray(case.base(case.params, *case.args))).max()) > 1e-4
    rel_close(got, want)


def check_grad(case: Case, seed: int = 2) -> None:
    """``jit(grad)`` through ``apply`` equals the gradient through ``merge``'s dense ``W + ΔW``."""
    lora = randomize(case.lora, seed)
    loss = lambda out: jnp.mean(jnp.square(out.astype(jnp.float32)))  # noqa: E731
    g = jax.jit(jax.grad(lambda l, p, *a: loss(jaxlora.apply(case.fn, p, l, *a))))(lora, case.params, *case.args)
    ref = jax.jit(jax.grad(lambda l, p, *a: loss(case.fn(jaxlora.merge(p, l), *a))))(lora, case.params, *case.args)
    assert all(float(jnp.abs(f.b).max()) > 0 for f in g.values()), "a zero gradient for some b"
    assert_trees_close(g, ref, rtol=2e-4, atol=2e-4 * max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref)))


def check_stack(case: Case) -> None:
    """A mixed-adapter batch (``jaxlora.stack``, one adapter per example) equals each adapter alone."""
    one, two = randomize(case.lora, 3), randomize(case.lora, 4, std=0.1)
    stk = jaxlora.stack({"one": one, "two": two})
    n = jax.tree.leaves(case.args)[0].shape[0]
    ids = jnp.arange(n) % 2
    got = jax.jit(lambda p, s, i, *a: jaxlora.apply(case.fn, p, s, *a, adapter_ids=i))(
        case.params, stk, ids, *case.args
    )
    for k, lora in enumerate((one, two)):
        want = case.run(case.params, lora, *case.args)
        rel_close(np.asarray(got)[k::2], np.asarray(want)[k::2])


def check_nf4(case: Case, *, skip: str = "embed") -> None:
    """An NF4 base: the adapted weights (but embedding tables, paths matching ``skip``) quantized by name;
    ``apply`` on it equals ``apply`` on its dequantized weights."""
    targets = [re.escape(k) for k in case.lora if not re.search(skip, k)]
    q = jaxlora.quantize(case.params, "nf4", targets=targets, exclude=(), block_size=16, double_quant=False)
    assert len(quantized_leaves(q)) == len(targets), (quantized_leaves(q), targets)
    deq = jax.tree.map(
        lambda x: jaxlora.dequantize(x) if isinstance(x, jaxlora.Quantized) else x,
        q,
        is_leaf=lambda x: isinstance(x, jaxlora.Quantized),
    )
    lora = randomize(case.lora, 5)
    rel_close(case.run(q, lora, *case.args), case.run(deq, lora, *case.args))


def matmul_weights(params, is_weight: Callable[[tuple, Any], bool]) -> list[str]:
    """Key paths (as strings) of the leaves ``is_weight(path, leaf)`` selects: what a test expects."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, jaxlora.Quantized))[0]
    return sorted(jax.tree_util.keystr(p) for p, x in flat if is_weight(p, x))


def quantized_leaves(q) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda x: isinstance(x, jaxlora.Quantized))[0]
    return sorted(jax.tree_util.keystr(p) for p, x in flat if isinstance(x, jaxlora.Quantized))


@pytest.fixture(scope="module", autouse=True)
def allow_rank_promotion():
    """Third-party models broadcast ``(d,)`` against ``(batch, seq, d)``: tests/conftest.py's "raise" is ours."""
    with jax.numpy_rank_promotion("allow"):
        yield
