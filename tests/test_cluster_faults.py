"""What a cluster does to a job, shown with gloo processes on this CPU: a preempted run resumes on another
process count (stopped mid-epoch on 4 processes and resumed on 1, and the reverse) and ends as an
uninterrupted run does, within float rounding; a node whose --out is not the folder rank 0 writes stops the
whole launch in seconds with one line from that rank; results.json is locked where the filesystem has no
flock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from launching import kdist_env, launch
from test_distributed import free_port
from test_world_size import relative_l2

from kdist.files import locked

pytestmark = pytest.mark.processes

COMMON = [
    "--quick",
    "--no-progress",
    "--val-only",
    "--shards",
    "none",
    "--set",
    "data.train_subset=256",
    "--set",
    "data.val_subset=128",
    "--set",
    "student.epochs=2",
    "--set",
    "student.batch_size=32",
]


def train_student(processes: int, out: Path, env: dict, resume: bool = False) -> subprocess.Popen:
    args = ["-m", "kdist.train", "student", *COMMON, "--out", out] + (["--resume", "auto"] if resume else [])
    command = launch("--num_processes", processes, *args) if processes > 1 else [sys.executable, *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stopped_then_resumed(first: int, then: int, out: Path, root: Path) -> str:
    """Train on `first` processes, ask it to stop (the stop file Slurm's batch script touches) once epoch 0 is
    saved, then resume on `then` processes; the resumed run's stdout."""
    stop = out.parent / f"{out.name}.stop"
    env = kdist_env(root, OMP_NUM_THREADS="1", KDIST_STOP_FILE=str(stop))
    process = train_student(first, out, env)
    marker = out / "student" / "checkpoints" / "last" / "progress.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    stop.touch()
    _, err = process.communicate(timeout=300)
    assert "stopped on request" in err, err[-3000:]
    progress = json.loads(marker.read_text())
    assert progress["epoch"] == 1 and progress["step_in_epoch"] > 0, "the stop did not fall inside epoch 1"
    stop.unlink()
    resumed = train_student(then, out, env, resume=True)
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    return stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("whole") / "run"
    done = train_student(1, out, kdist_env(synthetic_root, OMP_NUM_THREADS="1"))
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    return out


@pytest.mark.parametrize("first, then", [(4, 1), (1, 4)])
def test_a_run_stopped_on_one_process_count_resumes_on_another(tmp_path, synthetic_root, uninterrupted, first, then):
    out = tmp_path / "run"
    stdout = stopped_then_resumed(first, then, out, synthetic_root)
    assert f"saved by {first} process(es), resumed on {then}" in stdout
    # The floor for any equality over many steps: one process with 1 vs 2 threads drifts ~5e-3 apart, and where the
    # stop falls (timing) changes which steps run on 4 processes: measured up to 5.4e-3 on a loaded machine
    assert relative_l2(uninterrupted / "student.safetensors", out / "student.safetensors") < 1e-2
    ours, theirs = (json.loads((run / "results.json").read_text())["models"]["student"] for run in (out, uninterrupted))
    assert round(ours["val"]["acc"], 2) == round(theirs["val"]["acc"], 2)
    history = [json.loads((run / "student/checkpoints/last/progress.json").read_text()) for run in (out, uninterrupted)]
    assert history[0]["epoch"] == history[1]["epoch"] == 2 and history[0]["best_epoch"] == history[1]["best_epoch"]


def test_a_node_that_does_not_see_the_run_folder_ends_the_launch_with_one_line(tmp_path, synthetic_root):
    """Two "machines" whose --out is a relative path, each in its own working folder: what a node-local --out
    does on a cluster. The other node stops at the start, naming the folder, and the launch ends in seconds."""
    port, env = free_port(), kdist_env(synthetic_root, ACCELERATE_USE_CPU="true")
    started = time.monotonic()
    machines = []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        command = launch(
            "--multi_gpu", "--num_machines", 2, "--machine_rank", rank, "--num_processes", 2,
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            "-m", "kdist.train", "student", *COMMON, "--out", "run", config=False,
        )  # fmt: skip
        machines.append(
            subprocess.Popen(
                command,
                cwd=tmp_path / f"node{rank}",
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = "".join(machine.communicate(timeout=300)[1] for machine in machines)
    assert all(machine.returncode != 0 for machine in machines)
    assert time.monotonic() - started < 120  # not the collective timeout (600 s)
    lines = [line for line in errors.splitlines() if line.startswith("kdist: error")]
    assert len(lines) == 1, errors[-3000:]
    assert "(rank 1 on " in lines[0] and "does not see the run folder" in lines[0]
    assert str(tmp_path / "node1" / "run") in lines[0] and "shared by every node" in lines[0]
    assert not (tmp_path / "node0" / "run" / "student").exists()  # nothing trained


def test_results_are_locked_where_the_filesystem_has_no_flock(tmp_path, monkeypatch):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    counter = tmp_path / "count"
    counter.write_text("0")

    def add_one_many_times():
        for _ in range(40):
            with locked(tmp_path / ".lock"):
                value = int(counter.read_text())
                time.sleep(0.0005)  # a window in which an unlocked writer would lose the other's update
                counter.write_text(str(value + 1))

    writers = [threading.Thread(target=add_one_many_times) for _ in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert counter.read_text() == "120"
    assert not (tmp_path / ".lock.held").exists()
    assert os.path.exists(tmp_path / ".lock")
