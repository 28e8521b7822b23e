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
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
