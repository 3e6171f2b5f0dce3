"""Vocabulary alignment: merging models whose tokenizers differ.

Fine-tunes often add tokens (chat markers, tool tokens) and resize their embeddings, so
row ``i`` of one model's embedding is not row ``i`` of another's. With
``tokenizer_source`` (or ``tokenizer: {source, pad_to_multiple_of}``) set, as in mergekit:

* the output vocabulary is the base model's (``base``), one model's (a model reference),
  or the ``union``: the base's tokens, then every other model's new tokens in order;
* each model's vocabulary-indexed tensors (input embedding, LM head) are permuted to the
  output vocabulary before merging;
* a token a model lacks takes the base's row if the base has it, else the row of the
  only model that has it, else the mean of the rows of the models that have it; so a
  token known to one model passes through any merge unchanged;
* with ``pad_to_multiple_of`` the row count is rounded up (extra rows are zero), and
  ``config.json``'s ``vocab_size`` is the row count.

Vocabularies are read from each model's ``tokenizer.json`` with the ``tokenizers``
library; building a union tokenizer for the output uses transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mergekit_lite.errors import CheckpointError, MergeError

__all__ = [
    "read_vocab",
    "output_vocab",
    "index_map",
    "align_rows",
    "is_vocab_tensor",
    "write_union_tokenizer",
]

_VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(_VOCAB_TENSORS)


def read_vocab(path: Path) -> dict[str, int]:
    """token -> id of a model folder's ``tokenizer.json`` (added tokens included)."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            str(path), "has no tokenizer.json, which vocabulary alignment (tokenizer_source) needs"
        )
    try:
        return dict(Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise CheckpointError(str(file), f"cannot read tokenizer: {e}") from e


def special_tokens(path: Path) -> set[str]:
    data = json.loads((path / "tokenizer.json").read_text())
    return {t["content"] for t in data.get("added_tokens", []) if t.get("special")}


def output_vocab(
    source: str, vocabs: dict[str, dict[str, int]], base: str, order: Sequence[str]
) -> dict[str, int]:
    """The merged model's vocabulary: ``base``, ``union`` or a model's (by reference)."""
    if source == "base":
        return dict(vocabs[base])
    if source != "union":
        return dict(vocabs[source])
    out = dict(vocabs[base])
    next_id = max(out.values(), default=-1) + 1
    for model in order:
        for token, _ in sorted(vocabs[model].items(), key=lambda kv: kv[1]):
            if token not in out:
                out[token] = next_id
                next_id += 1
    return out


def index_map(out: dict[str, int], model: dict[str, int], rows: int, out_rows: int) -> torch.Tensor:
    """For each output row, the model's row holding the same token, or -1."""
    idx = torch.full((out_rows,), -1, dtype=torch.long)
    for token, j in out.items():
        i = model.get(token)
        if i is not None and i < rows:
            idx[j] = i
    return idx


def align_rows(
    xs: list[torch.Tensor],
    maps: Sequence[torch.Tensor],
    base_index: int | None,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Permute each (rows, hidden) tensor to the output vocabulary (see module docs)."""
    out_rows = maps[0].numel()
    aligned, have = [], []
    for x, idx in zip(xs, maps, strict=True):
        idx = idx.to(x.device)
        h = idx >= 0
        y = torch.zeros((out_rows, *x.shape[1:]), dtype=dtype, device=x.device)
        y[h] = x[idx[h]].to(dtype)
        aligned.append(y)
        have.append(h)
    known = torch.stack(have)  # (n, rows)
    count = known.sum(dim=0)
    total = torch.zeros_like(aligned[0])
    for y, h in zip(aligned, have, strict=True):
        total[h] += y[h]
    mean = total / count.clamp(min=1).unsqueeze(-1).to(dtype)
    if base_index is not None:
        base_has = have[base_index]
        fill = torch.where(base_has.unsqueeze(-1), aligned[base_index], mean)
    else:
        fill = mean
    for y, h in zip(aligned, have, strict=True):
        missing = ~h & (count > 0)
        y[missing] = fill[missing]
    return aligned


def write_union_tokenizer(
    folder: Path, base: Path, out: dict[str, int], sources: dict[str, Path]
) -> None:
    """Save the base tokenizer extended with the union's extra tokens, checking ids."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    base_vocab = tok.get_vocab()
    extra = sorted((t for t in out if t not in base_vocab), key=lambda t: out[t])
    specials = {t for p in sources.values() for t in special_tokens(p)}
    tok.add_tokens(
        [AddedToken(t, special=t in specials, normalized=t not in specials) for t in extra]
    )
    got = tok.get_vocab()
    wrong = [t for t in extra if got.get(t) != out[t]]
    if wrong:
        raise MergeError(
            "tokenizer_source",
            f"cannot build the union tokenizer: {wrong[0]!r} would get id {got.get(wrong[0])}, "
            f"the embedding has it at {out[wrong[0]]}",
        )
    tok.save_pretrained(folder)
