"""Adapter checkpoints: Orbax (`save`, `restore`), PEFT files (`save_peft`, `load_peft`), merged export, stacks."""

from ._commit import CheckpointReplacedError as CheckpointReplacedError
from ._commit import CorruptCheckpointError as CorruptCheckpointError
from ._fingerprint import check as check_base
from ._fingerprint import fingerprint as fingerprint
from ._merged import merge_safetensors as merge_safetensors
from ._merged import save_merged as save_merged
from ._names import TUNIX_NAMES as TUNIX_NAMES
from ._orbax import AdapterInfo as AdapterInfo
from ._orbax import info as info
from ._orbax import restore as restore
from ._orbax import restore_step as restore_step
from ._orbax import save as save
from ._orbax import save_args as save_args
from ._peft import load_peft as load_peft
from ._peft import save_peft as save_peft
from ._peft import torch_name as torch_name
from ._stack import load_peft_stack as load_peft_stack
from ._stack import restore_stack as restore_stack
from ._stack import save_stack as save_stack

__all__ = [
    "AdapterInfo",
    "CheckpointReplacedError",
    "CorruptCheckpointError",
    "TUNIX_NAMES",
    "check_base",
    "fingerprint",
    "info",
    "load_peft",
    "load_peft_stack",
    "merge_safetensors",
    "restore",
    "restore_stack",
    "restore_step",
    "save",
    "save_args",
    "save_peft",
    "save_stack",
    "torch_name",
]
