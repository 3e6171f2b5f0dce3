"""Everything in a merged model folder besides the weights: config, tokenizer, card.

The model card is a Hugging Face ``README.md`` with YAML front matter that the Hub reads
(``base_model`` list, ``base_model_relation: merge``, ``tags``, ``library_name``), then
the method with its paper, the input models and the recipe verbatim. The validated,
fully resolved recipe is also written as ``merge_recipe.yaml`` so that the folder says
exactly how it was made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from mergekit_lite.io.checkpoint import resolve_model_path
from mergekit_lite.plan import MergePlan
from mergekit_lite.vocab import write_union_tokenizer

__all__ = [
    "write_model_files",
    "write_hf_metadata",
    "model_card",
    "TOKENIZER_FILES",
    "CHATML_TEMPLATE",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chat_template(value: str | None) -> str | None:
    if value is None or value == "auto":
        return None
    if value == "chatml":
        return CHATML_TEMPLATE
    return value  # a Jinja template (validated by the recipe schema)


def model_card(plan: MergePlan, *, recipe_text: str | None, title: str) -> str:
    recipe = plan.recipe
    models = recipe.referenced_models()
    front = {
        "base_model": models,
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "mergekit-lite"],
    }
    base = recipe.base_model
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        "This model is a merge of pre-trained language models, made with mergekit-lite.",
        "",
        "## Method",
        "",
        f"Merged with **{plan.method.title}** (`{plan.method.name}`, {plan.method.paper})"
        + (f", using `{base}` as the base model." if base else "."),
        *(
            [
                f"Its random masks were drawn with seed {recipe.seed}: re-running the recipe "
                "gives the same weights bit for bit."
            ]
            if plan.method.random
            else []
        ),
        "",
        "## Models",
        "",
        *[f"- `{m}`" for m in models],
        "",
        "## Recipe",
        "",
        "```yaml",
        (recipe_text if recipe_text is not None else recipe.to_yaml()).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_hf_metadata(
    folder: Path, *, config: dict[str, object], source: Path, tokenizer: Path
) -> list[str]:
    """``config.json``, ``generation_config.json`` (from ``source``) and the tokenizer files
    (from ``tokenizer``) of a Hugging Face model folder; returns the names written."""
    written = ["config.json"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
        written.append("generation_config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, folder / name)
            written.append(name)
    return written


def write_model_files(
    plan: MergePlan, folder: Path, *, recipe_text: str | None, title: str = "Merged model"
) -> list[str]:
    """Write config, generation config, tokenizer, card and recipe; return file names."""
    ref = plan.checkpoints[plan.reference].path
    if plan.union_vocab is not None:
        tok = ref
    elif plan.tokenizer_source in plan.checkpoints:
        tok = plan.checkpoints[plan.tokenizer_source].path
    else:
        tok = resolve_model_path(plan.tokenizer_source)
    written = write_hf_metadata(folder, config=plan.config, source=ref, tokenizer=tok)
    if plan.union_vocab is not None:
        sources = {m: c.path for m, c in plan.checkpoints.items()}
        write_union_tokenizer(folder, ref, plan.union_vocab, sources)

    template = _chat_template(plan.recipe.chat_template)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
        if "chat_template.jinja" not in written:
            written.append("chat_template.jinja")
        tok_cfg = folder / "tokenizer_config.json"
        if tok_cfg.is_file():
            data = json.loads(tok_cfg.read_text())
            data["chat_template"] = template
            tok_cfg.write_text(json.dumps(data, indent=2) + "\n")

    (folder / "merge_recipe.yaml").write_text(plan.recipe.to_yaml())
    written.append("merge_recipe.yaml")
    (folder / "README.md").write_text(model_card(plan, recipe_text=recipe_text, title=title))
    written.append("README.md")
    return written
