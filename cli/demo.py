"""``merge demo``: build a small model family and merge it with the example recipes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergekit_lite.cli._common import Verbose, err, out, setup_logging, user_errors

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEMO_RECIPES = ("sft_dpo_task_arithmetic", "ties", "dare_ties", "slerp", "model_stock")


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where checkpoints and merges are written.")
    ] = Path(".demo"),
    verbose: Verbose = False,
) -> None:
    """Build base/SFT/DPO/IPO checkpoints of a small Llama and merge them five ways."""
    setup_logging(verbose)
    with user_errors(verbose):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergekit_lite.engine import run_merge
        from mergekit_lite.recipe import load_recipe
        from mergekit_lite.surgery.inspect import inspect_models
        from mergekit_lite.synthetic import save_family

        workdir = workdir.resolve()
        ckpt = workdir / "ckpt"
        if not (ckpt / "ipo" / "config.json").is_file():
            err.print(f"building a base model and three fine-tunes in {ckpt} ...")
            fam = save_family(
                workdir / "family",
                arch="llama",
                n_finetunes=3,
                seed=0,
                vocab_size=512,
                hidden_size=128,
                intermediate_size=256,
                num_layers=6,
            )
            ckpt.mkdir(parents=True, exist_ok=True)
            for name, key in {"base": "base", "sft": "ft0", "dpo": "ft1", "ipo": "ft2"}.items():
                link = ckpt / name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(fam[key])

        # recipes name ./ckpt/...: run them from the work folder
        table = Table(title=f"mergekit-lite demo ({workdir})")
        table.add_column("recipe", no_wrap=True)
        table.add_column("method", no_wrap=True)
        for col in ("tensors", "seconds", "greedy continuation"):
            table.add_column(col)
        with _cwd(workdir):
            tok = AutoTokenizer.from_pretrained("ckpt/base")
            prompt: Any = tok.apply_chat_template(
                [{"role": "user", "content": "w1 w2 w3"}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            for name in DEMO_RECIPES:
                path = RECIPES_DIR / f"{name}.yaml"
                result = run_merge(
                    load_recipe(path),
                    workdir / "merged" / name,
                    overwrite=True,
                    source=str(path),
                    recipe_text=path.read_text(),
                )
                model = AutoModelForCausalLM.from_pretrained(result.output)
                with torch.no_grad():
                    ids = model.generate(**prompt, max_new_tokens=6, do_sample=False)
                new = str(tok.decode(ids[0, prompt["input_ids"].shape[1] :]))
                table.add_row(
                    name,
                    result.plan.method.name,
                    str(result.stats.tensors),
                    f"{result.stats.seconds:.2f}",
                    new,
                )
        out.print(table)

        # what the merges had to reconcile: the fine-tunes' task vectors
        report = inspect_models(
            [str(ckpt / n) for n in ("sft", "dpo", "ipo")], base=str(ckpt / "base")
        )
        data = report.to_json()
        for pair in data["pairs"]:
            whole = pair["whole"]
            names = [Path(pair[k]).name for k in ("model_a", "model_b")]
            out.print(
                f"task vectors {names[0]} x {names[1]}: cosine {whole['cosine']:.2f}, "
                f"sign conflict {whole['sign_conflict_rate']:.0%} (merge inspect)",
                highlight=False,
            )
        out.print(
            f"Each folder under {workdir / 'merged'} is a Hugging Face model (config, "
            "safetensors, tokenizer, model card). Try, from "
            f"{workdir}: merge run {RECIPES_DIR / 'ties.yaml'} --dry-run, or "
            "merge inspect ckpt/sft ckpt/dpo --base ckpt/base --plot inspect.png",
            soft_wrap=True,
        )
