"""The Flax Linen front-end: only what Linen adds beyond a function of params.

`jaxlora.apply(model.apply, params, lora, x)` needs nothing Linen-specific: ``model.apply`` is a
function of its variables dict, and `_tree.module_path` drops the ``params`` collection. This module
names module *kinds* for error messages, by watching which Linen module owns each path while init
traces ``model.apply`` (``nn.intercept_methods``, public API).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn

from ._tree import SEPARATOR


@contextlib.contextmanager
def recording_kinds(fn: Callable[..., Any]) -> Iterator[dict[str, str]]:
    """While active, maps each Linen module path that ``fn`` calls to its class name ("Dense")."""
    kinds: dict[str, str] = {}
    if not isinstance(getattr(fn, "__self__", None), nn.Module):
        yield kinds
        return

    def record(next_fun, args, kwargs, context):
        path = SEPARATOR.join(str(p) for p in context.module.path)
        kinds.setdefault(path, type(context.module).__name__)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        yield kinds
