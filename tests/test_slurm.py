"""slurm/*.sh against a real one-node Slurm (tests/slurm_cluster.py): a 2-process job, a preempted job that
saves, requeues and resumes to the uninterrupted result, the study chain, two "nodes" as two tasks, and bad
settings that fail at once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import Cluster, ensure_installed

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "--quick",
    "--no-progress",
    "--set",
    "distill.epochs=3",
    "--set",
    "data.train_subset=512",
    "--set",
    "data.val_subset=128",
]
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


def job_env(slurm, real_root, out, **extra):
    env = {
        **slurm.env,
        "KDIST_DATA_ROOT": str(real_root),
        "KDIST_OUT": str(out),
        "KDIST_LAUNCH_CONFIG": "launch/cpu.yaml",
        "KDIST_PROCS_PER_NODE": "2",
        "ACCELERATE_USE_CPU": "true",
        "KDIST_VENV": sys.prefix,
    }
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
    done = slurm.run(
        "sbatch",
        "--wait",
        f"--output={log}",
        *NO_GPUS,
        "slurm/distill.sh",
        "--teacher",
        teacher,
        *QUICK,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, log.read_text()[-3000:]
    return out, log


def test_sbatch_distill_with_two_processes(uninterrupted):
    out, log = uninterrupted
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "distilled"] and results["models"]["distilled"]["test"]["n"] == 2005
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert "1 node(s) x 2 process(es)" in log.read_text()


def test_preempted_job_saves_requeues_and_resumes_to_the_same_result(
    slurm, real_root, teacher, uninterrupted, tmp_path
):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(slurm, job_env(slurm, real_root, out), log, "slurm/distill.sh", "--teacher", teacher, *QUICK)
    first_checkpoint = out / "distilled" / "checkpoints" / "last" / "progress.json"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert first_checkpoint.exists(), log.read_text()[-3000:] if log.exists() else "no log"
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T does before the time limit
    # The script saves, requeues; the job waits for its begin time: start it again at once.
    assert slurm.wait_for(job, states=("PENDING", "COMPLETED", "FAILED"), timeout=300) == "PENDING", log.read_text()[
        -3000:
    ]
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


def wait_for_file(path: Path, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.2)
    return path.exists()


def test_study_chain_signals_one_stage_alone_and_logs_one_wandb_group(slurm, real_root, tmp_path):
    """slurm/study.sh: the student and the distilled jobs run side by side in one folder; a time-limit signal
    to the student saves and requeues it alone (the distilled job never stops); the report follows; every
    job's W&B run (offline here) is in the study's group."""
    sys.path.insert(0, str(REPO / "tests"))
    from wandb_records import read_run

    out = tmp_path / "study"
    env = job_env(
        slurm,
        real_root,
        out,
        KDIST_PROCS_PER_NODE=1,
        WANDB_MODE="offline",
        KDIST_SBATCH=f"--gres=none --cpus-per-task=1 --output={tmp_path}/%x-%j.out",
    )
    done = slurm.run(
        "bash",
        "slurm/study.sh",
        "--quick",
        "--no-progress",
        "--tracker",
        "wandb",
        "--set",
        "student.epochs=4",
        "--set",
        "distill.epochs=4",
        check=False,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    jobs = dict(part.strip().rsplit(" ", 1) for part in done.stdout.split(": ", 1)[1].split(","))
    assert f"W&B group {out.name}" in done.stdout
    assert wait_for_file(out / "student" / "checkpoints" / "last" / "progress.json"), "\n".join(
        p.read_text()[-1500:] for p in tmp_path.glob("*.out")
    )
    assert slurm.job_state(jobs["distilled"]) == "RUNNING"
    slurm.run("scancel", "--signal=USR1", "--batch", jobs["student"])
    assert slurm.wait_for(jobs["student"], states=("PENDING", "COMPLETED", "FAILED"), timeout=300) == "PENDING"
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={jobs['student']}", "StartTime=now")
    state = slurm.wait_for(jobs["report"], timeout=600)
    logs = {path.name: path.read_text() for path in sorted(tmp_path.glob("*.out"))}
    assert state == "COMPLETED", "\n".join(text[-1500:] for text in logs.values())
    student_log = next(text for name, text in logs.items() if name.startswith("kdist-student"))
    distill_log = next(text for name, text in logs.items() if name.startswith("kdist-distill"))
    assert "requeueing job" in student_log and "stopped on request" in student_log
    assert "stopped on request" not in distill_log and "USR1" not in distill_log
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "student", "distilled"]
    assert (out / "report.md").exists() and (out / "report.html").exists()
    runs = [read_run(folder) for folder in (out / "wandb").glob("offline-run-*")]
    assert {run["run"][0] for run in runs} == {"teacher", "student", "distilled"}
    assert {run["run"][1] for run in runs} == {out.name}


def test_slurm_requeue_of_a_running_job_resumes_to_the_same_result(slurm, real_root, teacher, uninterrupted, tmp_path):
    """Slurm's own preemption path: `scontrol requeue` sends TERM to every process, kills, and requeues the job;
    kdist saves mid-epoch on TERM and the requeued job resumes to the uninterrupted result. `--teacher=PATH`."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(slurm, job_env(slurm, real_root, out), log, "slurm/distill.sh", f"--teacher={teacher}", *QUICK)
    assert wait_for_file(out / "distilled" / "checkpoints" / "last" / "progress.json"), (
        log.read_text()[-3000:] if log.exists() else "no log"
    )
    slurm.run("scontrol", "requeue", job)
    assert slurm.wait_for(job, states=("PENDING", "COMPLETED", "FAILED"), timeout=300) == "PENDING", log.read_text()[
        -3000:
    ]
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert slurm.wait_for(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "TERM: saving and stopping" in text and "resuming" in text and "requeueing job" not in text
    whole = json.loads((uninterrupted[0] / "results.json").read_text())
    assert strip_times(json.loads((out / "results.json").read_text())) == strip_times(whole)
    assert (out / "distilled.safetensors").read_bytes() == (uninterrupted[0] / "distilled.safetensors").read_bytes()


def test_a_plain_scancel_leaves_the_job_cancelled(slurm, real_root, teacher, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(slurm, job_env(slurm, real_root, out), log, "slurm/distill.sh", "--teacher", teacher, *QUICK)
    assert wait_for_file(out / "distilled" / "checkpoints" / "last" / "progress.json"), (
        log.read_text()[-3000:] if log.exists() else "no log"
    )
    slurm.run("scancel", job)
    assert slurm.wait_for(job, timeout=120) == "CANCELLED"
    time.sleep(3)
    assert slurm.job_state(job) == "CANCELLED"  # not requeued behind the user's back
    assert "requeueing job" not in log.read_text()


def test_two_tasks_emulating_two_nodes_train_together(slurm, real_root, teacher, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    env = job_env(slurm, real_root, out, KDIST_PROCS_PER_NODE=1, KDIST_TASKS_PER_NODE_OK=1)
    done = slurm.run(
        "sbatch",
        "--wait",
        f"--output={log}",
        "--gres=none",
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "slurm/distill.sh",
        "--teacher",
        teacher,
        *QUICK,
        "--set",
        "distill.epochs=1",
        check=False,
        cwd=REPO,
        env=env,
    )
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
    done = slurm.run(
        "sbatch",
        "--wait",
        f"--output={log}",
        *NO_GPUS,
        *args,
        "slurm/distill.sh",
        "--teacher",
        teacher_path,
        *QUICK,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert log.exists(), done.stderr
    errors = [
        line for line in log.read_text().splitlines() if line.startswith(("kdist-slurm: error:", "kdist: error:"))
    ]
    assert done.returncode != 0 and len(errors) == 1, log.read_text()[-2000:]
    # at once: the script's own checks before any launch; kdist's (the teacher) right after its start, never
    # after training or a collective timeout (600 s)
    assert time.time() - start < (120 if problem == "missing-teacher" else 30)
    expected = {
        "tasks-per-node": "one task per node",
        "missing-teacher": "nowhere.safetensors not found",  # kdist's own check, before the run folder
        "owned-folder": "of job 12345",
        "config-machines": "is for 2 machines",
    }[problem]
    assert expected in errors[0]
    assert not (out / "results.json").exists() and not (out / "config.yaml").exists()
