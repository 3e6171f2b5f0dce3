"""Synthetic model families for tests, benchmarks and the demo (no download needed).

A *family* is a base checkpoint plus fine-tunes that differ from it by small deltas:
a direction shared by all fine-tunes (so they agree) plus a direction of their own (so
they conflict), which is the situation merge methods are designed for::

    theta_i = theta_base + shared + own_i,   shared, own_i ~ N(0, delta_scale^2)

Checkpoints are real Hugging Face folders (``save_pretrained``, safetensors), loadable
with ``AutoModelForCausalLM.from_pretrained``. Imports transformers: keep it off the
``merge run`` path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["tiny_config", "save_family", "build_tokenizer", "ARCHS"]

Arch = Literal["llama", "qwen2", "gpt2"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "gpt2")


def tiny_config(
    arch: Arch = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    tie_word_embeddings: bool | None = None,
    **extra: Any,
) -> Any:
    """A small transformers config of ``arch`` (Llama untied, Qwen2 tied by default)."""
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=bool(tie_word_embeddings),
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    raise ValueError(f"unknown arch {arch!r}")


def build_tokenizer(vocab_size: int = 128) -> Any:
    """A word-level tokenizer over ``vocab_size`` tokens with a ChatML-style template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def save_family(
    root: str | Path,
    *,
    arch: Arch = "llama",
    n_finetunes: int = 2,
    seed: int = 0,
    delta_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    tokenizer: bool = True,
    **config_kwargs: Any,
) -> dict[str, Path]:
    """Write ``base`` and ``ft0..ft{n-1}`` under ``root``; return their folders."""
    import transformers

    root = Path(root)
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shared = {
        k: torch.randn(v.shape, generator=gen) * delta_scale
        for k, v in base_sd.items()
        if v.is_floating_point()
    }
    tok = build_tokenizer(config.vocab_size) if tokenizer else None
    save_kw: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kw["max_shard_size"] = max_shard_size

    paths: dict[str, Path] = {}
    for i in range(-1, n_finetunes):
        name = "base" if i < 0 else f"ft{i}"
        if i >= 0:
            own_gen = torch.Generator().manual_seed(seed + 100 + i)
            sd = {
                k: (
                    (
                        v.float()
                        + shared[k]
                        + torch.randn(v.shape, generator=own_gen) * delta_scale
                    ).to(v.dtype)
                    if k in shared
                    else v
                )
                for k, v in base_sd.items()
            }
            model.load_state_dict(sd, strict=True)
        path = root / name
        model.save_pretrained(path, **save_kw)
        if tok is not None:
            tok.save_pretrained(path)
        paths[name] = path
        model.load_state_dict(base_sd, strict=True)
    return paths


def read_config(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    return data
