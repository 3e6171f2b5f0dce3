"""Execute a merge plan: stream to a sharded safetensors folder, or into memory.

Streaming keeps three things in flight: a reader thread loads the inputs of the next
tensors (``prefetch`` tasks ahead), the calling thread merges the current one (on
``device``), and a writer thread appends finished tensors to the current shard. Peak
memory is therefore a few tensors, independent of the model size.

For coefficient search the same plan runs into a state dict (:class:`InMemoryMerger`),
keeping the source tensors it has read so that later merges of the same models with
other parameters read nothing from disk.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import resource
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_lite.errors import MergeError, RecipeError
from mergekit_lite.io.checkpoint import Checkpoint
from mergekit_lite.io.output import AtomicOutputDir, check_output_path
from mergekit_lite.io.safetensors_io import OutputTensor, ShardedSafetensorsWriter, read_tensor
from mergekit_lite.plan import MergePlan, TensorTask, build_plan
from mergekit_lite.recipe import Recipe
from mergekit_lite.vocab import align_rows

__all__ = [
    "MergeStats",
    "MergeResult",
    "execute",
    "run_merge",
    "merge_state_dict",
    "InMemoryMerger",
    "ProgressCallback",
]

log = logging.getLogger(__name__)

#: called after each output tensor with (tensors done, tensors total, bytes read so far)
ProgressCallback = Callable[[int, int, int], None]


@dataclass
class MergeStats:
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.tensors} tensors, read {self.bytes_read / 1e9:.2f} GB, "
            f"wrote {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s "
            f"({self.gb_per_s:.2f} GB/s), peak memory {self.peak_rss_bytes / 1e9:.2f} GB"
        )


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    stats: MergeStats
    plan: MergePlan = field(repr=False)


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_seed(seed: int, tensor: str, input_index: int) -> int:
    """A 63-bit seed for one input of one tensor: depends on names, not on order."""
    digest = hashlib.sha256(f"{seed}\x00{tensor}\x00{input_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_finite(x: torch.Tensor, task: TensorTask, i: int) -> None:
    if not x.is_floating_point():
        return
    # One cheap reduction in the tensor's own dtype; a non-finite sum is confirmed
    # element-wise (it can also be a finite overflow).
    if torch.isfinite(x.sum()) or bool(torch.isfinite(x).all()):
        return
    info = task.inputs[i]
    raise MergeError(str(info.file), f"tensor {info.name!r} contains NaN or Inf values")


def merge_tensor(
    plan: MergePlan, task: TensorTask, raw: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Merge one output tensor from its already-read inputs."""
    # Convert in place, one input at a time, so each raw copy is freed as soon as its
    # converted twin exists; the method receives (and may release) the list itself.
    xs: list[torch.Tensor] = raw
    for i in range(len(xs)):
        xs[i] = xs[i].to(device)
        _check_finite(xs[i], task, i)
    if not xs[0].is_floating_point():
        # integer buffers are copied, and must agree
        if any(not torch.equal(x, xs[0]) for x in xs[1:]):
            raise MergeError(task.name, "non-floating-point tensor differs between inputs")
        return xs[0]
    if task.vocab_maps is not None:  # rows permuted to the output vocabulary first
        xs[:] = align_rows(xs, task.vocab_maps, task.base_index, plan.compute_dtype)
    kwargs: dict[str, Any] = {**task.shared, **{k: list(v) for k, v in task.per_input.items()}}
    if plan.method.casts_inputs:
        kwargs["dtype"] = plan.compute_dtype  # converted chunk by chunk by the method
    else:
        for i in range(len(xs)):
            xs[i] = xs[i].to(plan.compute_dtype)

    def rng(i: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(tensor_seed(plan.recipe.seed, task.name, i)))

    try:
        out = plan.method.consume(xs, base_index=task.base_index, rng=rng, **kwargs)
    except ValueError as e:  # a method's own parameter check (e.g. DELLA epsilon)
        raise RecipeError(f"{plan.source}: parameters", f"{e} (tensor {task.name})") from e
    return out.to(task.out_dtype)


def _iter_inputs(
    tasks: list[TensorTask], load: Callable[[TensorTask], list[torch.Tensor]], prefetch: int
) -> Iterator[tuple[TensorTask, list[torch.Tensor]]]:
    """Yield each task with its inputs, reading ``prefetch`` tasks ahead on a thread."""
    if prefetch <= 0:
        for t in tasks:
            yield t, load(t)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read") as pool:
        pending: list[Future[list[torch.Tensor]]] = []
        nxt = 0
        try:
            for i, task in enumerate(tasks):
                while nxt < len(tasks) and nxt <= i + prefetch:
                    pending.append(pool.submit(load, tasks[nxt]))
                    nxt += 1
                yield task, pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


