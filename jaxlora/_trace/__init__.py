"""LoRA for any JAX function, by re-running its jaxpr with targeted weights tagged.

``fn(params, *args)`` is traced once to a jaxpr and evaluated equation by equation, each targeted
weight travelling as a `Tagged` value: ``W`` as the model sees it (after its own casts and
transposes) with its LoRA factors beside it. One module per kind of rule:

- `_eval`: the evaluator, `Tagged`/`View`, the rule registry, untagging, the entry point `run`;
- `_views`: views of ``W`` (casts, transposes, slices, splits, squeezes, reshapes, reshards);
- `_ops`: factored ops (``dot_general``, ``conv_general_dilated``, ``gather``), handing `_matmul.lora_op`
  the base op and the factor ops;
- `_ragged`: expert weights through ``ragged_dot_general`` (mixture-of-experts layers);
- `_quantized`: a quantized weight (`jaxlora.Quantized`) kept packed through calls and scans and
  dequantized at its first real use; `_qdot`: its matmul by the fused kernel instead, where chosen;
- `_control`: calls and control flow (``jit``, custom derivatives, ``remat``, ``scan``, ``cond``,
  ``while``, ``shard_map``).

The same evaluator *probes* a function: with no factors, it records how each weight's axes are used
(contracted, produced, stacked), which is how `jaxlora.init` learns a weight's layout.
"""

from . import _control, _ops, _qdot, _quantized, _ragged, _views  # noqa: F401  (each registers its rules)
from ._control import scan_counts as scan_counts
from ._eval import FALLBACKS as FALLBACKS
from ._eval import Context as Context
from ._eval import Selection as Selection
from ._eval import Tagged as Tagged
from ._eval import UnsupportedError as UnsupportedError
from ._eval import View as View
from ._eval import path_seed as path_seed
from ._eval import run as run
