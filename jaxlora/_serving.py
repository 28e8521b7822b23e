"""Serving many adapters: `AdapterCache`, an LRU of device slots fed from host memory or disk, and
`serving_compiler_options`, the XLA options under which decode-shaped products read at full bandwidth.

The cache holds a folded `LoraStack` (``fold_scales=True``) of ``max_loras`` slots with fixed names
(``slot0``, ``slot1``, ...): every slot has scale 1 and rank ``R``, so writing any adapter into any
slot changes no static metadata and nothing that takes the stack recompiles. An adapter is written
by one jitted program (the slot index traced, the stack donated, so the write is in place) that
compiles once per stack layout and adapter dtype.
"""

from __future__ import annotations

import collections
import difflib
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._matmul import LoraFactors
from ._stack import LoraStack, _check_lora

Source = Mapping[str, LoraFactors] | str | os.PathLike
_Layout = dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]  # path -> (roles, a's shape w/o rank, b's w/o rank)


def serving_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for decode steps: ``jax.jit(step, compiler_options=jaxlora.serving_compiler_options())``.

    On GPUs, ``{"xla_gpu_enable_triton_gemm": False}``: XLA's Triton GEMM reads the weights of a
    skinny product (1 to 64 rows, a decode step) at about 1.05 TB/s on an H200, cuBLAS at 2.7 TB/s
    (docs/performance.md). Passed to one ``jax.jit``, the option holds for that program alone, so
    training steps keep XLA's defaults; a whole process gets it from
    ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` set before JAX starts. Elsewhere: ``{}``.

    Args:
      backend: the platform to compile for (default: ``jax.default_backend()``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> jaxlora.serving_compiler_options("gpu")
      {'xla_gpu_enable_triton_gemm': False}
      >>> step = jax.jit(lambda w, x: x @ w, compiler_options=jaxlora.serving_compiler_options())
      >>> step(jnp.ones((4, 3)), jnp.ones((1, 4))).shape
      (1, 3)
    """
    backend = jax.default_backend() if backend is None else backend
    return {"xla_gpu_enable_triton_gemm": False} if backend in ("gpu", "cuda", "rocm") else {}


@functools.partial(jax.jit, donate_argnums=0)
def _write(stk: LoraStack, slot: jax.Array, a: dict, b: dict, scale: dict) -> LoraStack:
    """``stk`` with slot ``slot`` (traced: one program for every slot) holding ``a`` and ``scale·b``, in place.

    ``a``, ``b``: one slot's factors (rank ``R``) in the adapter's dtype; the scale is folded and the
    dtype cast here, on the device, as `jaxlora.stack_set` does it (``b·scale`` from at least float32, rounded once).
    """
    roles, new_a, new_b = dict(stk.roles), {}, {}
    for p, x in stk.a.items():
        new_a[p] = jax.lax.dynamic_update_index_in_dim(x, a[p].astype(x.dtype), slot, x.ndim - 2)
    for p, x in stk.b.items():
        fb = (b[p].astype(jnp.promote_types(b[p].dtype, jnp.float32)) * scale[p]).astype(x.dtype)
        new_b[p] = jax.lax.dynamic_update_index_in_dim(x, fb, slot, roles[p].count("s"))
    return LoraStack(new_a, new_b, stk.scale, stk.rank, stk.names, stk.roles, stk.dropout, folded=True)


def _host(lora: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
    """``lora`` on the host, owned by the cache: a NumPy array the caller can still write (``np.array``,
    ``torch.Tensor.numpy()``'s shared memory) is copied, so later writes never reach the adapter."""
    own = lambda x: x.copy() if isinstance(x, np.ndarray) and x.flags.writeable else x  # noqa: E731
    return jax.tree.map(own, jax.device_get(dict(lora)))


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _describe(name: str, source: Any) -> tuple[_Layout, dict[str, int], list[Any], list[str]]:
    """``(layout, ranks, dtypes, problems)`` of one source, read without loading a checkpoint's arrays."""
    if _is_path(source):
        from . import checkpoint

        try:
            modules = checkpoint.info(source).modules
        except (FileNotFoundError, ValueError) as e:
            return {}, {}, [], [f"adapter {name!r}: {source} cannot be read: {e}"]
        saved = sorted(p for p, m in modules.items() if m.get("kind") == "saved")
        dora = sorted(p for p, m in modules.items() if "m_shape" in m)
        if saved or dora:
            what = f"saved modules (modules_to_save) {saved}" if saved else f"DoRA modules {dora}"
            return {}, {}, [], [f"adapter {name!r} at {source}: {what} cannot be served from a stack"]
        layout, ranks = {}, {}
        for p, m in modules.items():
            ns = m["roles"].count("s")
            layout[p] = (m["roles"], tuple(m["a_shape"][:-1]), tuple(m["b_shape"][ns + 1 :]))
            ranks[p] = m["a_shape"][-1]
        return layout, ranks, [m["dtype"] for m in modules.values()], []
    if not isinstance(source, Mapping):
        problem = (
            f"adapter {name!r}: expected a LoRA tree ({{path: LoraFactors}}, as jaxlora.init returns) or the "
            f"directory of a jaxlora.checkpoint.save, got {type(source).__name__}"
        )
        return {}, {}, [], [problem]
    problems = _check_lora(name, source)
    if problems:
        return {}, {}, [], problems
    layout = {
        p: (f.roles, tuple(f.a.shape[:-1]), tuple(f.b.shape[f.roles.count("s") + 1 :])) for p, f in source.items()
    }
    return layout, {p: f.rank for p, f in source.items()}, [f.a.dtype for f in source.values()], []


class AdapterCache:
    """An LRU of ``max_loras`` device slots (a folded `LoraStack`) holding adapters on demand.

    Registered adapters live in host memory (LoRA trees, kept as NumPy arrays) or on disk (the
    directories of `jaxlora.checkpoint.save`, read again on each load). `ids` takes the adapter
    names of a batch, writes those not resident into free or least recently used slots, and returns
    the ``adapter_ids`` for `jaxlora.apply`::

        ids = cache.ids(["sql", None, "chat"])  # -1 for None: the base alone
        out = serve(params, cache.stack, tokens, ids)

    Slots have fixed names and every slot scale 1 and rank ``R`` (scales folded into ``b``), so
    adapters coming and going never recompile ``serve``. A write donates the previous stack: read
    ``cache.stack`` after each `ids`, never keep an older one. The stack takes each module that any
    registered adapter adapts (a module an adapter lacks is zero in its slot) and carries no LoRA
    dropout; each slot is padded to rank ``R``.

    Args:
      adapters: ``{name: lora or directory}``: the adapters known from the start; they fix the
        modules and (without ``rank``) the slot rank.
      max_loras: the number of device slots (vLLM's name): the most distinct adapters in one batch.
      rank: the slot rank ``R`` (default: the largest rank among ``adapters``); room for adapters
        added later.
      dtype: the stack's dtype (default: the adapters' common dtype).

    Attributes:
      max_loras: the number of slots.
      loads: how many adapters have been written into slots so far (misses).

    Raises:
      ValueError: for ``max_loras`` or ``rank`` not an int of at least 1, no adapters, adapters
        that do not fit one stack (other weight layouts for a module, a rank above ``rank``, DoRA,
        saved modules), or unreadable directories; every problem named at once.
      TypeError: for a source that is neither a LoRA tree nor a directory.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> make = lambda k: jaxlora.init(jax.random.key(k), params, jaxlora.LoraConfig(rank=2))
      >>> cache = jaxlora.AdapterCache({"sql": make(0), "chat": make(1), "math": make(2)}, max_loras=2)
      >>> cache.ids(["sql", None, "chat", "sql"]).tolist()
      [0, -1, 1, 0]
      >>> cache.ids(["chat"]).tolist(), cache.ids(["math"]).tolist()  # "math" evicts "sql", least recently used
      ([1], [0])
      >>> cache.resident, cache.loads, cache.stack.a["w"].shape
      ({'chat': 1, 'math': 0}, 3, (4, 2, 2))
    """

    def __init__(
        self, adapters: Mapping[str, Source], *, max_loras: int, rank: int | None = None, dtype: Any = None
    ) -> None:
        if not isinstance(adapters, Mapping):
            raise TypeError(f"adapters must be a dict {{name: lora or directory}}, got {type(adapters).__name__}")
        whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1  # noqa: E731
        problems = [] if whole(max_loras) else [f"max_loras={max_loras!r}: expected an int, at least 1"]
        if rank is not None and not whole(rank):
            problems.append(f"rank={rank!r}: expected an int, at least 1 (the slot rank)")
        if not adapters:
            problems.append("no adapters given: pass {name: lora or checkpoint directory, ...}")
        if any(not (_is_path(s) or isinstance(s, Mapping)) for s in adapters.values()):
            bad = {n: type(s).__name__ for n, s in adapters.items() if not (_is_path(s) or isinstance(s, Mapping))}
            raise TypeError(
                f"adapters {bad}: each must be a LoRA tree ({{path: LoraFactors}}) or a jaxlora.checkpoint directory"
            )
        layout: _Layout = {}
        ranks: dict[str, int] = {}
        dtypes: list[Any] = []
        for name, source in adapters.items():
            lay, rk, dt, bad = _describe(name, source)
            problems += bad
            for p, want in lay.items():
                if layout.setdefault(p, want) != want:
                    problems.append(f"{p!r}: adapter {name!r} was made for another weight: {want} against {layout[p]}")
                ranks[p] = max(ranks.get(p, 0), rk[p])
            dtypes += dt
        R = int(rank) if rank is not None and whole(rank) else max(ranks.values(), default=0)
        big = sorted(p for p, r in ranks.items() if r > R)
        if big and (rank is None or whole(rank)):
            problems.append(f"modules {big} have rank {max(ranks[p] for p in big)} > rank={R}; pass a larger rank=")
        if problems:
            raise ValueError("jaxlora.AdapterCache:\n  " + "\n  ".join(problems))
        self._layout, self._rank = layout, R
        self._dtype = jnp.dtype(dtype or jnp.result_type(*dtypes))
        self._sources: dict[str, Source] = {}
        for name, source in adapters.items():
            self._sources[name] = source if _is_path(source) else _host(source)
        self._resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first
        max_loras = int(max_loras)
        self._free = list(range(max_loras))
        self.max_loras = max_loras
        self.loads = 0
        a, b = {}, {}
        for p, (roles, i_shape, o_shape) in layout.items():
            ns = roles.count("s")
            a[p] = jnp.zeros((*i_shape, max_loras, R), self._dtype)
            b[p] = jnp.zeros((*i_shape[:ns], max_loras, R, *o_shape), self._dtype)
        self._stack = LoraStack(
            a, b, {p: (1.0,) * max_loras for p in layout}, {p: (R,) * max_loras for p in layout},
            tuple(f"slot{i}" for i in range(max_loras)), tuple((p, v[0]) for p, v in layout.items()),
            tuple((p, 0.0) for p in layout), folded=True,
        )  # fmt: skip

    @property
    def stack(self) -> LoraStack:
        """The device stack: pass it to `jaxlora.apply` with the ids from `ids` (donated by the next load)."""
        return self._stack

    @property
    def resident(self) -> dict[str, int]:
        """``{name: slot}`` of the adapters on the device, least recently used first."""
        return dict(self._resident)

    def add(self, name: str, source: Source) -> None:
        """Register one more adapter (host LoRA tree or checkpoint directory); nothing is loaded yet.

        Raises:
          ValueError: for a name already registered (adapters are immutable: register a new version
            under a new name), or an adapter that does not fit the stack (a module it lacks, another
            weight layout, a rank above ``R``).
        """
        if name in self._sources:
            raise ValueError(f"adapter {name!r} is already registered; register a new version under a new name")
        if not (_is_path(source) or isinstance(source, Mapping)):
            raise TypeError(f"adapter {name!r}: expected a LoRA tree or a checkpoint directory, got {type(source)}")
        problems = self._misfits(name, source)
        if problems:
            raise ValueError(
                f"jaxlora.AdapterCache.add cannot take adapter {name!r}:\n  " + "\n  ".join(problems) + "\nFix: make "
                "the cache with this adapter among `adapters` (or pass a larger rank=) so that its stack has room."
            )
        self._sources[name] = source if _is_path(source) else _host(source)

    def _misfits(self, name: str, source: Source) -> list[str]:
        """Why adapter ``name`` cannot be written into a slot (a module the stack lacks, another weight
        layout, a rank above ``R``, DoRA, saved modules); empty if it fits."""
        lay, ranks, _, problems = _describe(name, source)
        for p, want in lay.items():
            if p not in self._layout:
                problems.append(f"{p!r}: the cache's stack has no such module (it has {list(self._layout)})")
            elif want != self._layout[p]:
                problems.append(f"{p!r}: made for another weight: {want} against the stack's {self._layout[p]}")
            elif ranks[p] > self._rank:
                problems.append(f"{p!r}: rank {ranks[p]} > the slot rank {self._rank}")
        return problems

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """The ``adapter_ids`` (int32, one per name; -1 for ``None``) of a batch, loading what is missing.

        Each adapter not resident is written into a free slot or into the least recently used one
        that this batch does not name; the batch's adapters become the most recently used. The ids
        hold until the next call: a later batch may evict an adapter this one names, and its old ids
        would then pick another adapter's slot. Call ``ids`` once a step with every row that step serves
        (a hit is a dict lookup), never reuse the ids of an earlier call.

        Raises:
          ValueError: for a name never registered, or more distinct names than ``max_loras``.
        """
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        unknown = [n for n in wanted if n not in self._sources]
        if unknown:
            close = {n: difflib.get_close_matches(str(n), list(self._sources), n=2) for n in unknown}
            raise ValueError(
                f"unknown adapters {unknown} (closest registered: {close}); register them with AdapterCache.add"
            )
        if len(wanted) > self.max_loras:
            raise ValueError(
                f"the batch names {len(wanted)} distinct adapters but the cache has max_loras={self.max_loras} "
                "slots; split the batch or make the cache with a larger max_loras"
            )
        for n in wanted:
            if n in self._resident:
                self._resident.move_to_end(n)
        for n in wanted:
            if n not in self._resident:
                a, b, scale = self._padded(n)  # before any eviction: a failed read leaves the cache as it was
                slot = self._free[0] if self._free else next(iter(self._resident.values()))
                self._stack = _write(self._stack, np.int32(slot), a, b, scale)
                if self._free:  # the slot changes hands only once it is written
                    self._free.pop(0)
                else:
                    self._resident.popitem(last=False)
                self._resident[n] = slot
                self.loads += 1
        return np.array([-1 if n is None else self._resident[n] for n in names], np.int32)

    def _padded(self, name: str) -> tuple[dict, dict, dict]:
        """Adapter ``name``'s factors as host arrays of one slot (rank ``R``, the adapter's own dtype), and
        its scales; a module it lacks is zeros. Folding and casting run on the device (`_write`): NumPy
        takes about 10 ns an element to round to bfloat16, 0.2 s for an 8B model's rank-16 adapter."""
        source = self._sources[name]
        if _is_path(source):
            from . import checkpoint

            path, source = source, jax.device_get(checkpoint.restore(source))
            problems = self._misfits(name, source)  # the directory may have changed since it was registered
            if problems:
                raise ValueError(
                    f"jaxlora.AdapterCache: adapter {name!r} at {path} no longer fits the stack (it changed on disk "
                    "after it was registered):\n  " + "\n  ".join(problems) + "\nFix: save a new version to a new "
                    "directory and register it under a new name (AdapterCache.add)."
                )
        a, b, scale = {}, {}, {}
        zero = next((np.asarray(f.a).dtype for f in source.values()), self._dtype)  # one dtype: one program
        for p, (roles, i_shape, o_shape) in self._layout.items():
            ns, f = roles.count("s"), source.get(p)
            if f is None:
                a[p] = np.zeros((*i_shape, self._rank), zero)
                b[p] = np.zeros((*i_shape[:ns], self._rank, *o_shape), zero)
                scale[p] = np.float32(0.0)
                continue
            a[p], b[p] = np.asarray(f.a), np.asarray(f.b)
            scale[p] = np.asarray(f.scale, jnp.promote_types(b[p].dtype, jnp.float32))  # float64 b: no rounding
            if f.rank < self._rank:  # zero-padded to the slot rank, in the adapter's dtype (a copy, no rounding)
                pa = np.zeros((*i_shape, self._rank), a[p].dtype)
                pa[..., : f.rank] = a[p]
                pb = np.zeros((*i_shape[:ns], self._rank, *o_shape), b[p].dtype)
                pb[(slice(None),) * ns + (slice(0, f.rank),)] = b[p]
                a[p], b[p] = pa, pb
        return a, b, scale
