"""slurm/*.sh against a real one-node Slurm (tests/slurm_cluster.py): a 2-process job, a preempted job that
saves, requeues and resumes to the uninterrupted result, the study chain, two "nodes" as two tasks, and bad
settings that fail at once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from kdist.models import create_model, save_weights

from slurm_cluster import Cluster, ensure_installed

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--no-progress", "--set", "distill.epochs=3", "--set", "data.train_subset=512", "--set", "data.val_subset=128"]
NO_GPUS = ["--gres=none", "--cpus-per-task=2"]  # the test node has 2 CPUs and no GPUs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_weights(create_model("teacher", input_size=None), path, {"data_size": 28})
    return path


def job_env(slurm, real_root, out, **extra):
    env = {**slurm.env, "KDIST_DATA_ROOT": str(real_root), "KDIST_OUT": str(out), "KDIST_LAUNCH_CONFIG": "launch/cpu.yaml",
           "KDIST_PROCS_PER_NODE": "2", "ACCELERATE_USE_CPU": "true", "KDIST_VENV": sys.prefix}
    return {**env, **{key: str(value) for key, value in extra.items()}}


def sbatch(slurm, env, log, *args):
    done = slurm.run("sbatch", "--parsable", f"--output={log}", *NO_GPUS, *args, check=False, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def strip_times(results):
    results.pop("wall_time_s", None)
    for entry in results["models"].values():
        entry.pop("train_time_s", None)
    return results


@pytest.fixture(scope="module")
def uninterrupted(slurm, real_root, teacher, tmp_path_factory):
    """`sbatch --wait slurm/distill.sh` with the 2-process CPU launch config: the reference run."""
    folder = tmp_path_factory.mktemp("whole")
    out, log = folder / "run", folder / "job.log"
    env = job_env(slurm, real_root, out)
    done = slurm.run("sbatch", "--wait", f"--output={log}", *NO_GPUS, "slurm/distill.sh", "--teacher", teacher, *QUICK, check=False, cwd=REPO, env=env)
    assert done.returncode == 0, log.read_text()[-3000:]
    return out, log


def test_sbatch_distill_with_two_processes(uninterrupted):
    out, log = uninterrupted
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "distilled"] and results["models"]["distilled"]["test"]["n"] == 2005
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert "1 node(s) x 2 process(es)" in log.read_text()


def test_preempted_job_saves_requeues_and_resumes_to_the_same_result(slurm, real_root, teacher, uninterrupted, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(slurm, job_env(slurm, real_root, out), log, "slurm/distill.sh", "--teacher", teacher, *QUICK)
    first_checkpoint = out / "distilled" / "checkpoints" / "last" / "progress.json"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert first_checkpoint.exists(), log.read_text()[-3000:] if log.exists() else "no log"
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T does before the time limit
    # The script saves, requeues; the job waits for its begin time: start it again at once.
    assert slurm.wait_for(job, states=("PENDING", "COMPLETED", "FAILED"), timeout=300) == "PENDING", log.read_text()[-3000:]
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert slurm.wait_for(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "requeueing job" in text and "resuming" in text  # the log of the requeued run is appended to the first
    progress_lines = [line for line in text.splitlines() if "stopped on request" in line]
    assert progress_lines, text[-3000:]
    whole = json.loads((uninterrupted[0] / "results.json").read_text())
    assert strip_times(json.loads((out / "results.json").read_text())) == strip_times(whole)
    assert (out / "distilled.safetensors").read_bytes() == (uninterrupted[0] / "distilled.safetensors").read_bytes()


def test_study_chain_runs_to_a_report(slurm, real_root, tmp_path):
    out = tmp_path / "study"
    env = job_env(slurm, real_root, out, KDIST_PROCS_PER_NODE=1, KDIST_SBATCH=f"--gres=none --cpus-per-task=1 --output={tmp_path}/%x-%j.out")
    done = slurm.run("bash", "slurm/study.sh", "--quick", "--no-progress", check=False, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    report_job = done.stdout.split("report ")[-1].strip()
    state = slurm.wait_for(report_job, timeout=600)
    logs = "\n".join(path.read_text()[-1500:] for path in sorted(tmp_path.glob("*.out")))
    assert state == "COMPLETED", logs
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "student", "distilled"]
    assert (out / "report.md").exists() and (out / "report.html").exists()


def test_two_tasks_emulating_two_nodes_train_together(slurm, real_root, teacher, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    env = job_env(slurm, real_root, out, KDIST_PROCS_PER_NODE=1, KDIST_TASKS_PER_NODE_OK=1)
    done = slurm.run("sbatch", "--wait", f"--output={log}", "--gres=none", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "slurm/distill.sh",
                     "--teacher", teacher, *QUICK, "--set", "distill.epochs=1", check=False, cwd=REPO, env=env)
    assert done.returncode == 0, log.read_text()[-3000:] if log.exists() else done.stderr
    assert "2 node(s) x 1 process(es)" in log.read_text()
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert json.loads((out / "results.json").read_text())["models"]["distilled"]["test"]["n"] == 2005


@pytest.mark.parametrize("problem", ["tasks-per-node", "missing-teacher", "owned-folder", "config-machines"])
def test_bad_settings_fail_at_once_with_one_line(slurm, real_root, teacher, tmp_path, problem):
    out, log = tmp_path / "run", tmp_path / "job.log"
    env, args, teacher_path = job_env(slurm, real_root, out), [], teacher
    if problem == "tasks-per-node":
        args = ["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"]
    elif problem == "missing-teacher":
        teacher_path = tmp_path / "nowhere.safetensors"
    elif problem == "owned-folder":
        out.mkdir()
        (out / ".slurm-owner-distill").write_text("12345\n")
    else:
        env["KDIST_LAUNCH_CONFIG"] = "launch/multinode.yaml"
    start = time.time()
    done = slurm.run("sbatch", "--wait", f"--output={log}", *NO_GPUS, *args, "slurm/distill.sh", "--teacher", teacher_path, *QUICK,
                     check=False, cwd=REPO, env=env)
    assert log.exists(), done.stderr
    errors = [line for line in log.read_text().splitlines() if line.startswith("kdist-slurm: error:")]
    assert done.returncode != 0 and len(errors) == 1, log.read_text()[-2000:]
    assert time.time() - start < 30  # at once, not after a launch or a collective timeout
    expected = {"tasks-per-node": "one task per node", "missing-teacher": "nowhere.safetensors not found",
                "owned-folder": "of job 12345", "config-machines": "is for 2 machines"}[problem]
    assert expected in errors[0]
    assert not (out / "results.json").exists()
