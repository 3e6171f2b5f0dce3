"""Task-vector diagnostics: how far each model moved from the base, and how two moves interfere.

A *task vector* is a fine-tuned model minus its base, ``delta = theta_model - theta_base``
(Ilharco et al. 2022, "Editing Models with Task Arithmetic",
https://arxiv.org/abs/2212.04089). Merge methods add task vectors; they work well when
the vectors agree and badly when they interfere, most visibly when they push the same
parameter in opposite directions (Yadav et al. 2023, "TIES-Merging: Resolving Interference
When Merging Models", https://arxiv.org/abs/2306.01708). :func:`inspect_models` measures
both before you merge.

Every tensor the base has is streamed once: the base tensor and each model's tensor of
that name are read (:meth:`Checkpoint.read`), converted to float32, the deltas formed and
measured in chunks of 2**20 entries, and everything is dropped before the next name. Memory
is therefore one tensor name's worth (the base plus one delta per model), whatever the
model size. Sums are accumulated in float64. Non-floating tensors are skipped; a model
with tied embeddings and no ``lm_head.weight`` is compared through its input embedding
where the base has a separate head; tensors only a model has are ignored (and logged).

Per model, per tensor (and summed over layers, module kinds and the whole model):

* ``delta_norm``: ``||delta||_2``. Groups combine as ``sqrt(sum of squares)``, i.e. the
  norm of the concatenated group.
* ``base_norm`` and ``relative_norm = ||delta|| / ||base||`` (``None`` when the base
  norm is 0).
* ``near_zero_fraction``: the share of entries with ``|delta| <= eps`` (absolute,
  default ``1e-6``: above float32 round-off of weights up to about 8 in magnitude, below the
  bfloat16 resolution of typical weights). Groups are count-weighted.
* ``kept_mass_fraction[d]`` for ``d`` in 0.1, 0.2, ..., 1.0: the share of the squared L2
  mass ``||delta||^2`` that survives when every tensor keeps only its top ``d * n``
  entries by ``|delta|``, the per-tensor magnitude trimming of TIES. It is computed from a
  log2 histogram of ``|delta|`` per tensor (8 bins per octave, from the float32 exponent
  and top three mantissa bits, over every entry: no sampling, constant memory),
  interpolating inside the one bin the cut falls in, so it is exact up to that bin's
  width (magnitudes within 12.5 % of each other).
* ``recommended_density``: **the smallest d in {0.1, ..., 1.0} whose kept_mass_fraction
  is at least 0.9** (``DENSITY_MASS``), i.e. the sparsest TIES/DARE ``density`` that keeps
  90 % of the task vector's energy. A Gaussian task vector gets 0.5, a heavy-tailed one
  (typical of real fine-tunes) less; ``None`` for a zero task vector. It is a starting
  point for a density sweep, not an optimum.

Per pair of models ``a < b``, per tensor (and per layer, module kind, whole model):

* ``cosine = <delta_a, delta_b> / (||delta_a|| ||delta_b||)`` from float64 dot products
  and squared norms summed over the group; ``None`` when either vector is zero.
  Unrelated task vectors give about 0.
* ``sign_conflict_rate``: among the entries where both ``|delta_a| > eps`` and
  ``|delta_b| > eps`` (their number is ``sign_basis``), the fraction with opposite signs,
  the interference TIES resolves by sign election; ``None`` when ``sign_basis`` is 0.
  Unrelated vectors give about 0.5.
* ``topk_overlap``: per tensor, ``A`` is the set of entries in the top
  ``k = ceil(top_k * n)`` of ``|delta_a|`` (the threshold is the exact k-th largest
  ``|delta_a|``, the value ``torch.kthvalue`` gives, found with the faster
  ``numpy.partition``; entries tied with it are included, entries with
  ``|delta| <= eps`` excluded), ``B`` likewise; the overlap is
  ``|A & B| / ((|A| + |B|) / 2)``, which is ``|A & B| / k`` when there are no ties.
  Groups sum numerators and denominators (count-weighted); ``None`` when ``A`` or ``B``
  is empty over the whole group. Unrelated vectors give about ``top_k``.

Interference summary per pair: the three layer groups with the highest sign-conflict
rate and the three with the lowest cosine. Layer groups are ``embed`` (non-layer tensors
named like embeddings), the transformer layers ``0 .. n-1`` (:class:`LayerLayout`) and
``final`` (the other non-layer tensors: final norm, LM head). Module kinds are ``norms``
(names with ``norm``/``ln_``/``layernorm``; checked first, so
``post_attention_layernorm`` is a norm), ``embeddings`` (``embed``/``wte``/``wpe``/
``lm_head``), ``attention`` (``attn``/``attention``/``q_proj``/``k_proj``/``v_proj``/
``o_proj``/``c_attn``), ``mlp`` (``mlp``/``gate_proj``/``up_proj``/``down_proj``/``c_fc``/
``fc1``/``fc2``/``ffn``/``experts``) and ``other``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mergekit_lite.errors import MergeError, MergekitLiteError, RecipeError
from mergekit_lite.io.checkpoint import Checkpoint, open_checkpoint
from mergekit_lite.plan import LayerLayout

__all__ = [
    "DEFAULT_TOP_K",
    "DEFAULT_EPS",
    "DENSITIES",
    "DENSITY_MASS",
    "DEFINITIONS",
    "DeltaStats",
    "PairStats",
    "TensorReport",
    "InspectReport",
    "inspect_models",
    "module_kind",
    "write_json",
    "save_heatmap",
]

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 0.2
DEFAULT_EPS = 1e-6
DENSITIES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
DENSITY_MASS = 0.9
KINDS = ("embeddings", "attention", "mlp", "norms", "other")

#: called after each tensor name with (names done, names total, bytes read so far)
ProgressCallback = Callable[[int, int, int], None]

_CHUNK = 1 << 20
_MANTISSA_DROP = 20  # float32 bits >> 20: sign, exponent and the top 3 mantissa bits
_NBINS = 1 << (32 - _MANTISSA_DROP - 1)  # non-negative values only
_REL_TOL = 1e-9

_KIND_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norms", ("norm", "ln_", "ln.")),
    ("embeddings", ("embed", "wte", "wpe", "lm_head")),
    (
        "attention",
        ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query_key_value"),
    ),
    (
        "mlp",
        ("mlp", "gate_proj", "up_proj", "down_proj", "c_fc", "fc1", "fc2", "ffn", "experts"),
    ),
)
_EMBED_HINTS = ("embed", "wte.", "wpe.")

DEFINITIONS: dict[str, str] = {
    "delta": "model tensor minus base tensor, in float32 (a task vector, Ilharco et al. 2022, "
    "https://arxiv.org/abs/2212.04089)",
    "delta_norm": "L2 norm of delta; a group's is the norm of its concatenated entries "
    "(sqrt of summed squares)",
    "base_norm": "L2 norm of the base tensor(s)",
    "relative_norm": "delta_norm / base_norm; null when base_norm is 0",
    "near_zero_fraction": "fraction of entries with |delta| <= eps (count-weighted over a group)",
    "kept_mass_fraction": "for density d: share of ||delta||^2 kept when every tensor keeps only "
    "its top d*n entries by |delta| (TIES-style per-tensor trimming); from a log2 histogram "
    "of |delta| with 8 bins per octave over all entries, interpolated within a bin",
    "recommended_density": f"smallest d in {list(DENSITIES)} with kept_mass_fraction >= "
    f"{DENSITY_MASS}: a starting density for TIES/DARE; null for a zero task vector",
    "cosine": "dot(delta_a, delta_b) / (|delta_a| |delta_b|), float64 sums over the group; "
    "null when either is zero; ~0 for unrelated task vectors",
    "sign_conflict_rate": "sign_conflicts / sign_basis: among entries where |delta_a| > eps and "
    "|delta_b| > eps (sign_basis), the fraction with opposite signs (Yadav et al. 2023, "
    "https://arxiv.org/abs/2306.01708); null when sign_basis is 0; ~0.5 for unrelated vectors",
    "topk_overlap": "per tensor, A = top ceil(top_k*n) entries of |delta_a| (threshold: the "
    "ceil(top_k*n)-th largest |delta_a|, "
    "ties included, |delta| <= eps excluded), B likewise; |A&B| / ((|A|+|B|)/2), numerators and "
    "denominators summed over a group; null when A or B is empty over the group; ~top_k for "
    "unrelated vectors",
    "groups": "'embed' (non-layer embedding tensors), transformer layer indices, 'final' "
    "(other non-layer tensors: final norm, LM head)",
    "kinds": "norms (norm, ln_), embeddings (embed, wte, wpe, lm_head), attention (attn, "
    "q/k/v/o_proj, c_attn), mlp (mlp, gate/up/down_proj, c_fc, fc1/2), other",
    "most_conflicting_layers": "per pair, the 3 groups with the highest sign_conflict_rate",
    "least_aligned_layers": "per pair, the 3 groups with the lowest cosine",
}


def module_kind(name: str) -> str:
    """``norms``, ``embeddings``, ``attention``, ``mlp`` or ``other`` for a tensor name."""
    low = name.lower()
    for kind, needles in _KIND_RULES:
        if any(n in low for n in needles):
            return kind
    return "other"


def _round(x: float | None) -> float | None:
    return None if x is None else float(x)


# -- accumulators --------------------------------------------------------------------------


@dataclass
class DeltaStats:
    """One model's task vector over a set of entries (a tensor or a group of tensors)."""

    numel: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0
    near_zero: int = 0
    #: squared mass kept at each of DENSITIES (absolute; the last one is the total)
    kept_mass: list[float] = field(default_factory=lambda: [0.0] * len(DENSITIES))

    def add(self, other: DeltaStats) -> None:
        self.numel += other.numel
        self.delta_sq += other.delta_sq
        self.base_sq += other.base_sq
        self.near_zero += other.near_zero
        self.kept_mass = [a + b for a, b in zip(self.kept_mass, other.kept_mass, strict=True)]

    @property
    def delta_norm(self) -> float:
        return math.sqrt(self.delta_sq)

    @property
    def base_norm(self) -> float:
        return math.sqrt(self.base_sq)

    @property
    def relative_norm(self) -> float | None:
        return self.delta_norm / self.base_norm if self.base_sq > 0 else None

    @property
    def near_zero_fraction(self) -> float | None:
        return self.near_zero / self.numel if self.numel else None

    @property
    def kept_mass_fraction(self) -> dict[float, float] | None:
        total = self.kept_mass[-1]
        if total <= 0:
            return None
        return {d: min(1.0, m / total) for d, m in zip(DENSITIES, self.kept_mass, strict=True)}

    @property
    def recommended_density(self) -> float | None:
        kept = self.kept_mass_fraction
        if kept is None:
            return None
        return next(d for d, f in kept.items() if f >= DENSITY_MASS - _REL_TOL)

    def to_json(self) -> dict[str, Any]:
        kept = self.kept_mass_fraction
        kept_json = None if kept is None else {f"{d:.1f}": f for d, f in kept.items()}
        return {
            "numel": self.numel,
            "delta_norm": self.delta_norm,
            "base_norm": self.base_norm,
            "relative_norm": _round(self.relative_norm),
            "near_zero": self.near_zero,
            "near_zero_fraction": _round(self.near_zero_fraction),
            "kept_mass_fraction": kept_json,
            "recommended_density": self.recommended_density,
        }


