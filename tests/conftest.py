import os

# The tests compile thousands of tiny programs, where LLVM's optimizer is most of the compile time: build
# them at -O0 (about halves the suite's time on 2 cores). XLA's own passes (fusion, sharding, the HLO the
# tests inspect) are unchanged; float results may differ in the last bits (LLVM's instruction choice), as between
# any two programs. Subprocesses inherit it; XLA_FLAGS naming a level overrides it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (XLA reads XLA_FLAGS when the backend starts)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a check eagerly and under ``jax.jit``."""
    return (lambda f: f) if request.param == "eager" else jax.jit
