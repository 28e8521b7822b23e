"""The LoRA term of a mixed batch alone, each form side by side (issue 24): gather, one-hot, SGMV.

One rank-16 pair on a 4,096-wide input (the 8B model's projections: N = 4,096 or 14,336), bf16, for
decode (64 rows, one per example) and prefill (8 examples x 1,024 rows), the examples' adapters out
of ``slots`` resident. Forms: ``gather`` (each row's factors gathered), ``onehot`` (every slot's
factors, masked), ``sgmv`` (`jaxlora._matmul._sgmv_rows` with ``lax.ragged_dot``) and, where
tokamax imports, ``sgmv_tokamax`` (its ``ragged_dot``); ``base`` is ``x·W`` for scale. Each
median of 20 jitted calls, every array a jit argument.

    python -m benchmarks.sgmv_probe --out benchmarks/results/sgmv_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _matmul

CASES = {  # name: (examples, rows per example, distinct adapters, resident slots, N)
    "decode_8_of_64": (64, 1, 8, 64, 4096),
    "decode_64_of_64": (64, 1, 64, 64, 4096),
    "decode_64_of_1024": (64, 1, 64, 1024, 4096),
    "decode_8_of_64_n14336": (64, 1, 8, 64, 14336),
    "prefill_8_of_8": (8, 1024, 8, 8, 4096),
}


def _forms():
    def gather(x, ids, a, b):
        return jnp.einsum("mr,mrn->mn", jnp.einsum("mk,mkr->mr", x, a[ids]), b[ids])

    def onehot(x, ids, a, b):
        slots, k, r = a.shape
        t = (x @ a.transpose(1, 0, 2).reshape(k, slots * r)).reshape(-1, slots, r)
        t = t * (jnp.arange(slots)[None, :] == ids[:, None]).astype(t.dtype)[..., None]
        return t.reshape(-1, slots * r) @ b.reshape(slots * r, -1)

    def sgmv(x, ids, a, b):
        return _matmul._sgmv_rows(x, ids, jnp.ones(ids.shape, x.dtype), a, b)

    forms = {"gather": gather, "onehot": onehot, "sgmv": sgmv}
    try:
        import tokamax

        def sgmv_tokamax(x, ids, a, b):
            saved, _matmul._RAGGED_DOT = _matmul._RAGGED_DOT, tokamax.ragged_dot
            try:
                return sgmv(x, ids, a, b)
            finally:
                _matmul._RAGGED_DOT = saved

        forms["sgmv_tokamax"] = sgmv_tokamax
    except Exception as e:  # noqa: BLE001  (optional: recorded, not fatal)
        forms["sgmv_tokamax"] = repr(e)
    return forms


def _time(f, *args, n=20):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rank", type=int, default=16)
    a_ = p.parse_args()
    dt, k, r = jnp.bfloat16, 4096, a_.rank
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "rank": r, "k": k, "cases": {}}  # fmt: skip
    forms = _forms()
    for name in a_.cases.split(","):
        e, t, distinct, slots, n = CASES[name]
        keys = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(keys[0], (e * t, k), dt)
        a = (jax.random.normal(keys[1], (slots, k, r)) / 64).astype(dt)
        b = (jax.random.normal(keys[2], (slots, r, n)) / 4).astype(dt)
        w = (jax.random.normal(keys[3], (k, n)) / 64).astype(dt)
        ids = jnp.repeat(jnp.arange(e) % distinct * (slots // distinct), t)
        row = {"rows": e * t, "distinct": distinct, "slots": slots, "n": n,
               "base_ms": _time(jax.jit(lambda x, w: x @ w), x, w),
               "used_factor_bytes": distinct * (k * r + r * n) * 2}  # fmt: skip
        ref = np.asarray(forms["gather"](x, ids, a, b), np.float32)
        for form, f in forms.items():
            if isinstance(f, str):
                row[form] = {"error": f}
                continue
            try:
                got = np.asarray(jax.jit(f)(x, ids, a, b), np.float32)
                err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-9))
                row[form] = {"ms": _time(jax.jit(f), x, ids, a, b), "max_rel_err": err}
            except Exception as ex:  # noqa: BLE001
                row[form] = {"error": repr(ex)[:300]}
        result["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    if a_.out:
        with open(a_.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
