"""Format and dtype conversion into Hugging Face safetensors folders.

* **GGUF -> safetensors.** A GGUF file (llama.cpp's format, often quantized) is
  dequantized through transformers' GGUF support (which uses the ``gguf`` package) into
  a float32 model and its tokenizer, chat template included, then saved as a normal
  Hugging Face folder. The file is checked first, without loading it: its architecture
  must be one transformers can map, and every tensor type one ``gguf`` can dequantize.
* **Folders** (safetensors, or legacy ``pytorch_model.bin`` with ``allow_pickle``) are
  streamed tensor by tensor into sharded safetensors, optionally cast to another dtype.
  A float32 -> float16 cast that overflows (|x| > 65504 becomes inf) is counted and
  reported.

Output folders are written atomically, like merges.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_lite.card import write_hf_metadata
from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.checkpoint import Checkpoint, open_checkpoint, set_config_dtype
from mergekit_lite.io.output import AtomicOutputDir, check_output_path
from mergekit_lite.io.safetensors_io import OutputTensor, ShardedSafetensorsWriter

__all__ = ["convert", "ConvertResult", "check_gguf", "GGUFInfo", "DTYPES"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FP16_MAX = 65504.0


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    tensor_types: dict[str, int]  # quantization type name -> number of tensors


@dataclass
class ConvertResult:
    output: Path
    source_format: str  # "gguf" | "safetensors" | "pickle"
    tensors: int
    bytes_written: int
    overflowed_values: int = 0
    overflowed_tensors: list[str] = field(default_factory=list)


def _gguf_architectures() -> set[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def check_gguf(path: Path) -> GGUFInfo:
    """Read a GGUF file's header and refuse what transformers cannot load."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct errors for junk
        raise CheckpointError(str(path), f"not a readable GGUF file ({e})") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError(str(path), "GGUF file has no general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode()
    supported = _gguf_architectures()
    if arch not in supported:
        raise CheckpointError(
            str(path),
            f"GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(supported))})",
        )
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    for qtype in {tensor.tensor_type for tensor in reader.tensors}:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # one block of zeros tells whether gguf can dequantize this type
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:
            raise CheckpointError(
                str(path),
                f"GGUF quantization {qtype.name} cannot be dequantized by the gguf package",
            ) from None
    return GGUFInfo(path=path, architecture=arch, tensor_types=types)


def _find_gguf(src: Path) -> Path | None:
    if src.is_file():
        if src.suffix != ".gguf":
            raise CheckpointError(str(src), "expected a .gguf file or a model folder")
        return src
    files = sorted(src.glob("*.gguf")) if src.is_dir() else []
    if len(files) > 1 and not any(src.glob("*.safetensors")):
        raise CheckpointError(str(src), f"holds {len(files)} GGUF files; name the one to convert")
    return files[0] if len(files) == 1 and not any(src.glob("*.safetensors")) else None


def _convert_gguf(
    info: GGUFInfo, folder: Path, *, dtype: torch.dtype | None, max_shard_size: int
) -> ConvertResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = info.path
    log.info("GGUF %s: %s, tensor types %s", gguf_file.name, info.architecture, info.tensor_types)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype or torch.float32
    )
    # transformers marks GGUF-loaded models as quantized and will not save them, although
    # the weights are already dequantized: write them ourselves, with a plain config.
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # the head is the embedding: store it once
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    layout = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    writer = ShardedSafetensorsWriter(folder, layout, max_shard_size=max_shard_size)
    try:
        for k, v in state.items():
            writer.write(k, v)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = set_config_dtype(config, dtype or torch.float32)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ConvertResult(folder, "gguf", len(state), writer.bytes_written)


def _convert_folder(
    ckpt: Checkpoint,
    folder: Path,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int,
    progress: Callable[[int, int], None] | None,
) -> ConvertResult:
    infos = list(ckpt.tensors.values())

    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    layout = [OutputTensor(i.name, i.shape, out_dtype(i.dtype)) for i in infos]
    writer = ShardedSafetensorsWriter(folder, layout, max_shard_size=max_shard_size)
    result = ConvertResult(
        folder, "pickle" if infos[0].offset < 0 else "safetensors", len(infos), 0
    )
    try:
        for k, info in enumerate(infos):
            x = ckpt.read(info.name)
            y = x.to(out_dtype(x.dtype))
            if y.dtype == torch.float16 and x.dtype != torch.float16:
                over = int(torch.count_nonzero(torch.isinf(y) & torch.isfinite(x)))
                if over:
                    result.overflowed_values += over
                    result.overflowed_tensors.append(info.name)
            writer.write(info.name, y)
            if progress is not None:
                progress(k + 1, len(infos))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    result.bytes_written = writer.bytes_written
    config = ckpt.config
    if dtype is not None and config:
        config = set_config_dtype(config, dtype)
    if config:
        write_hf_metadata(folder, config=config, source=ckpt.path, tokenizer=ckpt.path)
    if result.overflowed_values:
        log.warning(
            "%d values in %d tensors exceed float16's range (|x| > %g) and became inf; first: %s",
            result.overflowed_values,
            len(result.overflowed_tensors),
            _FP16_MAX,
            result.overflowed_tensors[0],
        )
    return result


def convert(
    src: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int = 5_000_000_000,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert ``src`` (a .gguf file, a model folder / Hub id, or ``model+adapter`` to fold
    a LoRA adapter in) into a safetensors model folder at ``output``, optionally casting
    floating-point weights to ``dtype``."""
    output = Path(output)
    check_output_path(output, overwrite=overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError("--dtype", f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype else None
    path = Path(src).expanduser()
    gguf_file = _find_gguf(path) if path.exists() else None
    # everything is checked before the output folder exists
    info = check_gguf(gguf_file) if gguf_file is not None else None
    ckpt = None if info is not None else open_checkpoint(str(src), allow_pickle=allow_pickle)
    with AtomicOutputDir(output, overwrite=overwrite) as tmp:
        if info is not None:
            result = _convert_gguf(info, tmp, dtype=torch_dtype, max_shard_size=max_shard_size)
        else:
            assert ckpt is not None
            result = _convert_folder(
                ckpt, tmp, dtype=torch_dtype, max_shard_size=max_shard_size, progress=progress
            )
    result.output = output
    return result
