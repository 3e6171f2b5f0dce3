"""mergekit-lite: post-train language models and merge the checkpoints.

The public API is small and imported lazily, so that ``import mergekit_lite`` (and the
``merge`` CLI) does not pay for torch, transformers, lm-eval or optuna until a command
needs them::

    from mergekit_lite import load_recipe, run_merge, merge_state_dict

    recipe = load_recipe("recipes/ties.yaml")
    run_merge(recipe, "out/merged")             # a Hugging Face model folder
    state_dict = merge_state_dict(recipe)       # or tensors in memory
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "mergekit_lite.recipe",
    "load_recipe": "mergekit_lite.recipe",
    "parse_recipe": "mergekit_lite.recipe",
    "build_plan": "mergekit_lite.plan",
    "run_merge": "mergekit_lite.engine",
    "merge_state_dict": "mergekit_lite.engine",
    "InMemoryMerger": "mergekit_lite.engine",
    "METHODS": "mergekit_lite.methods.registry",
    "MergekitLiteError": "mergekit_lite.errors",
    "RecipeError": "mergekit_lite.errors",
    "CheckpointError": "mergekit_lite.errors",
    "MergeError": "mergekit_lite.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergekit_lite' has no attribute {name!r}")
