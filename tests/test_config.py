"""Config: defaults, YAML, overrides and validation."""

import pytest

from kdist import KdistError
from kdist.config import Config, load_config, parse_override


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.teacher_model.arch == "teacher" and cfg.student_model.arch == "student"
    assert cfg.kd.method == "dist"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nkd:\n  temperature: 2.5\nteacher:\n  epochs: 7\n")
    cfg = load_config(path, [parse_override("kd.alpha=0.5"), parse_override("teacher.lr=1e-3")])
    assert (cfg.seed, cfg.kd.temperature, cfg.kd.alpha, cfg.teacher.epochs, cfg.teacher.lr) == (3, 2.5, 0.5, 7, 1e-3)
    assert cfg.student.epochs == load_config().student.epochs


@pytest.mark.parametrize(
    "override, message",
    [
        ("kd.temperature=0", "kd.temperature must be > 0"),
        ("kd.alpha=1.5", r"kd.alpha must be in \[0, 1\]"),
        ("teacher.epochs=-1", "teacher.epochs must be >= 1"),
        ("kd.method=magic", "kd.method 'magic' is unknown"),
        ("student_model.arch=resnet9000", "unknown model 'resnet9000'"),
        ("teacher.lrate=1", "unknown key teacher.lrate"),
        ("distill.lr=fast", "distill.lr must be a number"),
        ("teacher.optimizer=lion", "teacher.optimizer must be one of"),
        ("kd.options={gamma: 2}", "not accepted by dist"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(KdistError, match=message):
        load_config(None, [parse_override(override)])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  epoch: 3\n")
    with pytest.raises(KdistError, match="unknown key teacher.epoch"):
        load_config(path)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(KdistError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(KdistError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_default_yaml_lists_the_defaults():
    """configs/default.yaml documents every key; it must agree with the dataclass defaults."""
    from pathlib import Path

    import yaml

    from kdist.config import Config

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert yaml.safe_load(path.read_text()) == Config().to_dict()
    assert load_config(path) == Config()


def test_named_configs_load():
    from pathlib import Path

    from kdist.sweep import point_configs, point_name, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    lite0 = load_config(configs / "lite0.yaml")
    assert lite0.teacher_model.arch == "efficientnet_lite0" and lite0.teacher_model.pretrained == "imagenet"
    # only the teacher differs, and the KD method it was measured with
    assert (
        lite0.student == Config().student
        and lite0.kd.method == "hinton"
        and lite0.kd.temperature == Config().kd.temperature
    )
    base, spec = read_sweep(configs / "sweeps" / "sweep.yaml")
    load_config(None, [base])
    assert spec["grid"]
    # ensemble.yaml is the point its sweep chose, with the student alone given the same epochs.
    ensemble = load_config(configs / "experiments" / "ensemble.yaml")
    base, spec = read_sweep(configs / "sweeps" / "sweep-ensemble.yaml")
    assert ensemble.distill.epochs in spec["grid"]["distill.epochs"] and len(spec["teacher"]) == 4
    chosen = point_configs(base, spec["grid"])[point_name({"distill.epochs": ensemble.distill.epochs})]
    assert (ensemble.distill, ensemble.kd, ensemble.student_model) == (chosen.distill, chosen.kd, chosen.student_model)
    assert ensemble.student.epochs == ensemble.distill.epochs
    # the 64 px sweeps' first grid point is the same recipe on the 64 px file: with the 64 px run's
    # three B0 teachers, and with two pretrained Lite0 teachers (whose grid also tries longer distillation)
    for name, teachers in (("sweep-ensemble64.yaml", 3), ("sweep-ensemble64-lite0.yaml", 2)):
        base, spec = read_sweep(configs / "sweeps" / name)
        chosen64 = next(iter(point_configs(base, spec["grid"]).values()))
        assert chosen64.data.size == 64 and spec["grid"]["distill.epochs"][0] == ensemble.distill.epochs
        assert (chosen64.distill, chosen64.kd, chosen64.student_model, chosen64.student) == (
            ensemble.distill,
            ensemble.kd,
            ensemble.student_model,
            ensemble.student,
        )
        assert len(spec["teacher"]) == teachers
    assert all("size64" in path for path in read_sweep(configs / "sweeps" / "sweep-ensemble64.yaml")[1]["teacher"])


def test_64px_lite0_sweeps_build_on_each_other():
    from pathlib import Path

    from kdist.sweep import point_configs, point_name, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    # the views sweep's `same` point is a point of the Lite0 sweep, config for config, so its runs are reused
    base, spec = read_sweep(configs / "sweeps" / "sweep-ensemble64-lite0.yaml")
    views_base, views_spec = read_sweep(configs / "sweeps" / "sweep-ensemble64-lite0-views.yaml")
    same = point_configs(views_base, views_spec["grid"])[point_name({"kd.teacher_views": "same"})]
    parent = point_configs(base, spec["grid"])[point_name({"distill.epochs": same.distill.epochs})]
    assert same == parent and views_spec["teacher"] == spec["teacher"] and views_spec["seeds"] == spec["seeds"]
    assert views_spec["grid"] == {"kd.teacher_views": ["same", "mean"]}
    # the three-Lite0 sweep is the views sweep's `mean` recipe with one more teacher
    x3_base, x3_spec = read_sweep(configs / "sweeps" / "sweep-ensemble64-lite0x3.yaml")
    (x3,) = point_configs(x3_base, x3_spec["grid"]).values()
    mean = point_configs(views_base, views_spec["grid"])[point_name({"kd.teacher_views": "mean"})]
    assert x3 == mean
    assert (
        x3_spec["teacher"][:2] == views_spec["teacher"]
        and len(x3_spec["teacher"]) == 3
        and x3_spec["seeds"] == views_spec["seeds"]
    )
    # the one-point probes are the views sweep's `mean` recipe with one distillation setting changed, nothing else:
    # a 4 px shift, and the 28 px recipe's learning rate 0.001
    for probe, field, tried in [("shift", "translate", 4), ("lr", "lr", 0.001)]:
        probe_base, probe_spec = read_sweep(configs / "sweeps" / f"sweep-ensemble64-lite0-{probe}.yaml")
        (point,) = point_configs(probe_base, probe_spec["grid"]).values()
        point, compared = point.to_dict(), mean.to_dict()
        assert point["distill"].pop(field) == tried and compared["distill"].pop(field) != tried
        assert point == compared
        assert probe_spec["teacher"] == views_spec["teacher"] and probe_spec["seeds"] == views_spec["seeds"]


def test_28px_lite0_sweep_is_the_64px_recipe_on_the_28px_file():
    from pathlib import Path

    from kdist.sweep import point_configs, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    base, spec = read_sweep(configs / "sweeps" / "sweep-ensemble-lite0.yaml")
    lite0_28 = point_configs(base, spec["grid"])["distill.epochs=120"]
    assert spec["grid"] == {"distill.epochs": [60, 120, 200]}
    views_base, views_spec = read_sweep(configs / "sweeps" / "sweep-ensemble64-lite0-views.yaml")
    mean64 = point_configs(views_base, views_spec["grid"])["kd.teacher_views=mean"]
    assert lite0_28.data.size == 28 and lite0_28.distill.epochs == 120 and lite0_28.kd == mean64.kd
    only_data_and_epochs_differ = lite0_28.to_dict() | {key: mean64.to_dict()[key] for key in ("data", "distill")}
    assert only_data_and_epochs_differ == mean64.to_dict() and lite0_28.distill.lr == mean64.distill.lr
    assert len(spec["teacher"]) == 2 and not any("64" in path for path in spec["teacher"])  # teachers of the 28 px file


def test_64px_teacher_probe_changes_only_the_teachers_of_the_chosen_28px_point():
    from pathlib import Path

    from kdist.sweep import point_configs, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    base, spec = read_sweep(configs / "sweeps" / "sweep-ensemble-lite0-shift.yaml")
    probe_base, probe_spec = read_sweep(configs / "sweeps" / "sweep-ensemble-lite0-teach64.yaml")
    (chosen,), (probe,) = (
        point_configs(base, spec["grid"]).values(),
        point_configs(probe_base, probe_spec["grid"]).values(),
    )
    probe_dict, chosen_dict = probe.to_dict(), chosen.to_dict()
    for config in (probe_dict, chosen_dict):
        config.pop("student")  # a sweep distils only; the student-alone settings play no part
    assert probe_dict == chosen_dict and probe.data.size == 28 and probe_spec["seeds"] == spec["seeds"]
    # the teachers: the 64 px file's pair (the 64 px sweeps' own), where the chosen point has the 28 px pair
    _, spec64 = read_sweep(configs / "sweeps" / "sweep-ensemble64-lite0-lr.yaml")
    assert probe_spec["teacher"] == spec64["teacher"] != spec["teacher"]


def test_ensemble_lite0_is_the_point_its_sweeps_chose():
    from pathlib import Path

    from kdist.sweep import point_configs, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    named = load_config(configs / "ensemble-lite0.yaml")
    # epochs chosen by sweep-ensemble-lite0.yaml, the learning rate by sweep-ensemble-lite0-lr.yaml,
    # then the 2 px shift by sweep-ensemble-lite0-shift.yaml (against the lr sweep's point)
    base, spec = read_sweep(configs / "sweeps" / "sweep-ensemble-lite0-shift.yaml")
    (chosen,) = point_configs(base, spec["grid"]).values()
    assert (named.distill.epochs, named.distill.lr, named.distill.translate) == (200, 0.001, 2)
    assert (named.distill, named.kd, named.student_model, named.data) == (
        chosen.distill,
        chosen.kd,
        chosen.student_model,
        chosen.data,
    )
    # the student alone with its epochs, learning rate and shift chosen on val
    assert (named.student.epochs, named.student.lr, named.student.translate) == (
        200,
        0.001,
        2,
    )  # results/alone200-lr1e-3-shift2


# each probe against the point it was compared with: the lr sweep's choice, or (for the schedule) the 2 px shift point
@pytest.mark.parametrize(
    "probe, against, section, field, tried",
    [
        ("ls", "lr", "kd", "standardize", True),
        ("t", "lr", "kd", "temperature", 2.0),
        ("shift", "lr", "distill", "translate", 2),
        ("shift3", "lr", "distill", "translate", 3),
        ("e300", "shift", "distill", "epochs", 300),
        ("alpha", "shift", "kd", "alpha", 0.5),
        ("hinton", "shift", "kd", "method", "hinton"),
    ],
)
def test_28px_one_point_sweeps_change_one_setting_of_the_point_they_are_compared_with(
    probe, against, section, field, tried
):
    from pathlib import Path

    from kdist.sweep import point_configs, point_name, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    base, spec = read_sweep(configs / "sweeps" / f"sweep-ensemble-lite0-{against}.yaml")
    points = point_configs(base, spec["grid"])
    compared = (points[point_name({"distill.lr": 0.001})] if against == "lr" else next(iter(points.values()))).to_dict()
    probe_base, probe_spec = read_sweep(configs / "sweeps" / f"sweep-ensemble-lite0-{probe}.yaml")
    (point,) = point_configs(probe_base, probe_spec["grid"]).values()
    point = point.to_dict()
    assert probe_spec["teacher"] == spec["teacher"] and probe_spec["seeds"] == spec["seeds"]
    assert point[section].pop(field) == tried and compared[section].pop(field) != tried
    for config in (point, compared):
        config.pop("student")  # a sweep distils only; the student-alone settings play no part
    assert point == compared  # the probed setting is the one difference


@pytest.mark.parametrize(
    "probe, key, reused, tried", [("ema", "distill.ema_decay", None, 0.999), ("lr", "distill.lr", 0.003, 0.001)]
)
def test_28px_probe_sweeps_reuse_the_lite0_sweeps_200_epoch_point(probe, key, reused, tried):
    from pathlib import Path

    from kdist.sweep import point_configs, point_name, read_sweep

    configs = Path(__file__).parent.parent / "configs"
    base, spec = read_sweep(configs / "sweeps" / "sweep-ensemble-lite0.yaml")
    probe_base, probe_spec = read_sweep(configs / "sweeps" / f"sweep-ensemble-lite0-{probe}.yaml")
    points = point_configs(probe_base, probe_spec["grid"])
    assert probe_spec["grid"] == {key: [reused, tried]} and probe_spec["teacher"] == spec["teacher"]
    assert points[point_name({key: reused})] == point_configs(base, spec["grid"])["distill.epochs=200"]
    field = key.split(".")[1]
    with_change, without = points[point_name({key: tried})].to_dict(), points[point_name({key: reused})].to_dict()
    assert with_change["distill"].pop(field) == tried and without["distill"].pop(field) == reused
    assert with_change == without  # the probed setting is the one difference


@pytest.mark.parametrize(
    "chosen_sweep, bf16_sweep",
    [
        ("sweep-ensemble-lite0-shift.yaml", "sweep-ensemble-lite0-bf16.yaml"),
        ("sweep-ensemble64-lite0-lr.yaml", "sweep-ensemble64-lite0-bf16.yaml"),
    ],
)
def test_bf16_sweep_is_the_chosen_point_in_mixed_precision(chosen_sweep, bf16_sweep):
    from pathlib import Path

    from kdist.sweep import point_configs, read_sweep

    configs = Path(__file__).parent.parent / "configs" / "sweeps"
    base, spec = read_sweep(configs / chosen_sweep)
    bf16_base, bf16_spec = read_sweep(configs / bf16_sweep)
    (chosen,) = point_configs(base, spec["grid"]).values()
    (point,) = point_configs(bf16_base, bf16_spec["grid"]).values()
    chosen, point = chosen.to_dict(), point.to_dict()
    assert point["trainer"].pop("mixed_precision") == "bf16" and chosen["trainer"].pop("mixed_precision") is None
    assert point == chosen  # the precision is the one difference
    assert (bf16_spec["teacher"], bf16_spec["seeds"], bf16_spec["grid"]) == (
        spec["teacher"],
        spec["seeds"],
        spec["grid"],
    )


@pytest.mark.parametrize(
    "precision, has_bf16, warned",
    [
        ("bf16", False, True),
        ("bf16", True, False),
        ("no", False, False),
        ("no", True, False),
    ],
)
def test_bf16_on_a_cpu_without_bf16_hardware_is_warned_about(monkeypatch, precision, has_bf16, warned):
    import warnings

    from kdist import processes

    assert isinstance(processes.cpu_has_bf16(), bool)  # the oneDNN probe exists in this torch
    monkeypatch.setattr(processes, "cpu_has_bf16", lambda: has_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        processes.warn_if_bf16_is_emulated(precision)
    assert [("--mixed-precision no" in str(w.message)) for w in caught] == ([True] if warned else [])


def test_consistent_mixup_probe_changes_only_the_planned_keys():
    """Issue 41's stage (a): the chosen 28 px recipe with the online teacher, mixup and 300 epochs, nothing else."""
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    probe, chosen = (
        load_config(configs / "experiments" / "probe-consistent-mixup.yaml").to_dict(),
        load_config(configs / "ensemble-lite0.yaml").to_dict(),
    )
    assert (probe["distill"]["epochs"], probe["distill"]["mixup_alpha"]) == (300, 1.0)
    assert (probe["kd"]["teacher_mode"], probe["kd"]["teacher_views"], probe["kd"]["mixed_ce"]) == (
        "online",
        "same",
        False,
    )
    assert probe["kd"]["compile_teacher"] is True  # speed only: the same teacher logits (tests/test_cache.py)
    for section, keys in (
        ("distill", ("epochs", "mixup_alpha")),
        ("kd", ("teacher_mode", "teacher_views", "compile_teacher")),
    ):
        for key in keys:
            probe[section].pop(key), chosen[section].pop(key)
    assert probe == chosen
    alone = load_config(configs / "experiments" / "probe-consistent-mixup-alone.yaml")
    assert (alone.student.epochs, alone.student.mixup_alpha, alone.student.translate, alone.student.lr) == (
        300,
        1.0,
        2,
        0.001,
    )


def test_shards_none_is_read_as_null_and_validate_changes_nothing():
    """`--shards none` (the npz in memory) becomes null when the config is read; validate() only checks."""
    import copy

    from kdist.config import load_config, parse_override

    cfg = load_config(None, [parse_override("data.shards=none")])
    assert cfg.data.shards is None
    cfg.data.shards = "auto"
    before = copy.deepcopy(cfg)
    assert cfg.validate() == before


def test_tracker_csv_is_refused_naming_none():
    """`csv` did what `none` does (metrics.csv is always written): refused in one line that names none."""
    from kdist import KdistError
    from kdist.config import load_config, parse_override

    with pytest.raises(KdistError, match="csv is gone.*use none"):
        load_config(None, [parse_override("trainer.tracker=csv")])
    assert load_config(None, []).trainer.tracker == "none"