class _WriterThread:
    """Runs ``sink`` on a thread, at most ``depth`` finished tensors waiting."""

    def __init__(self, sink: Callable[[str, torch.Tensor], None], depth: int = 2) -> None:
        self._sink = sink
        self._q: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="merge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._sink(*item)
                except BaseException as e:  # re-raised on the main thread
                    self._error = e

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, tensor))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def execute(
    plan: MergePlan,
    sink: Callable[[str, torch.Tensor], None],
    *,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    prefetch: int = 2,
    threaded_sink: bool = True,
    load: Callable[[TensorTask], list[torch.Tensor]] | None = None,
) -> MergeStats:
    """Run every task of ``plan`` in order, handing each result to ``sink(name, tensor)``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device", "CUDA was requested but no GPU is available")
    stats = MergeStats()
    start = time.perf_counter()
    loader = load or (lambda task: [read_tensor(i) for i in task.inputs])
    writer = _WriterThread(sink) if threaded_sink else None
    ok = False
    try:
        for task, raw in _iter_inputs(plan.tasks, loader, prefetch):
            out = merge_tensor(plan, task, raw, dev)
            del raw
            if writer is not None:
                writer.put(task.name, out.cpu() if dev.type != "cpu" else out)
            else:
                sink(task.name, out)
            stats.tensors += 1
            stats.bytes_read += task.bytes_in
            stats.bytes_written += task.bytes_out
            if progress is not None:
                progress(stats.tensors, len(plan.tasks), stats.bytes_read)
        ok = True
    finally:
        if writer is not None:
            if ok:
                writer.close()
            else:
                try:
                    writer.close()
                except BaseException:
                    pass
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    return stats


def run_merge(
    recipe: Recipe,
    output: str | Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    max_shard_size: int = 5_000_000_000,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
    source: str = "recipe",
    recipe_text: str | None = None,
    plan: MergePlan | None = None,
) -> MergeResult:
    """Merge to a Hugging Face model folder at ``output``, atomically.

    Everything is checked (recipe, checkpoints, output path) before any file is written;
    the folder appears at ``output`` only when complete.
    """
    from mergekit_lite.card import write_model_files

    output = Path(output)
    check_output_path(output, overwrite=overwrite)
    if plan is None:
        plan = build_plan(recipe, source=source, allow_pickle=allow_pickle)
    layout = [OutputTensor(t.name, t.shape, t.out_dtype) for t in plan.tasks]
    with AtomicOutputDir(output, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layout, max_shard_size=max_shard_size)
        try:
            stats = execute(plan, writer.write, device=device, progress=progress)
        except BaseException:
            writer.abort()
            raise
        files = writer.close()
        stats.bytes_written = writer.bytes_written
        files += write_model_files(plan, tmp, recipe_text=recipe_text, title=output.name)
    log.info("merged %s -> %s: %s", source, output, stats.summary())
    return MergeResult(output=output, files=files, stats=stats, plan=plan)


class InMemoryMerger:
    """Merge recipes into state dicts, reusing source tensors across calls.

    Built for coefficient search: the first merge reads every source tensor once and
    keeps it (on ``device``, in the compute dtype); later merges of the same models with
    other parameters read nothing from disk. Memory is the sum of the distinct sources.
    """

    def __init__(self, *, device: str = "cpu", allow_pickle: bool = False) -> None:
        self.device = torch.device(device)
        self.allow_pickle = allow_pickle
        self._checkpoints: dict[str, Checkpoint] = {}
        self._tensors: dict[tuple[str, str, str], torch.Tensor] = {}
        self._storages: set[int] = set()

    def _load(self, task: TensorTask) -> list[torch.Tensor]:
        out = []
        for info in task.inputs:
            key = info.key
            if key not in self._tensors:
                self._tensors[key] = read_tensor(info).to(self.device)
                self._storages.add(self._tensors[key].untyped_storage().data_ptr())
            out.append(self._tensors[key])
        return out

    def plan(self, recipe: Recipe, *, source: str = "recipe") -> MergePlan:
        return build_plan(
            recipe, source=source, allow_pickle=self.allow_pickle, checkpoints=self._checkpoints
        )

    def merge(self, recipe: Recipe, *, source: str = "recipe") -> dict[str, torch.Tensor]:
        plan = self.plan(recipe, source=source)
        result: dict[str, torch.Tensor] = {}

        def keep(name: str, tensor: torch.Tensor) -> None:
            # a method may return an input unchanged: never hand out the cache itself
            if tensor.untyped_storage().data_ptr() in self._storages:
                tensor = tensor.clone()
            result[name] = tensor

        execute(
            plan,
            keep,
            device=self.device,
            prefetch=0,
            threaded_sink=False,
            load=self._load,
        )
        return result

    def clear(self) -> None:
        self._tensors.clear()
        self._storages.clear()


def merge_state_dict(
    recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Merge ``recipe`` into an in-memory state dict (tensor name -> tensor)."""
    return InMemoryMerger(device=device, allow_pickle=allow_pickle).merge(recipe)
