"""Tracking through Accelerate's trackers: offline W&B runs read back from their .wandb files, the offline
fallback without an API key, only the main process logging under 2 processes, and the W&B report's blocks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import kdist_env, launch
from wandb_records import read_run

pytestmark = pytest.mark.study

REPO = Path(__file__).resolve().parents[1]


def kdist(*args, env):
    return subprocess.run([sys.executable, "-m", "kdist.cli", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, real_root):
    """`kdist run --quick --tracker wandb` with no API key and WANDB_MODE unset: it must go offline by itself."""
    folder = tmp_path_factory.mktemp("wandb")
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(
        KDIST_DATA_ROOT=str(real_root), HOME=str(folder), WANDB_CONFIG_DIR=str(folder / "config")
    )  # no ~/.netrc key
    done = kdist(
        "run",
        "--quick",
        "--no-progress",
        "--tracker",
        "wandb",
        "--set",
        "data.train_subset=512",
        "--set",
        "data.val_subset=128",
        "--out",
        folder / "R",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "R", done.stderr


def test_no_api_key_falls_back_offline_with_one_line(wandb_run):
    out, stderr = wandb_run
    notes = [line for line in stderr.splitlines() if line.startswith("kdist: no W&B API key")]
    assert len(notes) == 3 or len(notes) == 1  # said when each stage starts W&B, or once
    assert "wandb sync" in notes[0]


def test_offline_runs_hold_the_results_and_curves(wandb_run):
    out, _ = wandb_run
    results = json.loads((out / "results.json").read_text())
    runs = {}
    for folder in (out / "wandb").glob("offline-run-*"):
        run = read_run(folder)
        runs[run["run"][0]] = run
    assert sorted(runs) == ["distilled", "student", "teacher"]
    for name, run in runs.items():
        job_type, group, _, run_id = run["run"]
        assert group == "R" and run_id == (out / name / "wandb_run_id").read_text().strip()
        assert run["config"]["stage"] == name and run["config"]["kd"]["method"] == "dist"
        for key in ("acc", "auc", "balanced_acc", "macro_f1"):
            assert run["summary"][f"test/{key}"] == results["models"][name]["test"][key]
        with open(out / name / "metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        epochs = [entry for entry in run["history"] if "val/acc" in entry]
        assert [entry["val/acc"] for entry in epochs] == [float(row["val/acc"]) for row in rows]
        assert [entry["_step"] for entry in epochs] == [0, 1]
        logged = {key for entry in run["history"] for key in entry}
        assert {"lr", "train/loss", "val/loss"} <= logged
        for media in (
            "qualitative/test_samples",
            "qualitative/test_grid",
            "test/confusion_matrix_table",
        ):  # logged as nested records
            assert any(key.startswith(media) for key in logged), (media, sorted(logged))
    distilled = {key for entry in runs["distilled"]["history"] for key in entry}
    assert {"train/kd", "train/ce", "val/teacher_agreement", "val/teacher_kl"} <= distilled
    table = next((out / "wandb").glob("offline-run-*/files/media/table/qualitative/test_samples_*.table.json"))
    assert len(json.loads(table.read_text())["data"]) == 25


def test_only_the_main_process_logs_under_two_processes(tmp_path, real_root, teacher):
    out = tmp_path / "ddp"
    command = launch(
        "-m",
        "kdist.distill",
        "--teacher",
        teacher,
        "--quick",
        "--no-progress",
        "--tracker",
        "jsonl",
        "--set",
        "data.train_subset=512",
        "--set",
        "data.val_subset=256",
        "--out",
        out,
    )
    done = subprocess.run(command, env=kdist_env(real_root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "distilled" / "tracker.jsonl").read_text().splitlines()]
    assert {line["process_index"] for line in lines} == {0}
    assert [line["step"] for line in lines if "values" in line] == [0, 1]  # one entry per epoch, not one per process
    assert (
        lines[-1]["summary"]["test/acc"]
        == json.loads((out / "results.json").read_text())["models"]["distilled"]["test"]["acc"]
    )


def test_wandb_report_compares_the_three_models_without_saving():
    import wandb_workspaces.reports.v2 as wr

    from kdist.wandb_report import build_report

    report = build_report("lab", "kdist", "default3")
    assert report.entity == "lab" and report.project == "kdist" and "default3" in report.title
    grids = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    curves = [panel for panel in grids[0].panels if isinstance(panel, wr.LinePlot)]
    assert {tuple(panel.y) for panel in curves} >= {("val/acc",), ("val/loss",)} and curves[0].groupby == "JobType"
    assert all(runset.filters.startswith("Group = 'default3'") for grid in grids for runset in grid.runsets)
    per_model = grids[2:]
    assert [grid.runsets[0].name for grid in per_model] == ["teacher", "student", "distilled"]
    for grid in per_model:
        tables = [panel.table_name for panel in grid.panels if isinstance(panel, wr.WeavePanelSummaryTable)]
        assert tables == ["test/confusion_matrix_table", "qualitative/test_samples"]


def test_wandb_report_without_a_key_is_one_line_exit_2(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)
    done = kdist("wandb-report", "--entity", "lab", "--group", "default3", env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "report.html" in done.stderr


def write_netrc_for_wandbs_host(home: Path) -> None:
    """What `wandb login KEY` writes: a netrc entry for the host wandb talks to by default (not api.wandb.ai)."""
    import wandb

    host = wandb.Settings().base_url.split("//")[-1]
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {'0' * 40}\n")
    (home / ".netrc").chmod(0o600)


def test_a_key_in_netrc_for_wandbs_default_host_is_seen(tmp_path, monkeypatch):
    from kdist.tracking import has_wandb_key

    for key in [key for key in os.environ if key.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not has_wandb_key()
    write_netrc_for_wandbs_host(tmp_path)
    assert has_wandb_key()


def test_a_key_without_a_reachable_server_goes_offline_once_and_completes(tmp_path, real_root):
    """A real login (netrc for wandb's host) on a node without network: one bounded try for the study, one line,
    then offline; the study completes and keeps its 3 runs for `wandb sync`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    write_netrc_for_wandbs_host(tmp_path)
    env.update(
        KDIST_DATA_ROOT=str(real_root),
        HOME=str(tmp_path),
        NETRC=str(tmp_path / ".netrc"),
        WANDB_INIT_TIMEOUT="2",
        WANDB_CONFIG_DIR=str(tmp_path / "config"),
    )
    done = kdist(
        "run",
        "--quick",
        "--no-progress",
        "--tracker",
        "wandb",
        "--set",
        "data.train_subset=256",
        "--set",
        "data.val_subset=128",
        "--set",
        "teacher.epochs=1",
        "--set",
        "student.epochs=1",
        "--set",
        "distill.epochs=1",
        "--out",
        tmp_path / "R",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no W&B API key" not in done.stderr
    assert done.stderr.count("kdist: W&B could not start online") == 1, done.stderr[-3000:]
    assert len(list((tmp_path / "R" / "wandb").glob("offline-run-*"))) == 3


def test_wandb_report_names_the_real_cause():
    from kdist.wandb_report import explain_failure

    assert "could not reach the W&B server" in explain_failure(
        ConnectionError("dial tcp: no such host"), "lab", "kdist"
    )
    assert "refused entity 'lab' / project 'kdist'" in explain_failure(ValueError("project not found"), "lab", "kdist")
