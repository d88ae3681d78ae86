"""A run killed with SIGKILL resumes from its finished stages and last checkpoints, and ends with the
same results.json as an uninterrupted run (CPU runs are deterministic)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.study


def strip_times(results):
    results.pop("wall_time_s", None)
    for entry in results["models"].values():
        entry.pop("train_time_s", None)
    return results


def kdist(*args):
    return [sys.executable, "-m", "kdist.cli", *map(str, args)]


def kill_after_first_checkpoint(command, out):
    """Start `command` and SIGKILL it once the student stage has written its first checkpoint."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "student" / "checkpoints" / "last" / "progress.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_mid_training_then_resume(tmp_path, synthetic_root):
    common = [
        "--quick",
        "--data-root",
        synthetic_root,
        "--no-progress",
        "--set",
        "student.epochs=8",
        "--set",
        "data.train_subset=384",
        "--set",
        "data.val_subset=128",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(kdist("run", *common, "--out", whole), capture_output=True).returncode == 0

    kill_after_first_checkpoint(kdist("run", *common, "--out", killed), killed)
    assert not (killed / "distilled.safetensors").exists(), "the kill came too late to test resuming"
    assert (killed / "teacher.safetensors").exists() and not (killed / "student.safetensors").exists()

    # A fresh run into the killed folder is refused (nothing overwritten); --resume continues it.
    refused = subprocess.run(kdist("run", *common, "--out", killed), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(kdist("run", "--resume", killed, "--no-progress"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = strip_times(json.loads((whole / "results.json").read_text()))
    got = strip_times(json.loads((killed / "results.json").read_text()))
    # The same record, every number equal: finished stages are kept, the interrupted stage continues
    # from its last checkpoint exactly as the uninterrupted process did, and the weights agree.
    assert got == expected
    for name in ("student", "distilled"):
        assert (killed / f"{name}.safetensors").read_bytes() == (whole / f"{name}.safetensors").read_bytes()
    # The per-epoch curves survive the kill: the resumed epochs continue the same metrics.csv.
    from kdist.plots import read_history

    resumed_curve, whole_curve = read_history(killed / "student")["val/acc"], read_history(whole / "student")["val/acc"]
    assert [epoch for epoch, _ in resumed_curve] == list(range(8))
    assert resumed_curve == whole_curve


def test_a_killed_train_student_resumes_with_its_config(tmp_path, synthetic_root):
    # `train` and `distill` resume as `run` does: the saved config, --val-only kept from the command line.
    common = [
        "--quick",
        "--data-root",
        synthetic_root,
        "--no-progress",
        "--val-only",
        "--set",
        "student.epochs=6",
        "--set",
        "data.train_subset=384",
        "--set",
        "data.val_subset=128",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(kdist("train", "student", *common, "--out", whole), capture_output=True).returncode == 0

    kill_after_first_checkpoint(kdist("train", "student", *common, "--out", killed), killed)
    assert not (killed / "student.safetensors").exists(), "the kill came too late to test resuming"

    changed = subprocess.run(
        kdist("train", "student", "--resume", killed, "--seed", "1"), capture_output=True, text=True
    )
    assert changed.returncode == 2 and "saved config" in changed.stderr
    resumed = subprocess.run(
        kdist("train", "student", "--resume", killed, "--val-only", "--no-progress"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = strip_times(json.loads((killed / "results.json").read_text()))
    assert got == strip_times(json.loads((whole / "results.json").read_text()))
    assert "test" not in got["models"]["student"]
    assert (killed / "student.safetensors").read_bytes() == (whole / "student.safetensors").read_bytes()


def test_resume_needs_a_run_folder(tmp_path):
    result = subprocess.run(kdist("run", "--resume", tmp_path), capture_output=True, text=True)
    assert result.returncode == 2 and "config.yaml not found" in result.stderr
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    mixed = subprocess.run(kdist("run", "--resume", tmp_path, "--seeds", "0,1"), capture_output=True, text=True)
    assert mixed.returncode == 2 and "saved config" in mixed.stderr and not (tmp_path / "seed0").exists()


def test_last_checkpoint_is_written_every_epoch(tmp_path, synthetic_root):
    # At a learning rate this small val accuracy never improves after epoch 0, so the best weights stay
    # those of epoch 0; the last checkpoint must still be the final epoch's, or a resume repeats every epoch since.
    out = tmp_path / "run"
    args = [
        "train",
        "student",
        "--quick",
        "--data-root",
        synthetic_root,
        "--no-progress",
        "--val-only",
        "--set",
        "student.epochs=4",
        "--set",
        "student.lr=1e-12",
        "--set",
        "data.train_subset=256",
        "--set",
        "data.val_subset=128",
        "--out",
        out,
    ]
    assert subprocess.run(kdist(*args), capture_output=True).returncode == 0
    folder = out / "student" / "checkpoints"
    progress = json.loads((folder / "last" / "progress.json").read_text())
    assert progress["best_epoch"] == 0, "val improved after epoch 0: this test no longer checks what it means to"
    assert progress["epoch"] == 4 and len(progress["history"]) == 4
    assert sorted(path.name for path in folder.iterdir()) == ["best.safetensors", "last"]
    # Accelerate's save_state: model as safetensors, optimizer and scheduler beside it;
    # nothing else of kdist's is pickled
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "progress.json"} <= {
        p.name for p in (folder / "last").iterdir()
    }
    assert not list((folder / "last").glob("custom_checkpoint_*"))


@pytest.mark.parametrize("source", ["npz", "shards"])
def test_a_stop_request_mid_epoch_saves_and_resumes_exactly(tmp_path, synthetic_root, source, monkeypatch):
    """SIGUSR1 (what Slurm sends before preemption or the time limit): the step finishes, the state is saved
    part-way through the epoch, the command exits with 75, and --resume ends as an uninterrupted run; from
    the npz in memory and from shards streamed by two DataLoader workers."""
    common = [
        "--quick",
        "--data-root",
        synthetic_root,
        "--no-progress",
        "--val-only",
        "--set",
        "student.epochs=3",
        "--set",
        "student.batch_size=16",
        "--set",
        "data.train_subset=512",
        "--set",
        "data.val_subset=128",
    ]
    monkeypatch.setenv("KDIST_SHARD_CACHE", str(tmp_path / "cache"))
    common += ["--shards", "auto" if source == "shards" else "none"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert subprocess.run(kdist("train", "student", *common, "--out", whole), capture_output=True).returncode == 0

    process = subprocess.Popen(
        kdist("train", "student", *common, "--out", stopped),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = stopped / "student" / "checkpoints" / "last" / "progress.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 1
    os.kill(process.pid, signal.SIGUSR1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-2000:]
    assert "stopped on request" in err and "--resume" in err
    progress = json.loads(marker.read_text())
    assert progress["step_in_epoch"] > 0 and progress["epoch"] >= 1, "the stop did not fall part-way through an epoch"

    resumed = subprocess.run(
        kdist("train", "student", "--resume", stopped, "--val-only", "--no-progress"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert strip_times(json.loads((stopped / "results.json").read_text())) == strip_times(
        json.loads((whole / "results.json").read_text())
    )
    assert (stopped / "student.safetensors").read_bytes() == (whole / "student.safetensors").read_bytes()
    assert (stopped / "student" / "metrics.csv").read_text() == (whole / "student" / "metrics.csv").read_text()
