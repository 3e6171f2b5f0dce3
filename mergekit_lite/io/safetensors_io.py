"""Lazy, validating safetensors reader and a streaming, sharded safetensors writer.

Reading parses each file's header once (names, dtypes, shapes, byte ranges) and reads
one tensor at a time with ``pread`` into a fresh buffer. We deliberately do not mmap the
files (as ``safetensors.safe_open`` does): mmapped pages that a merge has touched stay
resident and count towards the process's RSS, so memory would grow with the model size
instead of staying at "a few tensors".

Writing needs no shard buffer at all: the merge plan knows every output tensor's name,
shape and dtype before any math runs, so each shard's header (with its byte offsets) is
written first and the tensors are appended as they are produced. Files written here are
ordinary safetensors files (``__metadata__: {"format": "pt"}``) that
``safetensors.safe_open`` and ``transformers`` read.

Format reference: https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_lite.errors import CheckpointError

__all__ = [
    "TensorInfo",
    "read_safetensors_header",
    "read_tensor",
    "ShardedSafetensorsWriter",
    "plan_shards",
    "SAFETENSORS_DTYPES",
    "dtype_to_safetensors",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# A header larger than this is not a safetensors file (the reference implementation
# uses the same 100 MB bound).
_MAX_HEADER = 100_000_000


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without touching anything else."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in ``file`` (safetensors) or -1 (pickle)
    nbytes: int
    # applied after reading, e.g. folding in a LoRA adapter; ``variant`` names it
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False, repr=False
    )
    variant: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        """Identifies the tensor's *content* (file, name and any transform)."""
        return (str(self.file), self.name, self.variant)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; never reads tensor data.

    Raises :class:`CheckpointError` naming the file for anything that would make a
    later read fail: a short file, a header that is not JSON, unknown dtypes, byte
    ranges that disagree with the shapes or point past the end of the file.
    """
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(where, f"truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    where,
                    f"corrupt or truncated safetensors file: header claims {n} bytes, "
                    f"file has {size}",
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(where, f"cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(where, f"corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(where, "corrupt safetensors header (not a JSON object)")

    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(where, f"corrupt header entry for tensor {name!r}: {e}") from e
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                where,
                f"corrupt header entry for tensor {name!r}: {end - begin} bytes for shape "
                f"{list(shape)} {meta['dtype']}",
            )
        if data_start + end > size:
            raise CheckpointError(
                where,
                f"truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                f"file has {size} bytes",
            )
        out[name] = TensorInfo(name, path, dtype, shape, data_start + begin, expected)
    return out


_pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}
_pickle_lock = threading.Lock()


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A legacy ``.bin`` checkpoint, memory-mapped (``weights_only=True``: no code runs)."""
    with _pickle_lock:
        if path not in _pickle_cache:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(str(path), f"cannot load pickle checkpoint: {e}") from e
            if not isinstance(sd, dict):
                raise CheckpointError(str(path), "pickle checkpoint is not a state dict")
            _pickle_cache[path] = sd
        return _pickle_cache[path]


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh (owned, writable) CPU memory."""
    x = _read_raw(info)
    return x if info.transform is None else info.transform(info.name, x)


def _read_raw(info: TensorInfo) -> torch.Tensor:
    if info.offset < 0:
        return load_pickle_state_dict(info.file)[info.name].clone()
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    # torch.empty, not bytearray: no zero-fill pass before the read overwrites it
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = buf.numpy().data.cast("B")
    try:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [view[done:]], info.offset + done)
                if got == 0:
                    raise CheckpointError(
                        str(info.file), f"truncated while reading tensor {info.name!r}"
                    )
                done += got
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(str(info.file), f"cannot read tensor {info.name!r}: {e}") from e
    return buf.view(info.dtype).reshape(info.shape)


# -- writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(layout: Sequence[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedy split in order: a shard closes before the tensor that would overflow it
    (a single tensor larger than the limit gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in layout:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class ShardedSafetensorsWriter:
    """Write tensors, in ``layout`` order, into ``directory`` as sharded safetensors.

    One shard -> ``model.safetensors``; several -> ``model-0000k-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), the
    layout ``transformers.from_pretrained`` expects.
    """

    def __init__(
        self,
        directory: Path,
        layout: Sequence[OutputTensor],
        *,
        max_shard_size: int,
        basename: str = "model",
    ) -> None:
        self.directory = Path(directory)
        self.basename = basename
        self.shards = plan_shards(layout, max_shard_size)
        n = len(self.shards)
        self.filenames = (
            [f"{basename}.safetensors"]
            if n == 1
            else [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1
        self.bytes_written = 0

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[index]:
            header[t.name] = {
                "dtype": dtype_to_safetensors(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        f = open(self.directory / self.filenames[index], "wb")  # noqa: SIM115
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self._file = f
        self.bytes_written += 8 + len(raw)
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = self._queue[self._pos]
        if (
            name != expected.name
            or tuple(tensor.shape) != expected.shape
            or (tensor.dtype != expected.dtype)
        ):
            raise RuntimeError(
                f"writer expected {expected.name} {list(expected.shape)} {expected.dtype}, "
                f"got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        if shard_index != self._shard:
            self._open_shard(shard_index)
        assert self._file is not None
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(data.view(-1).view(torch.uint8).numpy().data)
        self.bytes_written += expected.nbytes
        self._pos += 1

    def close(self) -> list[str]:
        """Finish the last shard and the index; returns the file names written."""
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if self._file is None and self._queue:
            self._open_shard(0)
        if self._file is not None:
            self._file.close()
            self._file = None
        files = list(self.filenames)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {
                    t.name: self.filenames[i] for i, s in enumerate(self.shards) for t in s
                },
            }
            index_name = f"{self.basename}.safetensors.index.json"
            (self.directory / index_name).write_text(json.dumps(index, indent=2) + "\n")
            files.append(index_name)
        return files

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
