"""LoRA extraction (fine-tune -> adapter) and application (adapter -> full weights).

Extraction approximates each linear module's task vector ``delta = W_ft - W_base``
(out x in) by its best rank-``r`` approximation (Eckart-Young: the truncated SVD)::

    delta = U S V^T  ~  U_r S_r V_r^T = B @ A,   B = U_r sqrt(S_r),  A = sqrt(S_r) V_r^T

written as a PEFT LoRA adapter (Hu et al. 2021, https://arxiv.org/abs/2106.09685) with
``lora_alpha = r`` so the scaling is 1. The *retained energy* of a module is
``sum(S_r^2) / sum(S^2)``: the fraction of the task vector's squared Frobenius norm the
adapter keeps; a delta of rank <= r is kept exactly (energy 1). Modules are streamed one
at a time; only 2-D weights inside the transformer layers are adapted (attention and
MLP projections), embeddings, norms and the LM head stay with the base.

Application folds an adapter into full weights (:mod:`mergekit_lite.io.lora`); it is
``merge convert BASE+ADAPTER``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_lite.errors import MergeError
from mergekit_lite.io.checkpoint import open_checkpoint
from mergekit_lite.io.lora import PEFT_PREFIX
from mergekit_lite.io.output import AtomicOutputDir, check_output_path
from mergekit_lite.io.safetensors_io import OutputTensor, ShardedSafetensorsWriter
from mergekit_lite.plan import LayerLayout
from mergekit_lite.surgery.convert import ConvertResult, convert

__all__ = ["extract_lora", "apply_lora", "ExtractResult"]

log = logging.getLogger(__name__)

#: model types whose linear layers are GPT-2 style Conv1D (weight stored as in x out)
_CONV1D_MODEL_TYPES = {"gpt2"}


@dataclass
class ExtractResult:
    output: Path
    rank: int
    energy: dict[str, float] = field(default_factory=dict)  # module -> retained energy
    target_modules: list[str] = field(default_factory=list)

    @property
    def mean_energy(self) -> float:
        return sum(self.energy.values()) / max(1, len(self.energy))

    @property
    def min_energy(self) -> tuple[str, float]:
        name = min(self.energy, key=lambda k: self.energy[k])
        return name, self.energy[name]


def _linear_weights(layout: LayerLayout, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    names = []
    for layer in layout.layers.values():
        for full in layer.values():
            if full.endswith(".weight") and len(shapes[full]) == 2:
                names.append(full)
    return names


def extract_lora(
    model: str,
    base: str,
    output: str | Path,
    *,
    rank: int,
    overwrite: bool = False,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Write a PEFT LoRA adapter of rank ``rank`` approximating ``model - base``."""
    output = Path(output)
    check_output_path(output, overwrite=overwrite)
    if rank < 1:
        raise MergeError("--rank", f"must be at least 1, got {rank}")
    ft = open_checkpoint(model, allow_pickle=allow_pickle)
    bs = open_checkpoint(base, allow_pickle=allow_pickle)
    layout = LayerLayout.of(bs)
    shapes = {n: i.shape for n, i in bs.tensors.items()}
    targets = _linear_weights(layout, shapes)
    if not targets:
        raise MergeError(str(bs.path), "found no linear weights inside transformer layers")
    fan_in_fan_out = bs.config.get("model_type") in _CONV1D_MODEL_TYPES
    for name in targets:
        if name not in ft.tensors:
            raise MergeError(str(ft.path), f"tensor {name!r} is missing from this model")
        if ft.tensors[name].shape != shapes[name]:
            raise MergeError(
                name,
                f"shapes disagree: {model} {list(ft.tensors[name].shape)}, "
                f"{base} {list(shapes[name])} (different architectures?)",
            )
        if rank > min(shapes[name]):
            raise MergeError(
                "--rank",
                f"{rank} is larger than {name} allows (shape {list(shapes[name])}: "
                f"at most {min(shapes[name])})",
            )

    layout_out: list[OutputTensor] = []
    for name in targets:
        out_dim, in_dim = shapes[name][::-1] if fan_in_fan_out else shapes[name]
        module = PEFT_PREFIX + name.removesuffix(".weight")
        layout_out.append(OutputTensor(f"{module}.lora_A.weight", (rank, in_dim), dtype))
        layout_out.append(OutputTensor(f"{module}.lora_B.weight", (out_dim, rank), dtype))
    result = ExtractResult(output=output, rank=rank)
    result.target_modules = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in targets})
    with AtomicOutputDir(output, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(
            tmp, layout_out, max_shard_size=1 << 62, basename="adapter_model"
        )
        try:
            for k, name in enumerate(targets):
                delta = ft.read(name).float() - bs.read(name).float()
                if fan_in_fan_out:
                    delta = delta.T
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                root = s[:rank].sqrt()
                a = root[:, None] * vh[:rank]  # (r, in)
                b = u[:, :rank] * root[None, :]  # (out, r)
                total = float((s.double() ** 2).sum())
                kept = float((s[:rank].double() ** 2).sum())
                result.energy[name.removesuffix(".weight")] = kept / total if total > 0 else 1.0
                module = PEFT_PREFIX + name.removesuffix(".weight")
                writer.write(f"{module}.lora_A.weight", a.to(dtype).contiguous())
                writer.write(f"{module}.lora_B.weight", b.to(dtype).contiguous())
                if progress is not None:
                    progress(k + 1, len(targets))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": rank,
            "lora_alpha": rank,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "target_modules": result.target_modules,
            "inference_mode": True,
            "use_rslora": False,
            "modules_to_save": None,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "extraction.json").write_text(
            json.dumps(
                {"model": model, "base": base, "rank": rank, "energy": result.energy}, indent=2
            )
            + "\n"
        )
    log.info(
        "extracted rank-%d LoRA of %d modules, mean energy %.4f",
        rank,
        len(targets),
        result.mean_energy,
    )
    return result


def apply_lora(
    base: str,
    adapter: str,
    output: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int = 5_000_000_000,
) -> ConvertResult:
    """Fold ``adapter`` into ``base`` and write full weights (``merge convert BASE+ADAPTER``)."""
    return convert(
        f"{base}+{adapter}",
        output,
        dtype=dtype,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        max_shard_size=max_shard_size,
    )
