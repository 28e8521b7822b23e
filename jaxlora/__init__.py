"""jaxlora: functional LoRA for JAX and Flax. See docs/design.md for how it works."""

from . import _nnx as nnx  # the Flax NNX front-end: jaxlora.nnx.call, .init, .apply, ...
from . import checkpoint as checkpoint  # a subpackage: Orbax and PEFT adapter files
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
from ._saved import SavedModule as SavedModule
from ._sharding import init_sharded as init_sharded
from ._sharding import shardings as shardings
from ._trace import UnsupportedError as UnsupportedError
from ._tree import module_path as module_path

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraFactors",
    "ModuleSummary",
    "SavedModule",
    "Summary",
    "UnsupportedError",
    "apply",
    "checkpoint",
    "combine",
    "delta",
    "init",
    "init_from_weights",
    "init_sharded",
    "loraplus",
    "loraplus_labels",
    "mask",
    "merge",
    "module_path",
    "nnx",
    "shardings",
    "summary",
    "unmerge",
]
