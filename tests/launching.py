"""What the multi-process tests share: `accelerate launch` as a user types it, the environment of a launched
kdist command, and a 1-process `kdist evaluate` to compare a launched run against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(*args, config=True) -> list[str]:
    """`accelerate launch [--config_file launch/cpu.yaml] ARGS`, as a user types it."""
    head = [sys.executable, "-m", "accelerate.commands.launch"] + (
        ["--config_file", str(REPO / "launch" / "cpu.yaml")] if config else []
    )
    return [*head, *map(str, args)]


def kdist_env(data_root, audit: Path | None = None, shard_cache: Path | None = None, **extra) -> dict:
    """The environment of a launched kdist command: the data root; with `audit`, each process writes the sample
    indices it trained on (KDIST_AUDIT_SAMPLES); with `shard_cache`, `--shards auto` writes there."""
    env = {**os.environ, "KDIST_DATA_ROOT": str(data_root), **extra}
    if audit is not None:
        env["KDIST_AUDIT_SAMPLES"] = str(audit)
    if shard_cache is not None:
        env["KDIST_SHARD_CACHE"] = str(shard_cache)
    return env


def evaluate_alone(weights: Path, env: dict) -> dict:
    """`kdist evaluate WEIGHTS --shards none` in one process, from the npz: its printed JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "kdist.evaluate", weights, "--shards", "none"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["num_processes"] == 1
    return result
