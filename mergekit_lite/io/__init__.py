"""Checkpoint I/O: model references, lazy sharded reading, atomic sharded writing."""

from mergekit_lite.io.checkpoint import Checkpoint, open_checkpoint, resolve_model_path
from mergekit_lite.io.output import AtomicOutputDir
from mergekit_lite.io.safetensors_io import (
    OutputTensor,
    ShardedSafetensorsWriter,
    TensorInfo,
    read_safetensors_header,
    read_tensor,
)

__all__ = [
    "AtomicOutputDir",
    "Checkpoint",
    "OutputTensor",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "open_checkpoint",
    "read_safetensors_header",
    "read_tensor",
    "resolve_model_path",
]
