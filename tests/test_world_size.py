"""The process count as a deployment detail, on this CPU (gloo): 4 processes train the weights of 1 to float
rounding, 8 processes read the default shards with every sample once per epoch, and a GPU launch without CUDA
stops with one line. (Split from test_distributed.py so the two long files run on different test workers.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launching import REPO, kdist_env, launch

pytestmark = pytest.mark.processes


def relative_l2(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    return float(
        sum((first[k].double() - second[k].double()).pow(2).sum() for k in first).sqrt()
        / sum(first[k].double().pow(2).sum() for k in first).sqrt()
    )


@pytest.mark.parametrize(
    "command",
    [
        ["kdist.distill", "--teacher", None],
        ["kdist.train", "student"],
        ["kdist.distill", "--teacher", None, "--set", "data.augment=photo"],  # the online teacher, photo crops
    ],
    ids=["distill", "train", "distill-photo"],
)
def test_four_processes_train_the_weights_of_one(tmp_path, real_root, teacher, command):
    """The same config and seed on 1 and on 4 processes: the global batch, sample order, augmentation draws,
    dropout masks and the loss (DIST's batch-level term included) are those of one process, so the weights agree
    to float rounding.
    4 optimizer steps: Adam turns rounding differences in near-cancelling gradient elements into update
    differences of the order of the learning rate, so over many steps weights drift apart chaotically
    (measured: 16 quick steps on one process with 1 vs 2 threads already differ by 3e-4)."""
    command = [str(teacher) if part is None else part for part in command]
    env = kdist_env(real_root, OMP_NUM_THREADS="1")  # one thread per process in both
    args = [
        "--quick",
        "--no-progress",
        "--shards",
        "none",
        "--set",
        "data.train_subset=512",
        "--set",
        "student.epochs=1",
        "--set",
        "distill.epochs=1",
    ]
    one = subprocess.run(
        [sys.executable, "-m", *command, *args, "--out", tmp_path / "one"], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    four = subprocess.run(
        launch("--num_processes", 4, "-m", *command, *args, "--out", tmp_path / "four"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert four.returncode == 0, four.stderr[-3000:]
    assert "4 processes on cpu: global batch 128 = 32 per process x 4 x 1 accumulation step" in four.stdout
    info = json.loads((tmp_path / "four" / "run_info.json").read_text())
    assert info["num_processes"] == 4 and info["device"] == {"type": "cpu", "count": 0}
    assert info["batch"]["distill"] == {"global": 128, "per_process": 32, "accumulation_steps": 1}
    name = "distilled" if command[0] == "kdist.distill" else "student"
    assert relative_l2(tmp_path / "one" / f"{name}.safetensors", tmp_path / "four" / f"{name}.safetensors") < 1e-4
    results = [json.loads((tmp_path / run / "results.json").read_text())["models"][name] for run in ("one", "four")]
    for split in ("val", "test"):
        assert all(
            round(results[0][split][key], 3) == round(results[1][split][key], 3) for key in ("acc", "auc", "macro_f1")
        )


def test_eight_processes_on_the_default_shards_see_every_sample_once(tmp_path, real_root, teacher):
    """8 processes (more than shards per worker would allow before) from the default shards, --quick: the run
    completes and every train sample of the subset is trained on exactly once per epoch across the ranks."""
    out, audit = tmp_path / "eight", tmp_path / "audit"
    env = kdist_env(real_root, audit=audit, shard_cache=tmp_path / "cache")
    done = subprocess.run(
        launch(
            "--num_processes",
            8,
            "-m",
            "kdist.distill",
            "--teacher",
            teacher,
            "--quick",
            "--no-progress",
            "--set",
            "distill.epochs=1",
            "--out",
            out,
        ),
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 8
    seen = [np.load(audit / f"distilled-epoch0-rank{rank}.npy") for rank in range(8)]
    assert len({len(part) for part in seen}) == 1  # equal shares
    everything = np.concatenate(seen)
    assert (
        len(everything) == len(set(everything.tolist())) == 1024
    )  # the quick subset: 8 global batches of 128, each sample once


def test_a_gpu_launch_without_cuda_stops_with_one_line(tmp_path, synthetic_root):
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "1gpu.yaml")]
    done = subprocess.run(
        [*head, "-m", "kdist.train", "student", "--quick", "--data-root", synthetic_root, "--out", tmp_path / "r"],
        capture_output=True,
        text=True,
        # no GPU visible (as on a node whose driver is broken), without asking for the CPU
        env={**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "CUDA_VISIBLE_DEVICES": ""},
    )
    # kdist exits 2 with one line; Accelerate's launcher reports that status and exits 1 itself
    assert done.returncode != 0 and "returned non-zero exit status 2" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("kdist: error:")]
    assert len(errors) == 1 and "no CUDA device" in errors[0] and "launch/cpu.yaml" in errors[0]
    assert not (tmp_path / "r").exists()
