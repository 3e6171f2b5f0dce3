"""Every trainer under torchrun (2 gloo processes) matches one process, same global batch."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergekit_lite.train.config import DPOConfig, RMConfig, SFTConfig, load_train_config
from mergekit_lite.train.dpo import train_dpo
from mergekit_lite.train.rm import train_rm
from mergekit_lite.train.sft import train_sft

TRAINERS: dict[str, tuple[type[Any], Any]] = {
    "sft": (SFTConfig, train_sft),
    "rm": (RMConfig, train_rm),
    "dpo": (DPOConfig, train_dpo),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("ddp")
    fam = save_family(root / "fam", arch="llama", n_finetunes=0, seed=0)
    rng = random.Random(2)

    def words(lo: int, hi: int) -> str:
        return " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(3))

    sft = [{"prompt": words(0, 100), "completion": words(0, 100)} for _ in range(32)]
    pairs = [
        {"prompt": words(0, 100), "chosen": words(0, 40), "rejected": words(60, 100)}
        for _ in range(32)
    ]
    (root / "sft.jsonl").write_text("\n".join(map(json.dumps, sft)) + "\n")
    (root / "pairs.jsonl").write_text("\n".join(map(json.dumps, pairs)) + "\n")
    return {
        "model": fam["base"],
        "sft": root / "sft.jsonl",
        "rm": root / "pairs.jsonl",
        "dpo": root / "pairs.jsonl",
    }


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_two_processes_match_one(kind: str, data: dict[str, Path], tmp_path: Path) -> None:
    cls, trainer = TRAINERS[kind]

    def config(out: Path, batch_size: int) -> Any:
        return load_train_config(
            cls,
            None,
            {
                "model": str(data["model"]),
                "dataset": {"train": str(data[kind])},
                "output_dir": str(out),
                "max_steps": 4,
                "learning_rate": 2e-3,
                "batch_size": batch_size,
                "max_length": 16,
                "seed": 5,
            },
        )

    one = trainer(config(tmp_path / "one", 8))
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path / "two", 4).model_dump(mode="json")))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    port = str(29600 + list(TRAINERS).index(kind))
    command = [torchrun, "--nproc_per_node", "2", "--master_port", port]
    command += ["-m", "mergekit_lite.cli.main", "train", kind, str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one.history], abs=1e-4)