@dataclass
class PairStats:
    """Two models' task vectors over the same entries."""

    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    sign_basis: int = 0
    sign_conflicts: int = 0
    topk_intersection: int = 0
    topk_size_a: int = 0
    topk_size_b: int = 0

    def add(self, other: PairStats) -> None:
        self.dot += other.dot
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.sign_basis += other.sign_basis
        self.sign_conflicts += other.sign_conflicts
        self.topk_intersection += other.topk_intersection
        self.topk_size_a += other.topk_size_a
        self.topk_size_b += other.topk_size_b

    @property
    def cosine(self) -> float | None:
        if self.sq_a <= 0 or self.sq_b <= 0:
            return None
        return max(-1.0, min(1.0, self.dot / math.sqrt(self.sq_a * self.sq_b)))

    @property
    def sign_conflict_rate(self) -> float | None:
        return self.sign_conflicts / self.sign_basis if self.sign_basis else None

    @property
    def topk_overlap(self) -> float | None:
        if self.topk_size_a == 0 or self.topk_size_b == 0:
            return None  # a zero task vector has no top entries to overlap with
        return 2 * self.topk_intersection / (self.topk_size_a + self.topk_size_b)

    def to_json(self) -> dict[str, Any]:
        return {
            "cosine": self.cosine,
            "dot": self.dot,
            "sign_conflict_rate": self.sign_conflict_rate,
            "sign_conflicts": self.sign_conflicts,
            "sign_basis": self.sign_basis,
            "topk_overlap": self.topk_overlap,
            "topk_intersection": self.topk_intersection,
            "topk_size_a": self.topk_size_a,
            "topk_size_b": self.topk_size_b,
        }


