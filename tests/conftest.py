import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a check eagerly and under ``jax.jit``."""
    return (lambda f: f) if request.param == "eager" else jax.jit
