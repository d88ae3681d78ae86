"""kdist sweep: grid on val, the chosen point tested once."""

import json
import re

import pytest

from kdist.cli import main

pytestmark = pytest.mark.study


def test_sweep_on_synthetic_data(tmp_path, synthetic_root, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "data: {train_subset: 256, val_subset: 128}\n"
        "teacher_model: {arch: resnet18}\n"
        "teacher: {epochs: 1}\ndistill: {epochs: 1}\n"
        "sweep:\n  seeds: [0, 1]\n  grid:\n    kd.method: [hinton, dist]\n    distill.class_weights: [inverse_sqrt]\n"
    )
    out = tmp_path / "sweep"
    # --val-only: the grid's val table, nothing tested
    assert (
        main(
            ["sweep", str(config), "--data-root", str(synthetic_root), "--out", str(out), "--no-progress", "--val-only"]
        )
        == 0
    )
    record = json.loads((out / "sweep.json").read_text())
    assert record["chosen_test"] is None and "Test: not evaluated" in (out / "sweep.md").read_text()
    val_only_table = record["val"]
    weights = sorted(out.glob("*/seed*/distilled.safetensors"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    # the rerun without it reuses every run (the same val figures) and tests the chosen point,
    # with or without a progress bar (the first run had none)
    assert main(["sweep", str(config), "--data-root", str(synthetic_root), "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["val"] == val_only_table and [w.stat().st_mtime_ns for w in weights] == stamps
    assert set(record["val"]) == {
        "kd.method=hinton,distill.class_weights=inverse_sqrt",
        "kd.method=dist,distill.class_weights=inverse_sqrt",
    }
    assert record["chosen"] == max(record["val"], key=lambda k: record["val"][k]["acc"]["mean"])
    assert len(record["chosen_test"]["acc"]["values"]) == 2
    # grid points only ever saw val: no test metrics in their results
    for point in record["val"]:
        results = json.loads((out / point / "seed0" / "results.json").read_text())
        assert "test" not in results["models"]["distilled"]
    table = (out / "sweep.md").read_text()
    assert "(chosen)" in table and re.search(r"\| \d\.\d{4} ± \d\.\d{4} \|", table)  # AUC with 4 decimals
    # one logit cache per train set, shared by the grid points (here each seed draws its own subset)
    assert len(list((out / "cache").glob("teacher_logits-*.safetensors"))) == 2
    assert not list(out.glob("*/seed*/cache"))
    # a rerun (here with the teacher it trained) reuses a point's runs only when their config is the point's
    saved = out / "kd.method=hinton,distill.class_weights=inverse_sqrt" / "seed0" / "config.yaml"
    saved.write_text(saved.read_text().replace("temperature: 4.0", "temperature: 2.0"))
    config.write_text(
        config.read_text().replace("sweep:\n", f"sweep:\n  teacher: {out / 'teacher' / 'teacher.safetensors'}\n")
    )
    capsys.readouterr()
    assert main(["sweep", str(config), "--data-root", str(synthetic_root), "--out", str(out), "--no-progress"]) != 0
    assert "holds a run of another config (kd differ)" in capsys.readouterr().err


def test_sweep_needs_a_grid(tmp_path, capsys):
    config = tmp_path / "s.yaml"
    config.write_text("seed: 1\n")
    assert main(["sweep", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "sweep:" in capsys.readouterr().err


def test_sweep_seeds_run_apart_then_gather(tmp_path, synthetic_root, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "data: {train_subset: 128, val_subset: 64}\n"
        "teacher_model: {arch: resnet18}\n"
        "teacher: {epochs: 1}\ndistill: {epochs: 1}\n"
        "sweep:\n  seeds: [0, 1]\n  grid:\n    kd.method: [dist]\n"
    )
    out, common = (
        tmp_path / "sweep",
        ["--data-root", str(synthetic_root), "--out", str(tmp_path / "sweep"), "--no-progress"],
    )
    assert main(["sweep", str(config), "--seeds", "5", *common]) == 2
    assert "the sweep's seeds are [0, 1]" in capsys.readouterr().err
    # one seed only: its run, no table (a table over part of the seeds would mislead)
    assert main(["sweep", str(config), "--seeds", "1", *common]) == 0
    assert (out / "kd.method=dist" / "seed1" / "distilled.safetensors").exists()
    assert not (out / "kd.method=dist" / "seed0").exists() and not (out / "sweep.json").exists()
    stamp = (out / "kd.method=dist" / "seed1" / "distilled.safetensors").stat().st_mtime_ns
    # the gathering run trains the missing seed, reuses seed 1 and writes the table over both
    assert main(["sweep", str(config), "--val-only", *common]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["val"]["kd.method=dist"]["acc"]["values"]) == 2
    assert (out / "kd.method=dist" / "seed1" / "distilled.safetensors").stat().st_mtime_ns == stamp
