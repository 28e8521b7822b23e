"""jaxlora: functional LoRA for JAX and Flax. See docs/design.md for how it works.

The public names load on first use (PEP 562), so that ``python -m jaxlora --help`` answers
without importing JAX; ``import jaxlora`` then ``jaxlora.init`` behaves as a plain re-export.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from . import _nnx as nnx  # noqa: F401
    from . import checkpoint as checkpoint
    from ._combine import combine as combine
    from ._config import LoraConfig as LoraConfig
    from ._core import ModuleSummary as ModuleSummary
    from ._core import Summary as Summary
    from ._core import apply as apply
    from ._core import init as init
    from ._core import merge as merge
    from ._core import summary as summary
    from ._core import unmerge as unmerge
    from ._inits import init_from_weights as init_from_weights
    from ._matmul import LoraFactors as LoraFactors
    from ._matmul import delta as delta
    from ._optim import loraplus as loraplus
    from ._optim import loraplus_labels as loraplus_labels
    from ._optim import mask as mask
    from ._quant import bits_per_parameter as bits_per_parameter
    from ._quant import dequantize as dequantize
    from ._quant import quantize as quantize
    from ._quant import quantize_file as quantize_file
    from ._quant import quantized_shardings as quantized_shardings
    from ._quantized import Quantized as Quantized
    from ._remat import remat_policy as remat_policy
    from ._saved import SavedModule as SavedModule
    from ._serving import AdapterCache as AdapterCache
    from ._serving import serving_compiler_options as serving_compiler_options
    from ._sharding import init_sharded as init_sharded
    from ._sharding import shardings as shardings
    from ._stack import LoraStack as LoraStack
    from ._stack import stack as stack
    from ._stack import stack_set as stack_set
    from ._stack import unstack as unstack
    from ._trace import UnsupportedError as UnsupportedError
    from ._tree import module_path as module_path

from ._version import __version__ as __version__

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "nnx": ("._nnx", None),  # the Flax NNX front-end: jaxlora.nnx.call, .init, .apply, ...
    "checkpoint": (".checkpoint", None),  # a subpackage: Orbax and PEFT adapter files
    "combine": ("._combine", "combine"),
    "LoraConfig": ("._config", "LoraConfig"),
    "ModuleSummary": ("._core", "ModuleSummary"),
    "Summary": ("._core", "Summary"),
    "apply": ("._core", "apply"),
    "init": ("._core", "init"),
    "merge": ("._core", "merge"),
    "summary": ("._core", "summary"),
    "unmerge": ("._core", "unmerge"),
    "init_from_weights": ("._inits", "init_from_weights"),
    "LoraFactors": ("._matmul", "LoraFactors"),
    "delta": ("._matmul", "delta"),
    "loraplus": ("._optim", "loraplus"),
    "loraplus_labels": ("._optim", "loraplus_labels"),
    "mask": ("._optim", "mask"),
    "Quantized": ("._quantized", "Quantized"),
    "bits_per_parameter": ("._quant", "bits_per_parameter"),
    "dequantize": ("._quant", "dequantize"),
    "quantize": ("._quant", "quantize"),
    "quantize_file": ("._quant", "quantize_file"),
    "quantized_shardings": ("._quant", "quantized_shardings"),
    "remat_policy": ("._remat", "remat_policy"),
    "SavedModule": ("._saved", "SavedModule"),
    "AdapterCache": ("._serving", "AdapterCache"),
    "serving_compiler_options": ("._serving", "serving_compiler_options"),
    "init_sharded": ("._sharding", "init_sharded"),
    "shardings": ("._sharding", "shardings"),
    "LoraStack": ("._stack", "LoraStack"),
    "stack": ("._stack", "stack"),
    "stack_set": ("._stack", "stack_set"),
    "unstack": ("._stack", "unstack"),
    "UnsupportedError": ("._trace", "UnsupportedError"),
    "module_path": ("._tree", "module_path"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = importlib.import_module(module, __name__)
        value = value if attr is None else getattr(value, attr)
    elif name.startswith("_") and not name.startswith("__"):  # a private module: jaxlora._tree
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'jaxlora' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:  # the public names, not this file's helpers (importlib, Any, TYPE_CHECKING)
    return sorted([*__all__, "__version__"])
