"""The distributed path on this CPU: `accelerate launch` with 2, 4 and 8 gloo processes (launch/cpu.yaml), and
two "machines" on 127.0.0.1. What is checked: the job really has N processes; the process count is a deployment
detail (4 processes train the weights of 1, to float rounding; the ranks share every epoch disjointly and
equally); val/test metrics equal a 1-process `kdist evaluate` of the same weights; a GPU launch without CUDA stops."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdist.models import create_model, save_weights

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--no-progress", "--set", "distill.epochs=2", "--set", "data.train_subset=512", "--set", "data.val_subset=256"]


def launch(*args, env=None, config=True):
    """`accelerate launch [--config_file launch/cpu.yaml] ARGS`, as a user types it."""
    head = [sys.executable, "-m", "accelerate.commands.launch"] + (["--config_file", str(REPO / "launch" / "cpu.yaml")] if config else [])
    return [*head, *map(str, args)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained EfficientNet-B0 as the teacher file: distillation only needs its logits."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_weights(create_model("teacher", input_size=None), path, {"data_size": 28})
    return path


def metrics_of(entry: dict) -> dict:
    return {key: entry[key] for key in ("n", "acc", "balanced_acc", "macro_f1")}


def test_two_process_distillation_equals_one_process_evaluation(tmp_path, real_root, teacher):
    """The npz in memory (--shards none) under 2 processes: disjoint equal shares, every test sample once."""
    out, audit = tmp_path / "ddp", tmp_path / "audit"
    env = {**os.environ, "KDIST_DATA_ROOT": str(real_root), "KDIST_AUDIT_SAMPLES": str(audit)}
    done = subprocess.run(launch("-m", "kdist.distill", "--teacher", teacher, *QUICK, "--shards", "none", "--out", out), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2  # not two world-size-1 jobs
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "distilled"]

    # Each epoch the two ranks saw disjoint samples, the same number each, and between them all but the
    # last partial batch's leftovers.
    for epoch in range(2):
        rank0, rank1 = (np.load(audit / f"distilled-epoch{epoch}-rank{rank}.npy") for rank in (0, 1))
        assert len(rank0) == len(rank1) and not set(rank0) & set(rank1)
        assert len(rank0) + len(rank1) == 512  # 4 batches of 128: 2 each
    assert not np.array_equal(np.load(audit / "distilled-epoch0-rank0.npy"), np.load(audit / "distilled-epoch1-rank0.npy"))

    # val/test metrics of the 2-process run equal those of one process on the same weights: every sample once
    one = subprocess.run([sys.executable, "-m", "kdist.evaluate", out / "distilled.safetensors", "--shards", "none"], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    alone = json.loads(one.stdout)
    assert alone["num_processes"] == 1
    distilled = results["models"]["distilled"]
    assert distilled["test"]["n"] == 2005
    for split in ("val", "test"):
        # the val split is the full 1003 for evaluate and a 256 subset inside a --quick run
        if split == "test":
            assert metrics_of(distilled[split]) == metrics_of(alone[split])
            assert distilled[split]["auc"] == pytest.approx(alone[split]["auc"], abs=1e-4)

    # ... and `accelerate launch -m kdist.evaluate` with 2 processes (reading the shards, the default) prints what
    # one process on the npz prints
    two = subprocess.run(launch("-m", "kdist.evaluate", out / "distilled.safetensors"), env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    both = json.loads(two.stdout)
    assert both["num_processes"] == 2
    for split in ("val", "test"):
        assert metrics_of(both[split]) == metrics_of(alone[split]) and both[split]["n"] == {"val": 1003, "test": 2005}[split]


def test_two_processes_distil_from_shards_on_disjoint_equal_shares(tmp_path, real_root, teacher):
    """`--shards auto`: the data file's shards are written once, each rank streams its own shards (two
    DataLoader workers each), and test metrics equal a 1-process evaluation from the npz (PNG is lossless)."""
    out, audit = tmp_path / "ddp-shards", tmp_path / "audit"
    env = {**os.environ, "KDIST_DATA_ROOT": str(real_root), "KDIST_AUDIT_SAMPLES": str(audit), "KDIST_SHARD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(launch("-m", "kdist.distill", "--teacher", teacher, *QUICK, "--set", "distill.batch_size=64", "--shards", "auto",
                                 "--out", out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert len(list((tmp_path / "cache").glob("dermamnist_28-*/train-*.tar"))) == 16
    for epoch in range(2):
        rank0, rank1 = (np.load(audit / f"distilled-epoch{epoch}-rank{rank}.npy") for rank in (0, 1))
        assert len(rank0) == len(rank1) == 8 * 32 and not set(rank0) & set(rank1)  # 512 / global batch 64 = 8 steps of 32 per rank
    distilled = json.loads((out / "results.json").read_text())["models"]["distilled"]
    one = subprocess.run([sys.executable, "-m", "kdist.evaluate", out / "distilled.safetensors", "--shards", "none"], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    alone = json.loads(one.stdout)  # one process, the npz
    assert distilled["test"]["n"] == 2005 and metrics_of(distilled["test"]) == metrics_of(alone["test"])
    # 2 processes evaluating from the shards count every val and test sample once, as one process on the npz
    two = subprocess.run(launch("-m", "kdist.evaluate", out / "distilled.safetensors", "--shards", "auto"), env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    both = json.loads(two.stdout)
    assert both["num_processes"] == 2 and both["val"]["n"] == 1003 and both["test"]["n"] == 2005
    assert all(metrics_of(both[split]) == metrics_of(alone[split]) for split in ("val", "test"))


def test_two_machines_on_localhost_distil_together(tmp_path, real_root, teacher):
    """Two launches, one per "machine" (--num_machines 2 --machine_rank 0|1), meet on 127.0.0.1 and train as one job."""
    out, port = tmp_path / "two-machines", free_port()
    env = {**os.environ, "KDIST_DATA_ROOT": str(real_root), "ACCELERATE_USE_CPU": "true"}
    machines = [
        subprocess.Popen(launch("--multi_gpu", "--num_machines", 2, "--machine_rank", rank, "--num_processes", 2,
                                "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "kdist.distill",
                                "--teacher", teacher, *QUICK, "--set", "distill.epochs=1", "--out", out, config=False),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert json.loads((out / "results.json").read_text())["models"]["distilled"]["test"]["n"] == 2005
    assert "results:" in outputs[0][0] and "results:" not in outputs[1][0]  # only the main process reports


def relative_l2(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    return float(sum((first[k].double() - second[k].double()).pow(2).sum() for k in first).sqrt()
                 / sum(first[k].double().pow(2).sum() for k in first).sqrt())


@pytest.mark.parametrize("command", [["kdist.distill", "--teacher", None], ["kdist.train", "student"]])
def test_four_processes_train_the_weights_of_one(tmp_path, real_root, teacher, command):
    """The same config and seed on 1 and on 4 processes: the global batch, sample order, dropout masks and the
    loss (DIST's batch-level term included) are those of one process, so the weights agree to float rounding.
    4 optimizer steps: Adam turns rounding differences in near-cancelling gradient elements into update
    differences of the order of the learning rate, so over many steps weights drift apart chaotically
    (measured: 16 quick steps on one process with 1 vs 2 threads already differ by 3e-4)."""
    command = [str(teacher) if part is None else part for part in command]
    env = {**os.environ, "KDIST_DATA_ROOT": str(real_root), "OMP_NUM_THREADS": "1"}  # one thread per process in both
    args = ["--quick", "--no-progress", "--shards", "none", "--set", "data.train_subset=512", "--set", "student.epochs=1",
            "--set", "distill.epochs=1"]
    one = subprocess.run([sys.executable, "-m", *command, *args, "--out", tmp_path / "one"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    four = subprocess.run(launch("--num_processes", 4, "-m", *command, *args, "--out", tmp_path / "four"), env=env,
                          capture_output=True, text=True)
    assert four.returncode == 0, four.stderr[-3000:]
    assert "4 processes on cpu: global batch 128 = 32 per process x 4 x 1 accumulation step" in four.stdout
    info = json.loads((tmp_path / "four" / "run_info.json").read_text())
    assert info["num_processes"] == 4 and info["device"] == {"type": "cpu", "count": 0}
    assert info["batch"]["distill"] == {"global": 128, "per_process": 32, "accumulation_steps": 1}
    name = "distilled" if command[0] == "kdist.distill" else "student"
    assert relative_l2(tmp_path / "one" / f"{name}.safetensors", tmp_path / "four" / f"{name}.safetensors") < 1e-4
    results = [json.loads((tmp_path / run / "results.json").read_text())["models"][name] for run in ("one", "four")]
    for split in ("val", "test"):
        assert all(round(results[0][split][key], 3) == round(results[1][split][key], 3) for key in ("acc", "auc", "macro_f1"))


def test_eight_processes_on_the_default_shards_see_every_sample_once(tmp_path, real_root, teacher):
    """8 processes (more than shards per worker would allow before) from the default shards, --quick: the run
    completes and every train sample of the subset is trained on exactly once per epoch across the ranks."""
    out, audit = tmp_path / "eight", tmp_path / "audit"
    env = {**os.environ, "KDIST_DATA_ROOT": str(real_root), "KDIST_AUDIT_SAMPLES": str(audit), "KDIST_SHARD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(launch("--num_processes", 8, "-m", "kdist.distill", "--teacher", teacher, "--quick", "--no-progress",
                                 "--set", "distill.epochs=1", "--out", out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 8
    seen = [np.load(audit / f"distilled-epoch0-rank{rank}.npy") for rank in range(8)]
    assert len({len(part) for part in seen}) == 1  # equal shares
    everything = np.concatenate(seen)
    assert len(everything) == len(set(everything.tolist())) == 1024  # the quick subset: 8 global batches of 128, each sample once


def test_a_gpu_launch_without_cuda_stops_with_one_line(tmp_path, synthetic_root):
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "1gpu.yaml")]
    done = subprocess.run([*head, "-m", "kdist.train", "student", "--quick", "--data-root", synthetic_root, "--out", tmp_path / "r"],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"})
    # kdist exits 2 with one line; Accelerate's launcher reports that status and exits 1 itself
    assert done.returncode != 0 and "returned non-zero exit status 2" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("kdist: error:")]
    assert len(errors) == 1 and "no CUDA device" in errors[0] and "launch/cpu.yaml" in errors[0]
    assert not (tmp_path / "r").exists()
