"""`kdist sweep CONFIG`: an ablation grid of distillation settings, chosen on val, tested once.

The config file is a normal kdist config plus a `sweep:` section:

    sweep:
      teacher: runs/full/teacher.safetensors   # optional (a list: an ensemble); otherwise one is trained (val-only)
      seeds: [0, 1, 2]
      grid:
        kd.method: [hinton, dkd, dist]
        kd.temperature: [2, 4]
        student_model.input_size: [null, 64]

Every grid point is distilled once per seed and evaluated on **val only**; the table shows mean ±
std over seeds. The point with the best mean val accuracy is then evaluated on test, once per
seed (`--val-only` leaves that out: a rerun without it reuses the runs and tests the chosen point).
Nothing else ever sees the test split. `--seeds 1` runs one seed's runs only and writes no table, so
the seeds can train side by side in separate processes; a rerun without it gathers them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import yaml

from . import KdistError
from .config import config_from_dict, load_config, merge, parse_override
from .files import atomic_write_text
from .inference import predict_probs
from .metrics import classification_metrics, mean_std_text, sample_std
from .models import load_model, load_teacher


def read_sweep(path: Path) -> tuple[dict, dict]:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise KdistError(f"sweep config {path} not found") from None
    except yaml.YAMLError as exc:
        raise KdistError(f"sweep config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    spec = raw.pop("sweep", None) if isinstance(raw, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise KdistError(f"{path} needs a `sweep:` section with a non-empty `grid:` of key: [values]")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise KdistError(f"sweep grid {key} must be a non-empty list of values")
    return raw, spec


def point_name(point: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in point.items()).replace("/", "_")


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": sample_std(values), "values": values}


def point_configs(base: dict, grid: dict, extra_overrides: list[dict] = ()) -> dict:
    """{point name: validated Config} for every combination of the grid, in grid order."""
    configs = {}
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        overrides = [parse_override(f"{key}={json.dumps(value)}") for key, value in point.items()]
        configs[point_name(point)] = load_config(None, [base, *extra_overrides, *overrides])
    return configs


def _check_reusable(cfg, folder: Path) -> None:
    """A rerun reuses (or resumes) a point's folder only if that folder holds a run of the same config."""
    if (folder / "config.yaml").exists():
        saved, wanted = load_config(folder / "config.yaml").to_dict(), cfg.to_dict()
        for config in (saved, wanted):
            config["trainer"].pop("progress")  # a progress bar changes no result
        differing = [key for key in wanted if saved[key] != wanted[key]]
        if differing:
            raise KdistError(
                f"{folder} holds a run of another config ({', '.join(differing)} differ); delete that folder or "
                "choose another --out"
            )


def run_sweep(
    config_path: Path,
    out: Path,
    extra_overrides: list[dict],
    val_only: bool = False,
    only_seeds: list[int] | None = None,
) -> dict | None:
    """The sweep's record (also written to out/sweep.json and sweep.md); None when `only_seeds` ran a part."""
    from .pipeline import Study, distill_stage, teacher_stage
    from .processes import make_accelerator

    base, spec = read_sweep(config_path)
    seeds = spec.get("seeds", [0])
    if only_seeds is not None and not set(only_seeds) <= set(seeds):
        raise KdistError(f"--seeds {' '.join(map(str, only_seeds))}: the sweep's seeds are {seeds}; pick among them")
    grid = spec["grid"]
    configs = point_configs(base, grid, extra_overrides)  # validate every point before training anything

    first_cfg = next(iter(configs.values()))
    accelerator = make_accelerator(first_cfg.trainer)  # one per command: every point runs on it
    if spec.get("teacher"):  # a path, or a list of paths: an ensemble
        paths = spec["teacher"] if isinstance(spec["teacher"], list) else [spec["teacher"]]
        teacher = load_teacher([Path(path) for path in paths])
    else:
        teacher_cfg = config_from_dict(merge(first_cfg.to_dict(), {"seed": seeds[0]}))
        _check_reusable(teacher_cfg, out / "teacher")
        teacher_study = Study.open(
            teacher_cfg, out / "teacher", resume=True, eval_splits=("val",), accelerator=accelerator
        )
        teacher = teacher_stage(teacher_study)  # a rerun (a killed sweep, the test after --val-only) reuses it

    rows = {}
    for name, cfg in configs.items():
        metrics = []
        for seed in seeds if only_seeds is None else only_seeds:
            seed_cfg, folder = config_from_dict(merge(cfg.to_dict(), {"seed": seed})), out / name / f"seed{seed}"
            _check_reusable(seed_cfg, folder)
            study = Study.open(seed_cfg, folder, eval_splits=("val",), accelerator=accelerator)
            study.resume = True  # a rerun of the sweep skips points already distilled
            study.cache_dir = out / "cache"  # one teacher, one cache of its logits for every point
            if not study.finished("distilled"):
                distill_stage(study, teacher)
            metrics.append(json.loads((study.out / "results.json").read_text())["models"]["distilled"]["val"])
        rows[name] = {key: _stats([m[key] for m in metrics]) for key in ("acc", "auc", "balanced_acc", "macro_f1")}
    if only_seeds is not None:  # a part of the sweep: the table needs every seed
        return None

    best = max(rows, key=lambda name: rows[name]["acc"]["mean"])
    tests = []
    for seed in [] if val_only else seeds:  # the test split, once per seed, for the chosen point only
        study = Study.open(configs[best], out / best / f"seed{seed}", eval_splits=("val",), accelerator=accelerator)
        images, labels = study.splits["test"]
        model = load_model(study.out / "distilled.safetensors")
        tests.append(classification_metrics(predict_probs(model, images), labels.numpy()))
    chosen_test = (
        {key: _stats([m[key] for m in tests]) for key in ("acc", "auc", "balanced_acc", "macro_f1")} if tests else None
    )
    record = {"grid": grid, "seeds": seeds, "val": rows, "chosen": best, "chosen_test": chosen_test}
    atomic_write_text(out / "sweep.json", json.dumps(record, indent=2))
    atomic_write_text(out / "sweep.md", sweep_markdown(record))
    return record


def _pm(stat: dict, pct: bool = True) -> str:
    return mean_std_text((stat["mean"], stat["std"], stat["values"]), pct)


def sweep_markdown(record: dict) -> str:
    lines = [
        "# kdist sweep (distilled student, val split)",
        "",
        f"Mean ± std over seeds {record['seeds']}; the teacher is fixed. Chosen on val accuracy: "
        f"**{record['chosen']}**.",
        "",
        "| Setting | Val accuracy | Val AUC | Val balanced acc | Val macro F1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(record["val"].items(), key=lambda kv: -kv[1]["acc"]["mean"]):
        mark = " (chosen)" if name == record["chosen"] else ""
        lines.append(
            f"| {name}{mark} | {_pm(row['acc'])} | {_pm(row['auc'], False)} | {_pm(row['balanced_acc'])} | "
            f"{_pm(row['macro_f1'], False)} |"
        )
    t = record["chosen_test"]
    if t is None:
        return "\n".join(
            lines + ["", "Test: not evaluated (`--val-only`); rerun without it to test the chosen setting.", ""]
        )
    lines += [
        "",
        f"Test, chosen setting only: accuracy {_pm(t['acc'])}, AUC {_pm(t['auc'], False)}, "
        f"balanced accuracy {_pm(t['balanced_acc'])}, macro F1 {_pm(t['macro_f1'], False)}.",
        "",
    ]
    return "\n".join(lines)