def _total(items: Iterable[Any], cls: type[Any]) -> Any:
    acc = cls()
    for it in items:
        acc.add(it)
    return acc


# -- the report ----------------------------------------------------------------------------


@dataclass
class TensorReport:
    name: str
    group: str  # "embed", "0", "1", ..., "final"
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    models: list[DeltaStats]  # one per model, in order
    pairs: list[PairStats]  # aligned with InspectReport.pairs


@dataclass
class InspectReport:
    """Everything :func:`inspect_models` measured; aggregates are computed on demand."""

    base: str
    models: list[str]
    top_k: float
    eps: float
    pairs: list[tuple[int, int]]
    groups: list[str]
    tensors: list[TensorReport]
    skipped: list[str] = field(default_factory=list)  # non-floating tensors of the base
    ignored: list[list[str]] = field(default_factory=list)  # per model: tensors not in base
    tied_head: list[bool] = field(default_factory=list)  # per model: head read from embeddings
    seconds: float = 0.0
    bytes_read: int = 0

    # per model
    def model_total(self, i: int) -> DeltaStats:
        return _total((t.models[i] for t in self.tensors), DeltaStats)  # type: ignore[no-any-return]

    def model_by_group(self, i: int) -> dict[str, DeltaStats]:
        return {
            g: _total((t.models[i] for t in self.tensors if t.group == g), DeltaStats)
            for g in self.groups
        }

    def model_by_kind(self, i: int) -> dict[str, DeltaStats]:
        kinds = [k for k in KINDS if any(t.kind == k for t in self.tensors)]
        return {
            k: _total((t.models[i] for t in self.tensors if t.kind == k), DeltaStats) for k in kinds
        }

    # per pair (p indexes self.pairs)
    def pair_total(self, p: int) -> PairStats:
        return _total((t.pairs[p] for t in self.tensors), PairStats)  # type: ignore[no-any-return]

    def pair_by_group(self, p: int) -> dict[str, PairStats]:
        return {
            g: _total((t.pairs[p] for t in self.tensors if t.group == g), PairStats)
            for g in self.groups
        }

    def pair_by_kind(self, p: int) -> dict[str, PairStats]:
        kinds = [k for k in KINDS if any(t.kind == k for t in self.tensors)]
        return {
            k: _total((t.pairs[p] for t in self.tensors if t.kind == k), PairStats) for k in kinds
        }

    def most_conflicting_layers(self, p: int, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` groups with the highest sign-conflict rate (ties: earlier group first)."""
        rates = [(g, s.sign_conflict_rate) for g, s in self.pair_by_group(p).items()]
        known = [(g, r) for g, r in rates if r is not None]
        return sorted(known, key=lambda x: -x[1])[:n]

    def least_aligned_layers(self, p: int, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` groups with the lowest cosine (ties: earlier group first)."""
        cos = [(g, s.cosine) for g, s in self.pair_by_group(p).items()]
        known = [(g, c) for g, c in cos if c is not None]
        return sorted(known, key=lambda x: x[1])[:n]

    def to_json(self) -> dict[str, Any]:
        """Every number, JSON-ready (undefined values are ``None``, never NaN)."""

        def layer_of(g: str) -> int | None:
            return int(g) if g.isdigit() else None

        per_model = []
        for i, ref in enumerate(self.models):
            total = self.model_total(i)
            per_model.append(
                {
                    "index": i,
                    "model": ref,
                    "whole": total.to_json(),
                    "by_layer": [
                        {"group": g, "layer": layer_of(g), **s.to_json()}
                        for g, s in self.model_by_group(i).items()
                    ],
                    "by_kind": {k: s.to_json() for k, s in self.model_by_kind(i).items()},
                    "tied_head_from_embeddings": self.tied_head[i] if self.tied_head else False,
                    "ignored_tensors": self.ignored[i] if self.ignored else [],
                }
            )
        per_pair = []
        summary_pairs = []
        for p, (a, b) in enumerate(self.pairs):
            conflicting = [
                {"group": g, "layer": layer_of(g), "sign_conflict_rate": r}
                for g, r in self.most_conflicting_layers(p)
            ]
            aligned = [
                {"group": g, "layer": layer_of(g), "cosine": c}
                for g, c in self.least_aligned_layers(p)
            ]
            head = {"a": a, "b": b, "model_a": self.models[a], "model_b": self.models[b]}
            per_pair.append(
                {
                    **head,
                    "whole": self.pair_total(p).to_json(),
                    "by_layer": [
                        {"group": g, "layer": layer_of(g), **s.to_json()}
                        for g, s in self.pair_by_group(p).items()
                    ],
                    "by_kind": {k: s.to_json() for k, s in self.pair_by_kind(p).items()},
                    "most_conflicting_layers": conflicting,
                    "least_aligned_layers": aligned,
                }
            )
            summary_pairs.append(
                {
                    **head,
                    "cosine": self.pair_total(p).cosine,
                    "sign_conflict_rate": self.pair_total(p).sign_conflict_rate,
                    "most_conflicting_layers": conflicting,
                    "least_aligned_layers": aligned,
                }
            )
        tensors = [
            {
                "name": t.name,
                "group": t.group,
                "layer": t.layer,
                "kind": t.kind,
                "shape": list(t.shape),
                "models": [s.to_json() for s in t.models],
                "pairs": [
                    {"a": a, "b": b, **s.to_json()}
                    for (a, b), s in zip(self.pairs, t.pairs, strict=True)
                ],
            }
            for t in self.tensors
        ]
        return {
            "base": self.base,
            "models": list(self.models),
            "settings": {
                "top_k": self.top_k,
                "eps": self.eps,
                "densities": list(DENSITIES),
                "density_mass": DENSITY_MASS,
            },
            "definitions": dict(DEFINITIONS),
            "groups": list(self.groups),
            "per_model": per_model,
            "pairs": per_pair,
            "interference": {
                "density_rule": DEFINITIONS["recommended_density"],
                "recommended_density": [
                    {"model": ref, "density": self.model_total(i).recommended_density}
                    for i, ref in enumerate(self.models)
                ],
                "pairs": summary_pairs,
            },
            "tensors": tensors,
            "skipped_tensors": list(self.skipped),
            "stats": {
                "tensors": len(self.tensors),
                "bytes_read": self.bytes_read,
                "seconds": self.seconds,
            },
        }


# -- streaming analysis --------------------------------------------------------------------


@dataclass
class _NamePlan:
    name: str
    group: str
    layer: int | None
    sources: list[str]  # the tensor name to read in each model (a tied head: the embedding)
    nbytes: int


def _group_of(name: str, layer_of: dict[str, int]) -> tuple[str, int | None]:
    if name in layer_of:
        return str(layer_of[name]), layer_of[name]
    return ("embed" if any(h in name for h in _EMBED_HINTS) else "final"), None


def _tied_embedding(ckpt: Checkpoint) -> str | None:
    return next(
        (n for n in ckpt.tensors if n.endswith(("embed_tokens.weight", "wte.weight"))), None
    )


def _plan(
    base: Checkpoint, models: list[Checkpoint]
) -> tuple[list[_NamePlan], list[str], list[list[str]], list[bool]]:
    """Check names, shapes and dtypes against the base from the headers; read nothing."""
    layout = LayerLayout.of(base)
    layer_of = {full: i for i, suffixes in layout.layers.items() for full in suffixes.values()}
    plans: list[_NamePlan] = []
    skipped: list[str] = []
    tied = [False] * len(models)
    for name, info in base.tensors.items():
        if not info.dtype.is_floating_point:
            skipped.append(name)
            continue
        sources: list[str] = []
        nbytes = info.nbytes
        for i, ckpt in enumerate(models):
            src: str | None = name
            if name not in ckpt.tensors:
                src = None
                if name.endswith("lm_head.weight") and ckpt.tie_word_embeddings:
                    src = _tied_embedding(ckpt)
                    tied[i] = src is not None
            if src is None:
                raise MergeError(
                    str(ckpt.path),
                    f"tensor {name!r} is missing from this model (the base {base.ref} has it)",
                )
            m = ckpt.tensors[src]
            if m.shape != info.shape:
                raise MergeError(
                    str(ckpt.path),
                    f"tensor {src!r} has shape {list(m.shape)} here but {list(info.shape)} "
                    f"in the base {base.ref}",
                )
            if not m.dtype.is_floating_point:
                raise MergeError(
                    str(ckpt.path),
                    f"tensor {src!r} is {m.dtype} here but {info.dtype} in the base {base.ref}",
                )
            sources.append(src)
            nbytes += m.nbytes
        group, layer = _group_of(name, layer_of)
        plans.append(_NamePlan(name, group, layer, sources, nbytes))
    ignored = []
    for ckpt in models:
        extra = [n for n in ckpt.tensors if n not in base.tensors]
        if extra:
            log.warning(
                "%s: %d tensor(s) the base lacks are not analyzed (first: %s)",
                ckpt.ref,
                len(extra),
                extra[0],
            )
        ignored.append(extra)
    return plans, skipped, ignored, tied


def _read_flat32(ckpt: Checkpoint, name: str) -> torch.Tensor:
    x = ckpt.read(name).to(torch.float32)
    # one cheap reduction; a non-finite sum is confirmed element-wise (it may be overflow)
    if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
        raise MergeError(
            str(ckpt.tensors[name].file), f"tensor {name!r} contains NaN or Inf values"
        )
    return x.reshape(-1)


def _topk_count(top_k: float, n: int) -> int:
    return min(n, max(1, math.ceil(round(top_k * n, 6))))


def _kth_largest_abs(d: torch.Tensor, k: int) -> float:
    """The k-th largest ``|d|``: exact selection, what ``torch.kthvalue(|d|, n - k + 1)``
    gives, by numpy's introselect in place on the temporary ``|d|`` (several times faster
    than ``torch.kthvalue`` on CPU, and no second copy)."""
    a = d.abs().numpy()
    a.partition(a.size - k)
    return float(a[a.size - k])


def _kept_mass(counts: np.ndarray, mass: np.ndarray, n: int) -> list[float]:
    """Squared mass of the top ``d * n`` entries for each d, from a magnitude histogram."""
    c_bin = counts[::-1]  # largest magnitudes first
    m_bin = mass[::-1]
    c_cum = np.cumsum(c_bin)
    m_cum = np.cumsum(m_bin)
    out = []
    for d in DENSITIES:
        target = d * n
        b = int(np.searchsorted(c_cum, target * (1 - _REL_TOL), side="left"))
        if b >= len(c_cum):
            out.append(float(m_cum[-1]))
            continue
        before_c = c_cum[b] - c_bin[b]
        before_m = m_cum[b] - m_bin[b]
        frac = min(1.0, max(0.0, (target - before_c) / c_bin[b])) if c_bin[b] > 0 else 0.0
        out.append(float(before_m + m_bin[b] * frac))
    return out


def _analyze(
    plan: _NamePlan,
    base: Checkpoint,
    models: list[Checkpoint],
    pairs: list[tuple[int, int]],
    top_k: float,
    eps: float,
) -> TensorReport:
    """Read one tensor name from the base and every model, measure, and let it all go."""
    b = _read_flat32(base, plan.name)
    deltas = []
    for ckpt, src in zip(models, plan.sources, strict=True):
        deltas.append(_read_flat32(ckpt, src).sub_(b))  # fresh memory: subtract in place
    n = b.numel()
    stats = [DeltaStats(numel=n) for _ in deltas]
    pstats = [PairStats() for _ in pairs]
    shape = base.tensors[plan.name].shape
    report = TensorReport(
        plan.name, plan.group, plan.layer, module_kind(plan.name), shape, stats, pstats
    )
    if n == 0:
        return report

    k = _topk_count(top_k, n)
    thresholds = [_kth_largest_abs(d, k) for d in deltas]
    hist_c = [np.zeros(_NBINS, dtype=np.int64) for _ in deltas]
    hist_m = [np.zeros(_NBINS, dtype=np.float64) for _ in deltas]
    top_sizes = [0] * len(deltas)
    base_sq = 0.0
    # numpy views of the torch tensors (no copies); chunks bound the temporaries
    bn = b.numpy()
    dn = [d.numpy() for d in deltas]
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        bc = bn[s:e].astype(np.float64)
        base_sq += float(bc @ bc)
        c64s, nonzero, top, bits = [], [], [], []
        for i, d in enumerate(dn):
            c = d[s:e]
            a = np.abs(c)
            c64 = c.astype(np.float64)
            sq = c64 * c64
            stats[i].delta_sq += float(sq.sum())
            nz = a > eps
            stats[i].near_zero += (e - s) - int(np.count_nonzero(nz))
            # non-negative float32 bit patterns order like the values; the exponent and
            # the top 3 mantissa bits make a log2 histogram with 8 bins per octave
            hbin = a.view(np.int32) >> _MANTISSA_DROP
            hist_c[i] += np.bincount(hbin, minlength=_NBINS)
            hist_m[i] += np.bincount(hbin, weights=sq, minlength=_NBINS)
            t = nz & (a >= thresholds[i])
            top_sizes[i] += int(np.count_nonzero(t))
            c64s.append(c64)
            nonzero.append(nz)
            top.append(t)
            bits.append(c.view(np.int32))  # sign bit set <=> negative
        for p, (i, j) in enumerate(pairs):
            ps = pstats[p]
            ps.dot += float(c64s[i] @ c64s[j])
            both = nonzero[i] & nonzero[j]
            ps.sign_basis += int(np.count_nonzero(both))
            ps.sign_conflicts += int(np.count_nonzero(both & ((bits[i] ^ bits[j]) < 0)))
            ps.topk_intersection += int(np.count_nonzero(top[i] & top[j]))
    for i, st in enumerate(stats):
        st.base_sq = base_sq
        st.kept_mass = _kept_mass(hist_c[i].astype(np.float64), hist_m[i], n)
    for p, (i, j) in enumerate(pairs):
        ps = pstats[p]
        ps.sq_a, ps.sq_b = stats[i].delta_sq, stats[j].delta_sq
        ps.topk_size_a, ps.topk_size_b = top_sizes[i], top_sizes[j]
    return report


def inspect_models(
    models: Sequence[str | Path],
    *,
    base: str | Path,
    top_k: float = DEFAULT_TOP_K,
    eps: float = DEFAULT_EPS,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> InspectReport:
    """Measure each model's task vector against ``base`` and every pair's interference.

    ``models`` and ``base`` are local folders or Hub ids (:func:`open_checkpoint`). Every
    check that needs no weights (paths, missing tensors, shapes) runs before any tensor
    is read. Raises :class:`~mergekit_lite.errors.MergekitLiteError` subclasses for bad
    input.
    """
    refs = [str(m) for m in models]
    if not refs:
        raise RecipeError("models", "give at least one model to compare with the base")
    if not (0 < top_k <= 1):
        raise RecipeError("top_k", f"must be in (0, 1]; got {top_k}")
    if not (0 <= eps < math.inf):
        raise RecipeError("eps", f"must be a finite number >= 0; got {eps}")
    start = time.perf_counter()
    base_ckpt = open_checkpoint(str(base), allow_pickle=allow_pickle)
    opened: dict[str, Checkpoint] = {}
    for ref in refs:
        if ref not in opened:
            opened[ref] = open_checkpoint(ref, allow_pickle=allow_pickle)
    ckpts = [opened[r] for r in refs]
    plans, skipped, ignored, tied = _plan(base_ckpt, ckpts)
    pairs = [(i, j) for i in range(len(refs)) for j in range(i + 1, len(refs))]
    groups = [g for g in ("embed",) if any(p.group == g for p in plans)]
    groups += [str(i) for i in sorted({p.layer for p in plans if p.layer is not None})]
    groups += ["final"] if any(p.group == "final" for p in plans) else []
    log.info(
        "inspecting %d model(s) against %s: %d tensors (%d skipped: not floating point)",
        len(refs),
        base,
        len(plans),
        len(skipped),
    )

    tensors: list[TensorReport] = []
    bytes_read = 0
    for done, plan in enumerate(plans, 1):
        tensors.append(_analyze(plan, base_ckpt, ckpts, pairs, top_k, eps))
        bytes_read += plan.nbytes
        log.debug("%s: %s", plan.name, [round(s.delta_norm, 6) for s in tensors[-1].models])
        if progress is not None:
            progress(done, len(plans), bytes_read)
    return InspectReport(
        base=str(base),
        models=refs,
        top_k=top_k,
        eps=eps,
        pairs=pairs,
        groups=groups,
        tensors=tensors,
        skipped=skipped,
        ignored=ignored,
        tied_head=tied,
        seconds=time.perf_counter() - start,
        bytes_read=bytes_read,
    )


# -- output files --------------------------------------------------------------------------


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write through a temporary file in the same folder, then ``os.replace`` it."""
    path = Path(path)
    if path.is_dir():
        raise MergekitLiteError(str(path), "is a folder, not a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MergekitLiteError(str(path), f"cannot write: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MergekitLiteError(str(path), f"cannot write: {e.strerror or e}") from e
        raise
    return path


def write_json(report: InspectReport, path: str | Path) -> Path:
    """Write ``report.to_json()`` atomically (strict JSON: no NaN anywhere)."""
    text = json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text.encode()))


