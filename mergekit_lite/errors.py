"""The one exception hierarchy of mergekit-lite.

Every error a user can cause with bad input (a recipe, a checkpoint, a path) is a
subclass of :class:`MergekitLiteError`. The CLI turns these into one line on stderr
and exit status 2; anything else is a bug and keeps its traceback.

Messages name *where* the problem is first (a recipe key such as
``models[1].parameters.density`` or a file path), then *what* is wrong.
"""

from __future__ import annotations

__all__ = [
    "MergekitLiteError",
    "RecipeError",
    "CheckpointError",
    "MergeError",
    "OutputExistsError",
    "DataError",
]


class MergekitLiteError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    def __init__(self, where: str | None, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(MergekitLiteError, ValueError):
    """A recipe (or config) is invalid; ``where`` is the file and key path."""


class CheckpointError(MergekitLiteError):
    """An input checkpoint is missing, unreadable, corrupt or inconsistent."""


class MergeError(MergekitLiteError):
    """The inputs are readable but cannot be merged as asked (shapes, NaNs, ...)."""


class OutputExistsError(MergekitLiteError):
    """The output path exists and overwriting was not requested."""


class DataError(MergekitLiteError):
    """A training or evaluation data file has no usable rows (``where`` is the file)."""
