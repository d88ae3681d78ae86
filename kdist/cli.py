"""The `kdist` command (click): run, train, distill, sweep, evaluate, predict, export, serve, bench, report.

train, distill and evaluate live in modules of their own so that the launcher can run them:
`accelerate launch -m kdist.distill ...` takes the same options as `kdist distill ...`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from . import KdistError, __version__
from .distill import command as distill_command
from .evaluate import command as evaluate_command
from .options import (
    PATH,
    SEEDS,
    default_out,
    flatten_seeds,
    holds_this_run,
    invoke,
    open_study,
    resolve_config,
    resume_option,
    study_options,
    summary,
    views_option,
)
from .shards import command as shards_command
from .train import command as train_command
from .wandb_report import command as wandb_report_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdist")
def cli():
    """kdist: distributed knowledge distillation for skin-lesion classification (DermaMNIST by default).

    Training commands run on one process as they are, or on many under `accelerate launch -m kdist.<command>`.
    """


cli.add_command(train_command)
cli.add_command(distill_command)
cli.add_command(evaluate_command)
cli.add_command(wandb_report_command)
cli.add_command(shards_command)


@cli.command()
@click.option(
    "--seeds", type=SEEDS, multiple=True, help="e.g. 0,1,2: run once per seed into OUT/seed<N>/ and report mean ± std"
)
@resume_option
@study_options
def run(seeds, **opts):
    """Train teacher, student and distilled student, then evaluate and report."""
    seeds = flatten_seeds(seeds)
    from .pipeline import Study, is_rank_zero
    from .pipeline import run as run_study
    from .report import write_report

    if seeds and opts.get("resume") in (None, "auto"):
        cfg = resolve_config(opts)
        out = opts.get("out") or default_out()
        study = None
        for seed in seeds:
            seed_cfg, folder = replace(cfg, seed=seed), out / f"seed{seed}"
            resume = opts.get("resume") == "auto" and holds_this_run(folder, seed_cfg)
            study = Study.open(seed_cfg, folder, resume=resume, accelerator=study.accelerator if study else None)
            run_study(study)
        if is_rank_zero():
            click.echo(write_report(out))
        return 0
    opts["seeds"] = seeds
    study = open_study(opts, "run")
    run_study(study)
    if study.is_main:
        click.echo(summary(study.out / "results.json"))
    return 0


@cli.command()
@click.argument("sweep_config", type=PATH)
@click.option(
    "--val-only",
    is_flag=True,
    help="run the grid and write its val table, test nothing; a rerun without it reuses the runs and tests the "
    "chosen point",
)
@click.option(
    "--seeds",
    "only_seeds",
    type=SEEDS,
    multiple=True,
    help="run only these of the sweep's seeds and write no table (one process per seed, side by side); a rerun "
    "without it gathers them",
)
@study_options(without=("config", "seed"))  # the sweep file names the base config and the seeds
def sweep(sweep_config, val_only, only_seeds, **opts):
    """Ablation grid of KD settings on val; only the chosen point is tested, once per seed."""
    from .options import config_overrides
    from .sweep import run_sweep

    only_seeds = flatten_seeds(only_seeds)
    out = opts.get("out") or default_out("sweep-")
    if (
        run_sweep(sweep_config, out, config_overrides(opts), val_only=val_only, only_seeds=list(only_seeds) or None)
        is None
    ):
        click.echo(f"seeds {list(only_seeds)} done in {out}; rerun without --seeds for the table")
    else:
        click.echo((out / "sweep.md").read_text())


@cli.command()
@click.argument("weights", type=PATH)
@click.argument("paths", type=PATH, nargs=-1, required=True)
@click.option("--teacher", type=PATH, help="teacher weights: add its prediction beside the student's")
@click.option("--out", type=PATH, default=Path("predictions.csv"), show_default=True, help="output .csv or .json")
@click.option("--batch-size", type=int, default=256, show_default=True)
@views_option
def predict(weights, paths, teacher, out, batch_size, views):
    """Classify image files or folders (JPEG/PNG of any size and mode)."""
    from .inference import predict_files, write_predictions

    rows, errors = predict_files(weights, list(paths), teacher, batch_size, views=views)
    for error in errors:
        print(f"kdist: skipped {error}", file=sys.stderr)
    if rows:
        write_predictions(rows, out)
        click.echo(f"{len(rows)} predictions written to {out}")
    if errors:
        if len(errors) == 1 and not rows:
            raise KdistError(errors[0])
        return 2
    return 0


@cli.command()
@click.argument("weights", type=PATH)
@click.option("--onnx", "onnx_path", type=PATH, required=True, help="output .onnx file")
@click.option("--data-root", help="folder with the weights' MedMNIST npz, for the check on test images")
@click.option("--shards", type=PATH, help="instead: the shard folder of the weights' data, for its test images")
@click.option(
    "--check-images", type=int, default=512, show_default=True, help="test images to compare on (0: skip the check)"
)
@views_option
def export(weights, onnx_path, data_root, shards, check_images, views):
    """Export weights to ONNX and check it against PyTorch on real test images."""
    from .inference import export_onnx, test_images

    images = test_images(weights, data_root, shards, check_images) if check_images else None
    report = export_onnx(weights, onnx_path, images, views=views)
    if images is not None and report["max_abs_diff_probabilities"] >= 1e-4:
        raise KdistError(
            f"ONNX and PyTorch disagree: max abs difference {report['max_abs_diff_probabilities']:.2e} >= 1e-4"
        )
    click.echo(json.dumps(report, indent=2))


@cli.command()
@click.argument("weights", type=PATH)
@click.option("--teacher", type=PATH, help="teacher weights: show its probabilities too")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (127.0.0.1: this machine only)")
@click.option("--port", type=int, default=8000, show_default=True)
@views_option
def serve(weights, teacher, host, port, views):
    """A local web page to try the model on an uploaded image."""
    from .serve import make_server

    server = make_server(weights, teacher, host, port, views=views)
    click.echo(f"serving on http://{host}:{server.server_address[1]}/  (Ctrl-C stops)")
    server.serve_forever()


@cli.command()
@click.option("--steps", type=int, default=30, show_default=True, help="timed training steps per throughput figure")
@click.option(
    "--results", type=PATH, default=None, help="a run's results.json whose wall time to report beside the figures"
)
@click.option(
    "--processes/--no-processes",
    default=True,
    show_default=True,
    help="also time a distillation epoch under `accelerate launch` with 1 and 2 processes",
)
@study_options(
    without=("teacher_mode", "tracker", "pretrained", "mixed_precision")
)  # bench times both teacher modes and both precisions itself, tracks nothing
@click.option(
    "--photos",
    type=PATH,
    help="instead: the loader at a photograph's size (--size, default 224) on these JPEG shards' train split, beside "
    "torchvision's ImageFolder with the same transforms",
)
@click.option(
    "--photo-images", type=int, default=1024, show_default=True, help="with --photos: images timed per loader"
)
def bench(steps, results, processes, photos, photo_images, **opts):
    """Speed figures: data path, cached vs online distillation, the online step's breakdown, 32-bit vs bf16, 1 vs 2
    processes, latency, FLOPs (or, with --photos, the photo loader)."""
    from .bench import format_bench, run_bench

    if photos:
        from .bench_photos import format_photos, photo_figures

        cfg = resolve_config(opts)
        size = opts.get("size") or 224
        click.echo(format_photos(photo_figures(photos, size, photo_images, arch=cfg.student_model.arch)))
        return
    out = opts.get("out") or default_out("bench-")
    click.echo(format_bench(run_bench(resolve_config(opts), out, steps, results, processes)))
    click.echo(f"written: {out / 'bench.json'}")


@cli.command()
@click.argument("run_dir", type=PATH)
def report(run_dir):
    """Regenerate report.md / report.html / figures / MODEL_CARD.md of a run folder."""
    from .report import write_report

    click.echo(write_report(run_dir))


def main(argv=None) -> int:
    return invoke(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
