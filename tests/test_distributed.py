"""The distributed path on this CPU: `accelerate launch` with 2 gloo processes (launch/cpu.yaml), and two
"machines" on 127.0.0.1. What is checked: the job really has 2 processes, the ranks train on disjoint, equal
shares of every epoch, and val/test metrics equal a 1-process `kdist evaluate` of the same weights. More
processes and the 1-vs-N equality: test_world_size.py."""

from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest
from launching import evaluate_alone, kdist_env, launch

pytestmark = pytest.mark.processes

QUICK = [
    "--quick",
    "--no-progress",
    "--set",
    "distill.epochs=2",
    "--set",
    "data.train_subset=512",
    "--set",
    "data.val_subset=256",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics_of(entry: dict) -> dict:
    return {key: entry[key] for key in ("n", "acc", "balanced_acc", "macro_f1")}


def test_two_process_distillation_equals_one_process_evaluation(tmp_path, real_root, teacher):
    """The npz in memory (--shards none) under 2 processes: disjoint equal shares, every test sample once."""
    out, audit = tmp_path / "ddp", tmp_path / "audit"
    env = kdist_env(real_root, audit=audit)
    done = subprocess.run(
        launch("-m", "kdist.distill", "--teacher", teacher, *QUICK, "--shards", "none", "--out", out),
        env=env,
        capture_output=True,
        text=True,
    )
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
    assert not np.array_equal(
        np.load(audit / "distilled-epoch0-rank0.npy"), np.load(audit / "distilled-epoch1-rank0.npy")
    )

    # val/test metrics of the 2-process run equal those of one process on the same weights: every sample once
    alone = evaluate_alone(out / "distilled.safetensors", env)
    distilled = results["models"]["distilled"]
    assert distilled["test"]["n"] == 2005
    for split in ("val", "test"):
        # the val split is the full 1003 for evaluate and a 256 subset inside a --quick run
        if split == "test":
            assert metrics_of(distilled[split]) == metrics_of(alone[split])
            assert distilled[split]["auc"] == pytest.approx(alone[split]["auc"], abs=1e-4)

    # ... and `accelerate launch -m kdist.evaluate` with 2 processes (reading the shards, the default) prints what
    # one process on the npz prints
    two = subprocess.run(
        launch("-m", "kdist.evaluate", out / "distilled.safetensors"), env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-2000:]
    both = json.loads(two.stdout)
    assert both["num_processes"] == 2
    for split in ("val", "test"):
        assert (
            metrics_of(both[split]) == metrics_of(alone[split])
            and both[split]["n"] == {"val": 1003, "test": 2005}[split]
        )


def test_two_processes_distil_from_shards_on_disjoint_equal_shares(tmp_path, real_root, teacher):
    """`--shards auto`: the data file's shards are written once, each rank streams its own shards (two
    DataLoader workers each), and test metrics equal a 1-process evaluation from the npz (PNG is lossless)."""
    out, audit = tmp_path / "ddp-shards", tmp_path / "audit"
    env = kdist_env(real_root, audit=audit, shard_cache=tmp_path / "cache")
    done = subprocess.run(
        launch(
            "-m",
            "kdist.distill",
            "--teacher",
            teacher,
            *QUICK,
            "--set",
            "distill.batch_size=64",
            "--shards",
            "auto",
            "--out",
            out,
        ),
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert len(list((tmp_path / "cache").glob("dermamnist_28-*/train-*.tar"))) == 16
    for epoch in range(2):
        rank0, rank1 = (np.load(audit / f"distilled-epoch{epoch}-rank{rank}.npy") for rank in (0, 1))
        assert len(rank0) == len(rank1) == 8 * 32 and not set(rank0) & set(
            rank1
        )  # 512 / global batch 64 = 8 steps of 32 per rank
    distilled = json.loads((out / "results.json").read_text())["models"]["distilled"]
    alone = evaluate_alone(out / "distilled.safetensors", env)  # one process, the npz
    assert distilled["test"]["n"] == 2005 and metrics_of(distilled["test"]) == metrics_of(alone["test"])
    # 2 processes evaluating from the shards count every val and test sample once, as one process on the npz
    two = subprocess.run(
        launch("-m", "kdist.evaluate", out / "distilled.safetensors", "--shards", "auto"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    both = json.loads(two.stdout)
    assert both["num_processes"] == 2 and both["val"]["n"] == 1003 and both["test"]["n"] == 2005
    assert all(metrics_of(both[split]) == metrics_of(alone[split]) for split in ("val", "test"))


def test_two_machines_on_localhost_distil_together(tmp_path, real_root, teacher):
    """Two launches, one per "machine" (--num_machines 2 --machine_rank 0|1), meet on 127.0.0.1 and train as one job."""
    out, port = tmp_path / "two-machines", free_port()
    env = kdist_env(real_root, ACCELERATE_USE_CPU="true")
    machines = [
        subprocess.Popen(
            launch(
                "--multi_gpu",
                "--num_machines",
                2,
                "--machine_rank",
                rank,
                "--num_processes",
                2,
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "-m",
                "kdist.distill",
                "--teacher",
                teacher,
                *QUICK,
                "--set",
                "distill.epochs=1",
                "--out",
                out,
                config=False,
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert json.loads((out / "results.json").read_text())["models"]["distilled"]["test"]["n"] == 2005
    assert "results:" in outputs[0][0] and "results:" not in outputs[1][0]  # only the main process reports
