"""The kdist command end to end: help, bad arguments, and full quick runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdist.cli import main
from kdist.processes import cpu_has_bf16


def kdist(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kdist.cli", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.processes
def test_help_lists_commands():
    result = kdist("--help")
    assert result.returncode == 0
    for command in ("run", "train", "distill", "sweep", "evaluate", "predict", "export", "serve", "bench", "report"):
        assert command in result.stdout


@pytest.mark.processes
@pytest.mark.parametrize("module", ["kdist.train", "kdist.distill", "kdist.evaluate"])
def test_launcher_modules_take_the_same_options(module):
    """`python -m kdist.distill --help` (what `accelerate launch -m kdist.distill` runs) shows the subcommand's
    options."""
    as_module = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    as_subcommand = kdist(module.split(".")[1], "--help")
    assert as_module.returncode == 0 and as_subcommand.returncode == 0
    options = lambda text: sorted(set(re.findall(r"--[a-z][a-z-]+", text)))  # noqa: E731
    assert options(as_module.stdout) == options(as_subcommand.stdout) and "--help" in as_module.stdout


@pytest.mark.processes
@pytest.mark.parametrize(
    "args",
    [["fly"], ["train", "professor"], ["run", "--seed", "x"], ["distill"]],
    ids=["unknown-command", "unknown-role", "bad-seed", "missing-teacher"],
)
def test_bad_arguments_exit_2(args):
    assert kdist(*args).returncode == 2


def test_missing_data_is_one_line_exit_2(tmp_path, capsys):
    code = main(["run", "--quick", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "dermamnist.npz not found" in err and "--data-root" in err


def test_bad_config_value_exit_2(tmp_path, synthetic_root, capsys):
    args = ["run", "--data-root", str(synthetic_root), "--out", str(tmp_path / "r"), "--set", "kd.temperature=-1"]
    assert main(args) == 2
    assert "kd.temperature must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a rejected config


def check_run_folder(out):
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "dermamnist" and results["size"] == 28 and results["seed"] == 0
    assert list(results["models"]) == ["teacher", "student", "distilled"]
    for name, entry in results["models"].items():
        assert entry["arch"] == ("efficientnet_b0" if name == "teacher" else "squeezenet1_1")
        for split in ("val", "test"):
            for key in ("loss", "acc", "auc", "balanced_acc", "macro_f1"):
                assert entry[split][key] is not None
        assert (out / name / "metrics.csv").read_text().startswith("epoch,")
        assert (out / f"{name}.safetensors").exists()
    assert results["models"]["distilled"]["test"]["n"] == 2005
    report = (out / "report.md").read_text()
    assert "| Model | Arch | Params | Loss | Accuracy | AUC" in report and "Majority class" in report
    assert (out / "report.html").exists() and (out / "MODEL_CARD.md").exists()
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 0 and "torch" in info["packages"]
    assert (out / "config.yaml").exists()
    return results


@pytest.mark.study
def test_quick_run_on_synthetic_data(tmp_path, synthetic_root):
    out = tmp_path / "run"
    assert main(["run", "--quick", "--data-root", str(synthetic_root), "--out", str(out), "--no-progress"]) == 0
    check_run_folder(out)
    # by default the data comes from the file's shards, written once into the cache the run names
    shards = Path(json.loads((out / "run_info.json").read_text())["data"])
    assert (shards / "manifest.json").exists() and shards.parent.name == "shard-cache"

    # Each stage also runs alone from saved weights.
    again = tmp_path / "distill-only"
    code = main(
        [
            "distill",
            "--teacher",
            str(out / "teacher.safetensors"),
            "--quick",
            "--data-root",
            str(synthetic_root),
            "--out",
            str(again),
            "--no-progress",
            "--teacher-mode",
            "online",
        ]
    )
    assert code == 0
    first = json.loads((out / "results.json").read_text())["models"]["distilled"]["test"]
    second = json.loads((again / "results.json").read_text())["models"]["distilled"]["test"]
    # Same seed and teacher; the online teacher gives the cached logits up to float rounding, which
    # two epochs of training amplify by a CPU-dependent amount (5e-4 relative seen on one machine),
    # so this end-to-end check is loose; test_cache checks the per-step logits and loss tightly.
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-2)
    assert list((out / "cache").glob("teacher_logits-*.safetensors")) and not (again / "cache").exists()
    # `distill` also evaluates its teacher, so the run folder compares the two: the same numbers as `run`.
    teacher_again = json.loads((again / "results.json").read_text())["models"]["teacher"]
    assert (
        teacher_again["test"]["acc"]
        == json.loads((out / "results.json").read_text())["models"]["teacher"]["test"]["acc"]
    )

    # Two teacher files: their ensemble (mean logits) is distilled; the weights record it.
    ensemble = tmp_path / "ensemble"
    code = main(
        [
            "distill",
            "--teacher",
            str(out / "teacher.safetensors"),
            "--teacher",
            str(out / "student.safetensors"),
            "--quick",
            "--data-root",
            str(synthetic_root),
            "--out",
            str(ensemble),
            "--no-progress",
        ]
    )
    assert code == 0
    from kdist.models import read_metadata

    assert read_metadata(ensemble / "distilled.safetensors")["teacher"] == "ensemble(efficientnet_b0, squeezenet1_1)"
    recorded = json.loads((ensemble / "results.json").read_text())["models"]
    assert list(recorded) == ["teacher", "distilled"] and recorded["teacher"]["arch"].startswith("ensemble(")

    result = kdist("evaluate", out / "student.safetensors", "--data-root", synthetic_root, "--split", "test")
    assert result.returncode == 0, result.stderr
    student = json.loads((out / "results.json").read_text())["models"]["student"]["test"]
    assert json.loads(result.stdout)["test"]["acc"] == pytest.approx(student["acc"])
    # --views mean: the same weights scored on the mean logits of the 8 flips/rotations.
    result = kdist(
        "evaluate", out / "student.safetensors", "--data-root", synthetic_root, "--split", "val", "--views", "mean"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    from kdist.datasets import load_medmnist
    from kdist.inference import predict_probs
    from kdist.metrics import classification_metrics
    from kdist.models import load_model

    images, labels = load_medmnist(synthetic_root, "dermamnist", 28)["val"]
    expected = classification_metrics(
        predict_probs(load_model(out / "student.safetensors"), images, views="mean"), labels.numpy()
    )
    assert record["views"] == "mean" and "test" not in record
    assert record["val"]["loss"] == pytest.approx(expected["loss"]) and record["val"]["acc"] == pytest.approx(
        expected["acc"]
    )
    # Several files: their ensemble, the same numbers `distill` recorded for it.
    result = kdist("evaluate", out / "teacher.safetensors", out / "student.safetensors", "--data-root", synthetic_root)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test"]["acc"] == pytest.approx(recorded["teacher"]["test"]["acc"])


@pytest.mark.study
def test_quick_run_on_real_data(tmp_path, real_root):
    out = tmp_path / "run"
    assert main(["run", "--quick", "--data-root", str(real_root), "--out", str(out), "--no-progress"]) == 0
    results = check_run_folder(out)
    assert results["baselines"]["majority"]["test"]["acc"] == pytest.approx(0.6688, abs=1e-4)


@pytest.mark.parametrize("kind", ["three-classes", "garbage", "other-architecture"])
def test_unusable_teacher_is_refused(tmp_path, synthetic_root, capsys, kind):
    from kdist.datasets import DatasetSpec
    from kdist.models import DermClassifier, save_weights

    path = tmp_path / "teacher.safetensors"
    if kind == "three-classes":
        three = DatasetSpec("abc", ("a", "b", "c"))
        save_weights(DermClassifier("efficientnet_b0", [0.5] * 3, [0.2] * 3, dataset=three), path)
    elif kind == "other-architecture":
        save_weights(DermClassifier("squeezenet1_1", [0.5] * 3, [0.2] * 3), path)
    else:
        path.write_bytes(b"\x00" * 64)
    args = [
        "distill",
        "--teacher",
        str(path),
        "--quick",
        "--data-root",
        str(synthetic_root),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "teacher.safetensors" in err and err.count("\n") == 1
    if kind == "three-classes":
        assert "predicts the 3 classes of abc (a, b, c), the data has the 7 of dermamnist" in err
    if kind == "other-architecture":
        assert "holds a squeezenet1_1, expected efficientnet_b0" in err


@pytest.mark.study
def test_bench_prints_figures_and_writes_json(tmp_path, synthetic_root, capsys):
    args = [
        "bench",
        "--quick",
        "--steps",
        "2",
        "--data-root",
        str(synthetic_root),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "distill, cached" in printed and "ratio" in printed
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["throughput"]["data_path_img_s"] > 0 and bench["epochs"]["distill_cached_over_student"] > 0
    assert (
        bench["throughput"]["shard_path_img_s"] > 0
        and bench["throughput"]["shard_data_only_img_s"] > 0
        and re.search(r"shards, \d+ workers", printed)
    )
    assert (
        bench["epochs"]["distill_cached_bf16_over_32"] > 0 and bench["epochs"]["student_epoch_shards_over_memory"] > 0
    )
    assert bench["models"]["student"]["flops_per_image"] > 0 and bench["train_images"] == 1024
    assert bench["models"]["teacher"]["onnx_latency_ms_batch256"] > 0
    step = bench["online_step"]  # the online step's breakdown from the torch profiler
    assert step["step_ms"] > 0 and step["parts_ms"]["teacher_forward"] > 0 and step["parts_ms"]["backward"] > 0
    assert "teacher_forward" in printed and (tmp_path / "online_profile.txt").exists()
    assert ("distill_online_bf16_teacher_epoch_s" in bench["epochs"]) == cpu_has_bf16()
    processes = bench["processes"]  # one cached distillation epoch under accelerate launch, 1 and 2 processes
    assert (
        processes["processes1_img_s"] > 0 and processes["processes2_img_s"] > 0 and processes["processes2_over_1"] > 0
    )
    assert "2 processes" in printed


@pytest.mark.study
def test_diverging_run_stops_with_epoch_and_step(tmp_path, synthetic_root, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "student",
        "--quick",
        "--data-root",
        str(synthetic_root),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "student.lr=1e12",
        "--set",
        "student.epochs=3",
        "--set",
        "student.schedule=none",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"non-finite loss by epoch \d+, step \d+", err) and err.count("\n") == 1
    assert not (out / "student.safetensors").exists() and not (out / "results.json").exists()


@pytest.mark.study
def test_val_only_training_run_never_touches_test(tmp_path, synthetic_root, capsys):
    """A tuning run (--val-only) records val alone; the chosen model is tested later, once, by evaluate."""
    out = tmp_path / "tune"
    args = [
        "train",
        "student",
        "--quick",
        "--val-only",
        "--data-root",
        str(synthetic_root),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "student    val acc" in capsys.readouterr().out
    entry = json.loads((out / "results.json").read_text())["models"]["student"]
    assert "val" in entry and "test" not in entry
    assert set(np.load(out / "predictions" / "student.npz")) == {"val_probs", "val_labels"}
    assert main(["report", str(out)]) == 2 and "val-only" in capsys.readouterr().err  # no test table to draw
    assert (
        main(["evaluate", str(out / "student.safetensors"), "--split", "test", "--data-root", str(synthetic_root)]) == 0
    )
    assert set(json.loads(capsys.readouterr().out)) == {"weights", "arch", "views", "test", "num_processes"}


@pytest.mark.study
def test_a_failed_start_leaves_no_new_folder_and_an_old_one_unchanged(tmp_path, synthetic_root, capsys):
    """Inputs are checked before the run folder is touched: a missing teacher, a bad config."""
    missing = [
        "distill",
        "--teacher",
        str(tmp_path / "nowhere.safetensors"),
        "--quick",
        "--data-root",
        str(synthetic_root),
    ]
    assert main([*missing, "--out", str(tmp_path / "new")]) == 2
    assert "nowhere.safetensors not found" in capsys.readouterr().err and not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    assert main([*missing, "--out", str(old)]) == 2
    assert (
        main(
            [
                "train",
                "student",
                "--quick",
                "--data-root",
                str(synthetic_root),
                "--set",
                "student.lr=-1",
                "--out",
                str(old),
            ]
        )
        == 2
    )
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


@pytest.mark.study
def test_resume_auto_starts_a_run_then_continues_only_the_same_run(tmp_path, synthetic_root, capsys):
    args = [
        "train",
        "student",
        "--quick",
        "--no-progress",
        "--data-root",
        str(synthetic_root),
        "--set",
        "student.epochs=1",
        "--out",
        str(tmp_path / "R"),
        "--resume",
        "auto",
    ]
    assert main(args) == 0 and (tmp_path / "R" / "student.safetensors").exists()
    assert main(args) == 0  # the same options again: the finished stage is kept (a requeued job's second start)
    assert main([*args, "--seed", "7"]) == 2
    assert "holds a run with another config" in capsys.readouterr().err


def test_bench_honours_cpu_and_refuses_a_precision_it_would_ignore(monkeypatch, capsys):
    """`kdist bench --cpu` runs every figure on the CPU (asked of each Accelerator it makes); bench times both
    precisions itself, so --mixed-precision is refused rather than dropped."""
    import kdist.bench as bench
    from kdist.config import QUICK, load_config

    asked = []

    def refuse_after_asking(trainer):
        asked.append(trainer.cpu)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "make_accelerator", refuse_after_asking)
    with pytest.raises(RuntimeError, match="stop here"):
        bench.run_bench(load_config(None, [QUICK, {"trainer": {"cpu": True}}]), Path("unused"))
    assert asked == [True]
    assert main(["bench", "--mixed-precision", "bf16"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_data_download_false_is_honoured_on_the_default_shards_path(tmp_path, capsys):
    """data.download: false on `--shards auto` (the default): a missing data file is named, never downloaded."""
    args = ["train", "student", "--quick", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main([*args, "--set", "data.download=false"]) == 2
    err = capsys.readouterr().err
    assert "dermamnist.npz not found; put dermamnist.npz there" in err and "downloads disabled" not in err
    assert not (tmp_path / "run").exists()
