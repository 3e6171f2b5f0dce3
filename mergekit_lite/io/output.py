"""Atomic output folders: a merge killed at any moment leaves nothing at the target.

Everything is written into a hidden temporary folder next to the target (same file
system, so the final ``rename`` is atomic) and moved into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from mergekit_lite.errors import OutputExistsError

__all__ = ["AtomicOutputDir", "check_output_path"]


def check_output_path(target: Path, *, overwrite: bool) -> None:
    """Refuse an existing output path unless ``overwrite`` (checked before any work)."""
    if target.exists() and not overwrite:
        raise OutputExistsError(str(target), "output path already exists (pass --overwrite)")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(str(target), "output path exists and is not a folder")


class AtomicOutputDir:
    """``with AtomicOutputDir(target) as tmp: write into tmp`` -> renamed to target on success."""

    def __init__(self, target: str | Path, *, overwrite: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        check_output_path(self.target, overwrite=self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent)
        )
        return self.tmp

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it 0700
        if self.target.exists():
            check_output_path(self.target, overwrite=self.overwrite)
            trash = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent)
            )
            os.replace(self.target, trash / "old")
            os.replace(self.tmp, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
