"""What every kdist command shares: click options, the config they resolve to, and how errors end.

Errors in user input (KdistError) print one line, `kdist: error: ...`, and exit with code 2; so do
click's usage errors. Bugs in kdist still show a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import KdistError
from .config import QUICK, config_from_dict, load_config, parse_override

PATH = click.Path(path_type=Path)


class SeedList(click.ParamType):
    """`--seeds 0,1,2` (or the option repeated): a list of whole numbers."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of whole numbers, e.g. 0,1,2", param, ctx)


SEEDS = SeedList()


def flatten_seeds(groups) -> list[int]:
    return [seed for group in groups or () for seed in group]


def study_options(command=None, *, without: tuple = ()):
    """The options of every training command (run, train, distill, sweep, bench); `without`: the names of those a
    command does not use (it must not accept and ignore them), e.g. @study_options(without=("seed",))."""
    if command is None:
        return lambda command: study_options(command, without=without)
    options = [
        click.option("--config", type=PATH, help="YAML config file (see configs/default.yaml)"),
        click.option("--out", type=PATH, help="run folder (default: runs/<timestamp>)"),
        click.option(
            "--flag", help="the MedMNIST 2D set to train on (data.flag; default dermamnist), e.g. breastmnist"
        ),
        click.option("--data-root", help="folder with the MedMNIST npz (default: $KDIST_DATA_ROOT, else ~/.medmnist)"),
        click.option(
            "--size",
            type=int,
            help="image side the models get: 28 (default), 64, 128 or 224 from a MedMNIST file; any from shards",
        ),
        click.option(
            "--shards",
            metavar="auto|FOLDER|none",
            help="where the data is read from: auto (default: the data file's webdataset shards, written once into "
            "$KDIST_SHARD_CACHE, else ~/.cache/kdist/shards), a folder written by `kdist shards`, or none (the npz "
            "in memory)",
        ),
        click.option("--seed", type=int, help="random seed (default 0)"),
        click.option("--quick", is_flag=True, help="2 epochs per model on a subset: a smoke run of about a minute"),
        click.option(
            "--teacher-mode",
            type=click.Choice(["auto", "cached", "online"]),
            help="distillation: online (the frozen teacher beside the student on every batch), cached (its logits "
            "computed once per view: the fast path on CPUs) or auto (default: online on GPUs, cached on CPUs)",
        ),
        click.option(
            "--mixed-precision",
            type=click.Choice(["no", "fp16", "bf16"]),
            help="default: the launcher's (accelerate launch --mixed_precision), else no",
        ),
        click.option("--cpu", is_flag=True, default=None, help="run on the CPU even where CUDA is present"),
        click.option("--no-progress", is_flag=True, help="no per-epoch lines"),
        click.option(
            "--tracker",
            type=click.Choice(["none", "wandb", "jsonl"]),
            help="experiment tracker: wandb (offline without an API key), jsonl, or none (default: the run "
            "folder's metrics.csv and results.json only, which are always written)",
        ),
        click.option(
            "--pretrained",
            type=click.Choice(["imagenet"]),
            help="start the teacher (with `train student`: the student) from published ImageNet weights",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set kd.temperature=2 (repeatable); a stage's batch_size "
            "(e.g. --set distill.batch_size=256) is the global batch, split over processes and accumulation steps",
        ),
    ]
    for option in reversed(options):
        name = option(lambda: None).__click_params__[0].name
        if name not in without:
            command = option(command)
    return command


def views_option(command):
    return click.option(
        "--views",
        type=click.Choice(["one", "mean"]),
        default="one",
        show_default=True,
        help="mean: test-time augmentation, logits averaged over the 8 flips/rotations",
    )(command)


def val_only_option(command):
    return click.option(
        "--val-only",
        is_flag=True,
        help="evaluate on val only (a tuning run); test the chosen model later with `kdist evaluate --split test`",
    )(command)


class ResumeTarget(click.ParamType):
    """`--resume RUN_DIR`, or `--resume auto`: continue the --out folder when it holds a run, else start it."""

    name = "RUN_DIR|auto"

    def convert(self, value, param, ctx):
        return value if value == "auto" or isinstance(value, Path) else Path(value)


def resume_option(command):
    return click.option(
        "--resume",
        type=ResumeTarget(),
        metavar="RUN_DIR|auto",
        help="continue a killed run in RUN_DIR with its saved config: finished stages are kept, the "
        "interrupted one goes on from its last checkpoint; `auto` (with --out and the run's own "
        "options, as Slurm jobs pass them): continue --out if it holds this run, else start it",
    )(command)


