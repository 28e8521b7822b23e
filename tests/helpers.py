"""Test helpers: NumPy references and tree comparisons."""

import os
import subprocess
import sys

import jax
import numpy as np


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    """Every leaf of ``a`` is close to the leaf of ``b`` at the same path; reports all failing paths."""
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    bad = []
    for (path, x), (_, y) in zip(fa, fb):
        try:
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)
        except AssertionError as e:
            bad.append(f"{jax.tree_util.keystr(path)}: {e}")
    assert not bad, "\n".join(bad)


def assert_ulps_close(got, want, ulps=4):
    """``|got - want| <= ulps`` units in the last place of ``want``'s scale (its largest magnitude).

    For two programs that compute the same ops but that XLA compiles apart (another fusion, another
    dot emitter): they may round differently, by an ulp or so, but no more.
    """
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    unit = np.finfo(want.dtype).eps * float(np.abs(want).max())
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= ulps * unit, f"max |got - want| = {err:.3g}, {err / unit:.2f} ulps of the output's scale (> {ulps})"


def assert_base_output(got, base, *, exact):
    """``B = 0`` gives the base model's output: bit for bit where ``exact``, else within 4 ulps (`assert_ulps_close`).

    Exact holds by construction where both programs run the same ops one at a time (eagerly, no
    loop or nested ``jit`` around a LoRA weight): each rewritten op is the model's own op on the
    untouched ``W``, plus an exact zero. Compiled as a whole (``jit``, a ``scan`` body), the rewritten
    program is not the base program, and XLA may round it differently (docs/design.md, "Numerics").
    """
    if exact:
        np.testing.assert_array_equal(got, base)
    else:
        assert_ulps_close(got, base)


def delta_reference(a, b, roles, scale):
    """ΔW from the factors with NumPy, axis by axis (independent of jaxlora's einsum)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s = [i for i, c in enumerate(roles) if c == "s"]
    i_ax = [i for i, c in enumerate(roles) if c == "i"]
    o_ax = [i for i, c in enumerate(roles) if c == "o"]
    ns = len(s)
    s_shape, i_shape, o_shape = a.shape[:ns], a.shape[ns:-1], b.shape[ns + 1 :]
    r = a.shape[-1]
    a2 = a.reshape((int(np.prod(s_shape)), int(np.prod(i_shape)), r))
    b2 = b.reshape((int(np.prod(s_shape)), r, int(np.prod(o_shape))))
    d = np.stack([x @ y for x, y in zip(a2, b2)]).reshape(s_shape + i_shape + o_shape) * scale
    # axes of d are ordered (s, i, o); put them back in W's order
    order = s + i_ax + o_ax
    return np.transpose(d, np.argsort(order))


def run_with_devices(code: str, n: int = 8, timeout: int = 600) -> str:
    """Run ``code`` in a fresh Python with ``n`` simulated CPU devices; returns its stdout."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")  # conftest's flags too
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def jaxpr_parts(closed) -> tuple[list, list]:
    """Every equation of a closed jaxpr, its sub-jaxprs' (scan, remat, cond bodies) included, and the
    shapes of the arrays it holds as constants (closed over, or non-scalar literals)."""
    from jax.extend import core

    eqns, consts = [], [np.shape(c) for c in closed.consts if np.ndim(c) > 0]

    def walk(j):
        for e in j.eqns:
            eqns.append(e)
            consts.extend(np.shape(v.val) for v in e.invars if isinstance(v, core.Literal) and np.ndim(v.val) > 0)
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if isinstance(sub, core.ClosedJaxpr):
                        consts.extend(np.shape(c) for c in sub.consts if np.ndim(c) > 0)
                        walk(sub.jaxpr)
                    elif isinstance(sub, core.Jaxpr):
                        walk(sub)

    walk(closed.jaxpr)
    return eqns, consts


def reseal(checkpoint):
    """Rewrite the manifest of a jaxlora checkpoint directory after a test edited its files on purpose
    (the edit then reaches the checks behind the checksums); returns the directory."""
    from pathlib import Path

    from jaxlora.checkpoint import _commit

    checkpoint = Path(checkpoint)
    _commit.write_manifest(checkpoint, _commit.read_manifest(checkpoint)["kind"])
    return checkpoint
