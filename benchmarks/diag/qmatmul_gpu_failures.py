"""Which layout, row count and direction of a GPU variant fails `_check` (the device run's diagnostic)."""

import functools
import sys

import jax

sys.path.insert(0, "tests")
import test_qmatmul as t  # noqa: E402

from jaxlora import _qmatmul  # noqa: E402

for s in sys.argv[1:]:
    _qmatmul.configure(s)
    for fmt, block, dq, dtype in [t.LAYOUTS[0], t.LAYOUTS[3], t.LAYOUTS[4]]:
        q = t._quantized(fmt, block, dq, dtype, shape=(512, 1024), seed=5)
        for rows in (1, 16):
            for tr in (False, True):
                x = jax.random.normal(jax.random.key(rows), (rows, 1024 if tr else 512), dtype)
                try:
                    y = jax.jit(functools.partial(_qmatmul.matmul, transpose=tr))(x, q)
                    t._check(y, x, q, transpose=tr)
                    r = "ok"
                except Exception as e:  # noqa: BLE001
                    r = f"{type(e).__name__}: {str(e)[:160]}"
                print(s, fmt, block, rows, "T" if tr else "F", _qmatmul._folded(rows, tr), r, flush=True)
    _qmatmul.configure("")