def _short_names(refs: list[str]) -> list[str]:
    short = [Path(r.rstrip("/")).name or r for r in refs]
    return short if len(set(short)) == len(short) else [f"{i}:{s}" for i, s in enumerate(short)]


def save_heatmap(report: InspectReport, path: str | Path, *, dpi: int = 120) -> Path:
    """A PNG with two heatmaps, layer groups x model pairs: cosine and sign-conflict rate.

    Uses matplotlib's Agg renderer through the object-oriented API (no pyplot, no global
    backend switch), so it works headless and leaves the caller's matplotlib state alone.
    """
    if not report.pairs:
        raise RecipeError("plot", "the heatmap shows model pairs: give at least two models")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = _short_names(report.models)
    labels = [f"{names[a]} × {names[b]}" for a, b in report.pairs]
    by_group = [report.pair_by_group(p) for p in range(len(report.pairs))]

    def grid(metric: Callable[[PairStats], float | None]) -> np.ma.MaskedArray:
        data = np.array(
            [
                [np.nan if (v := metric(by_group[p][g])) is None else v for p in range(len(labels))]
                for g in report.groups
            ],
            dtype=float,
        )
        return np.ma.masked_invalid(data)

    n_rows, n_cols = len(report.groups), len(labels)
    fig = Figure(figsize=(max(8.0, 3.0 + 1.6 * n_cols), max(4.0, 1.8 + 0.28 * n_rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = [
        ("cosine similarity", lambda s: s.cosine, "RdBu", -1.0, 1.0, "cosine"),
        (
            "sign-conflict rate",
            lambda s: s.sign_conflict_rate,
            "magma",
            0.0,
            1.0,
            "sign-conflict rate",
        ),
    ]
    annotate = n_rows * n_cols <= 120
    for ax, (title, metric, cmap_name, vmin, vmax, bar_label) in zip(axes, panels, strict=True):
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="lightgray")
        data = grid(metric)
        im = ax.imshow(
            data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        if annotate:
            for (r, c), v in np.ndenumerate(data.filled(np.nan)):
                if np.isnan(v):
                    ax.text(c, r, "n/a", ha="center", va="center", fontsize=7, color="dimgray")
                    continue
                red, green, blue, _ = cmap(im.norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
        ax.set_title(title)
        ax.set_xticks(range(n_cols), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), report.groups, fontsize=8 if n_rows <= 40 else 5)
        ax.set_xlabel("model pair")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label=bar_label)
    fig.suptitle(
        f"task vectors vs {Path(report.base.rstrip('/')).name or report.base} "
        "(gray: undefined, a task vector is zero)"
    )
    fig.tight_layout()
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
