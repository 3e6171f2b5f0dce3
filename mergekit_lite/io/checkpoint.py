"""Model references and lazy checkpoint indexes.

A model reference is a local folder or a Hugging Face Hub repo id with an optional
``@revision`` (``HuggingFaceTB/SmolLM2-135M-Instruct@main``). Hub ids are resolved with
``huggingface_hub.snapshot_download`` restricted to weights, config and tokenizer files;
``HF_HUB_OFFLINE=1`` makes that a pure local-cache lookup.

:func:`open_checkpoint` reads only metadata: ``config.json`` and the safetensors headers
(or, for legacy pickles that the user explicitly allowed, a memory-mapped state dict).
Tensors are read one at a time with :meth:`Checkpoint.read`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.safetensors_io import (
    TensorInfo,
    load_pickle_state_dict,
    read_safetensors_header,
    read_tensor,
)

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "resolve_model_path",
    "set_config_dtype",
    "HUB_ALLOW_PATTERNS",
]

log = logging.getLogger(__name__)

HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "*.model",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def _looks_local(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything path-like is a (missing) local folder.
    return ref.startswith((".", "/", "~")) or ref.split("@")[0].count("/") > 1 or "\\" in ref


def resolve_model_path(ref: str, *, where: str | None = None) -> Path:
    """Local folder for ``ref``, downloading (or finding in the cache) a Hub snapshot."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(where or ref, f"model reference {ref!r} is a file, not a folder")
        return path
    if _looks_local(ref) or not _HUB_ID.match(ref):
        raise CheckpointError(where or ref, f"model path {ref!r} does not exist")
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except Exception as e:  # network, auth, offline-cache-miss: all the same to a user
        raise CheckpointError(
            where or ref,
            f"{ref!r} is not a local folder and could not be fetched from the Hugging Face "
            f"Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
        ) from e
    return Path(local)


@dataclass
class Checkpoint:
    """Metadata of one input model; tensors are read lazily, one at a time."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path] = field(default_factory=list)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    @property
    def tie_word_embeddings(self) -> bool:
        """As transformers reads it: absent means tied (PretrainedConfig's default)."""
        cfg = self.config.get("text_config", self.config)
        return bool(cfg.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True)))

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def set_config_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A copy of ``config`` whose dtype says ``dtype``: the key the file already uses
    (``dtype`` for transformers 5, ``torch_dtype`` before), or ``torch_dtype``."""
    out = dict(config)
    name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]:
        out[key] = name
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(str(path), f"cannot parse JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(str(path), "expected a JSON object")
    return data


def _pickle_index(files: list[Path]) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, t in load_pickle_state_dict(f).items():
            if isinstance(t, torch.Tensor):
                out[name] = TensorInfo(
                    name, f, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size()
                )
    return out


def open_checkpoint(
    ref: str, *, allow_pickle: bool = False, where: str | None = None
) -> Checkpoint:
    """Index a checkpoint (see :func:`_open_plain`); ``path+adapter`` (mergekit's syntax)
    is the checkpoint at ``path`` with a LoRA adapter folded in as tensors are read."""
    if "+" not in ref:
        return _open_plain(ref, allow_pickle=allow_pickle, where=where)
    from mergekit_lite.io.lora import load_adapter

    base_ref, adapter_ref = ref.split("+", 1)
    ckpt = _open_plain(base_ref, allow_pickle=allow_pickle, where=where)
    adapter = load_adapter(resolve_model_path(adapter_ref, where=where))
    missing = sorted(set(adapter.factors) - set(ckpt.tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            str(adapter.path), f"adapter targets {missing[0]}{more}, which {base_ref} does not have"
        )
    tensors = {
        name: replace(info, transform=adapter.fold, variant=str(adapter.path))
        if name in adapter.factors
        else info
        for name, info in ckpt.tensors.items()
    }
    return Checkpoint(
        ref=ref, path=ckpt.path, config=ckpt.config, tensors=tensors, files=ckpt.files
    )


def _open_plain(ref: str, *, allow_pickle: bool = False, where: str | None = None) -> Checkpoint:
    """Index a checkpoint folder (or Hub id) without reading its tensors.

    Looks for, in order: ``model.safetensors.index.json``, ``model.safetensors``, any
    ``*.safetensors``; then legacy ``pytorch_model.bin(.index.json)``, which is refused
    unless ``allow_pickle`` (then loaded with ``torch.load(weights_only=True)``).
    """
    path = resolve_model_path(ref, where=where)
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}

    index_file = path / "model.safetensors.index.json"
    tensors: dict[str, TensorInfo] = {}
    files: list[Path] = []
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(str(index_file), "index has no weight_map")
        headers: dict[str, dict[str, TensorInfo]] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(str(index_file), f"lists shard {shard!r}, which is missing")
            headers[shard] = read_safetensors_header(shard_path)
            files.append(shard_path)
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(
                    str(path / shard), f"tensor {name!r} listed in the index is not in this shard"
                )
            tensors[name] = headers[shard][name]
    else:
        single = path / "model.safetensors"
        candidates = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
        for f in candidates:
            tensors.update(read_safetensors_header(f))
            files.append(f)
        if not candidates:
            bins = sorted(path.glob("pytorch_model*.bin"))
            if bins:
                if not allow_pickle:
                    raise CheckpointError(
                        str(bins[0]),
                        "legacy pickle weights can run arbitrary code when loaded; convert to "
                        "safetensors or pass --allow-pickle to load them with "
                        "torch.load(weights_only=True)",
                    )
                tensors = _pickle_index(bins)
                files = bins
            else:
                raise CheckpointError(
                    str(path),
                    "no weights found (expected model.safetensors, "
                    "model.safetensors.index.json or pytorch_model.bin)",
                )
    if not tensors:
        raise CheckpointError(str(files[0] if files else path), "checkpoint has no weights")
    return Checkpoint(ref=ref, path=path, config=config, tensors=tensors, files=files)