def config_overrides(opts: dict, role: str | None = None) -> list[dict]:
    """Command-line flags and --set, as config overrides (applied after the config file). `role`: the model
    that --weights and --pretrained apply to."""
    overrides = [QUICK] if opts.get("quick") else []
    flags = {
        ("data", "flag"): opts.get("flag"),
        ("data", "root"): opts.get("data_root"),
        ("data", "size"): opts.get("size"),
        ("data", "shards"): str(opts["shards"]) if opts.get("shards") else None,
        ("seed",): opts.get("seed"),
        ("kd", "teacher_mode"): opts.get("teacher_mode"),
        ("trainer", "mixed_precision"): opts.get("mixed_precision"),
        ("trainer", "cpu"): opts.get("cpu"),
        ("trainer", "progress"): False if opts.get("no_progress") else None,
        ("trainer", "tracker"): opts.get("tracker"),
    }
    if opts.get("weights"):
        flags[("teacher_model" if role == "teacher" else "student_model", "weights")] = str(opts["weights"])
    if opts.get("pretrained"):
        flags[("student_model" if role == "student" else "teacher_model", "pretrained")] = opts["pretrained"]
    for keys, value in flags.items():
        if value is not None:
            update = value
            for key in reversed(keys):
                update = {key: update}
            overrides.append(update)
    return overrides + [parse_override(text) for text in opts.get("overrides", ())]


def resolve_config(opts: dict, role: str | None = None):
    return load_config(opts.get("config"), config_overrides(opts, role))


def default_out(prefix: str = "") -> Path:
    return Path("runs") / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def planned_config(opts: dict, role: str | None = None):
    """The config a command will run with: the saved one for --resume RUN_DIR, else the options' own."""
    if isinstance(opts.get("resume"), Path) and (opts["resume"] / "config.yaml").exists():
        import yaml

        return config_from_dict(yaml.safe_load((opts["resume"] / "config.yaml").read_text()))
    return resolve_config(opts, role)


def holds_this_run(out: Path, cfg) -> bool:
    """For --resume auto: whether `out` holds a run of `cfg` to continue (False: a new or empty folder);
    a run of another config there is an error, never overwritten or continued."""
    saved = out / "config.yaml"
    if not saved.exists():
        return False
    import yaml

    if yaml.safe_load(saved.read_text()) != cfg.to_dict():
        raise KdistError(f"{out} holds a run with another config ({saved}); give its options again, or another --out")
    return True


def open_study(opts: dict, command: str, role: str | None = None):
    """The Study a training command works in: a new one, or with --resume the saved one. Everything given is
    checked (config, launch settings, data) before a run folder is created or changed."""
    from .pipeline import Study

    eval_splits = ("val",) if opts.get("val_only") else ("val", "test")
    resume = opts.get("resume")
    if resume == "auto":  # the same command line for the first start and every requeue (slurm/job.sh)
        if not opts.get("out"):
            raise KdistError("--resume auto needs --out: the run folder to continue, or to start")
        cfg = resolve_config(opts, role)
        return Study.open(cfg, opts["out"], resume=holds_this_run(opts["out"], cfg), eval_splits=eval_splits)
    if resume:
        saved = resume / "config.yaml"
        if not saved.exists():
            raise KdistError(f"{saved} not found; --resume needs a run folder written by `kdist {command}`")
        changed = [name for name in ("config", "quick", "seeds", "seed", "out") if opts.get(name)] + (
            ["set"] if opts.get("overrides") else []
        )
        if changed:
            raise KdistError(
                "--resume continues a run with its saved config and folder; drop "
                "--config/--set/--quick/--seed(s)/--out "
                "(or use --resume auto with the run's own options)"
            )
        import yaml

        return Study.open(
            config_from_dict(yaml.safe_load(saved.read_text())), resume, resume=True, eval_splits=eval_splits
        )
    return Study.open(resolve_config(opts, role), opts.get("out") or default_out(), eval_splits=eval_splits)


def summary(results_path: Path) -> str:
    results = json.loads(results_path.read_text())
    lines = [f"results: {results_path}"]
    for name, entry in results.get("models", {}).items():
        split = "test" if "test" in entry else "val"  # a --val-only run has no test entry
        lines.append(
            f"  {name:10s} {split} acc {entry[split]['acc']:.4f}  auc {entry[split]['auc'] or float('nan'):.4f}"
        )
    return "\n".join(lines)


def invoke(command: click.Command, argv=None, prog_name: str = "kdist") -> int:
    """Run a click command; KdistError and usage errors end in one line and exit code 2."""
    from .checkpoints import STOP_EXIT_CODE, StopRequested

    _quiet_libraries()
    try:
        result = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
    except KdistError as exc:
        from .ranks import report_error

        report_error(str(exc))  # once per launch, and the other ranks end
        return 2
    except StopRequested as exc:
        print(f"kdist: {exc}; continue with --resume", file=sys.stderr, flush=True)
        return STOP_EXIT_CODE
    except KeyboardInterrupt:
        print("kdist: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: its traceback follows, and the other ranks must not wait for this one
        from .ranks import report_error

        report_error(f"{type(exc).__name__}: {exc} (a bug in kdist; its traceback follows)")
        raise
    return result if isinstance(result, int) else 0


def entry_point(command: click.Command, prog_name: str):
    """`python -m kdist.<x>` (and `accelerate launch -m kdist.<x>`): run `command` and exit with its code."""
    sys.exit(invoke(command, prog_name=prog_name))


def _quiet_libraries() -> None:
    """Keep the console to progress lines and results: drop known-harmless warnings."""
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
