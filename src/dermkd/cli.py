"""The `dermkd` command: run, train, distill, evaluate, report.

Errors in user input (DermkdError) print one line and exit with code 2; argparse does the same
for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import DermkdError, __version__
from .config import QUICK, load_config, parse_override


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (see configs/default.yaml)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<timestamp>)")
    parser.add_argument("--data-root", help="folder with dermamnist.npz (default: $DERMKD_DATA_ROOT, else ~/.medmnist)")
    parser.add_argument("--size", type=int, help="image size: 28 (default) or 64, 128, 224")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="2 epochs per model on a subset: a smoke run of about a minute")
    parser.add_argument("--accelerator", help="Lightning accelerator: auto (default), cpu, gpu")
    parser.add_argument("--devices", help="Lightning devices: auto (default), a count, or a list")
    parser.add_argument("--strategy", help="Lightning strategy: auto (default), ddp, ...")
    parser.add_argument("--num-nodes", type=int, help="number of machines (Lightning num_nodes)")
    parser.add_argument("--teacher-mode", choices=["cached", "online"], help="distillation: cached teacher outputs (default) or online teacher")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--pretrained", choices=["imagenet"],
                        help="start the teacher (with `train student`: the student) from published ImageNet weights")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set kd.temperature=2"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermkd", description="Knowledge distillation on DermaMNIST.")
    parser.add_argument("--version", action="version", version=f"dermkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train teacher, student and distilled student, then evaluate and report")
    p.add_argument("--seeds", type=int, nargs="+", help="run once per seed into OUT/seed<N>/ and report mean ± std")
    _resume(p)
    _common(p)

    p = sub.add_parser("train", help="train the teacher or the student alone on labels")
    p.add_argument("role", choices=["teacher", "student"])
    p.add_argument("--weights", type=Path, help="local safetensors state dict to start from")
    _val_only(p)
    _resume(p)
    _common(p)

    p = sub.add_parser("distill", help="distill the student from a trained teacher")
    p.add_argument("--teacher", type=Path, required=True, action="append",
                   help="teacher weights (.safetensors written by dermkd); repeat it to distill an ensemble's mean logits")
    p.add_argument("--weights", type=Path, help="local safetensors state dict to start the student from")
    _val_only(p)
    _resume(p)
    _common(p)

    p = sub.add_parser("sweep", help="ablation grid of KD settings on val; the chosen one is tested once")
    p.add_argument("sweep_config", type=Path, help="YAML config with a sweep: section (see configs/sweep.yaml)")
    p.add_argument("--val-only", action="store_true",
                   help="run the grid and write its val table, test nothing; a rerun without it reuses the runs and tests the chosen point")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run only these of the sweep's seeds and write no table (one process per seed, side by side); a rerun without it gathers them")
    _common(p)

    p = sub.add_parser("evaluate", help="evaluate saved weights on val and test")
    p.add_argument("weights", type=Path, nargs="+", help="a .safetensors file written by dermkd (several: their ensemble, mean logits)")
    p.add_argument("--data-root", help="folder with dermamnist.npz")
    p.add_argument("--split", choices=["val", "test", "both"], default="both")
    _views(p)

    p = sub.add_parser("predict", help="classify image files or folders (JPEG/PNG of any size and mode)")
    p.add_argument("weights", type=Path, help="model weights (.safetensors written by dermkd), e.g. RUN/distilled.safetensors")
    p.add_argument("paths", type=Path, nargs="+", help="image files and/or folders")
    p.add_argument("--teacher", type=Path, help="teacher weights: add its prediction beside the student's")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output .csv (default) or .json")
    _views(p)
    p.add_argument("--batch-size", type=int, default=256)

    p = sub.add_parser("export", help="export weights to ONNX and check it against PyTorch on real test images")
    p.add_argument("weights", type=Path)
    p.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    p.add_argument("--data-root", help="folder with dermamnist.npz, for the check on test images")
    p.add_argument("--check-images", type=int, default=512, help="test images to compare on (0: skip the check)")
    _views(p)

    p = sub.add_parser("serve", help="a local web page to try the model on an uploaded image")
    p.add_argument("weights", type=Path, help="e.g. RUN/distilled.safetensors")
    p.add_argument("--teacher", type=Path, help="teacher weights: show its probabilities too")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _views(p)

    p = sub.add_parser("bench", help="speed figures: data path, cached vs online distillation, 32-bit vs bf16, latency, FLOPs")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per throughput figure")
    p.add_argument("--results", type=Path, default=Path("results/results.json"), help="results.json whose run wall time to report")
    _common(p)

    p = sub.add_parser("report", help="regenerate report.md of a run folder from its results.json")
    p.add_argument("run_dir", type=Path)
    return parser


def _views(p) -> None:
    p.add_argument("--views", choices=["one", "mean"], default="one",
                   help="mean: test-time augmentation, logits averaged over the 8 flips/rotations (default: the image as it is)")


def _val_only(p) -> None:
    p.add_argument("--val-only", action="store_true",
                   help="evaluate on val only (a tuning run); test the chosen model later with `dermkd evaluate --split test`")


def _resume(p) -> None:
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a killed run in RUN_DIR with its saved config: finished stages are kept, the interrupted one goes on from its last checkpoint")


def resolve_config(args):
    return load_config(args.config, resolve_overrides(args))


def resolve_overrides(args) -> list[dict]:
    """Command-line flags and --set, as config overrides (applied after the config file)."""
    overrides = []
    if args.quick:
        overrides.append(QUICK)
    flags = {
        ("data", "root"): args.data_root,
        ("data", "size"): args.size,
        ("seed",): args.seed,
        ("trainer", "accelerator"): args.accelerator,
        ("trainer", "devices"): _devices(args.devices),
        ("trainer", "strategy"): args.strategy,
        ("trainer", "num_nodes"): args.num_nodes,
        ("trainer", "progress"): False if args.no_progress else None,
        ("kd", "teacher_mode"): args.teacher_mode,
    }
    if getattr(args, "weights", None):
        role = "teacher_model" if getattr(args, "role", "student") == "teacher" else "student_model"
        flags[(role, "weights")] = str(args.weights)
    if args.pretrained:
        role = "student_model" if getattr(args, "role", "teacher") == "student" else "teacher_model"
        flags[(role, "pretrained")] = args.pretrained
    for keys, value in flags.items():
        if value is not None:
            update = value
            for key in reversed(keys):
                update = {key: update}
            overrides.append(update)
    overrides += [parse_override(text) for text in args.set]
    return overrides


def _devices(text):
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def _open_study(args):
    from .config import config_from_dict
    from .pipeline import Study

    eval_splits = ("val",) if getattr(args, "val_only", False) else ("val", "test")
    if getattr(args, "resume", None):
        saved = args.resume / "config.yaml"
        if not saved.exists():
            raise DermkdError(f"{saved} not found; --resume needs a run folder written by `dermkd {args.command}`")
        if args.config or args.set or args.quick or getattr(args, "seeds", None) or args.seed is not None or args.out:
            raise DermkdError("--resume continues a run with its saved config and folder; drop --config/--set/--quick/--seed(s)/--out")
        import yaml

        return Study.open(config_from_dict(yaml.safe_load(saved.read_text())), args.resume, resume=True, eval_splits=eval_splits)
    cfg = resolve_config(args)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return Study.open(cfg, out, eval_splits=eval_splits)


def _summary(results_path: Path) -> str:
    results = json.loads(results_path.read_text())
    lines = [f"results: {results_path}"]
    for name, entry in results.get("models", {}).items():
        split = "test" if "test" in entry else "val"  # a --val-only run has no test entry
        lines.append(f"  {name:10s} {split} acc {entry[split]['acc']:.4f}  auc {entry[split]['auc'] or float('nan'):.4f}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep the console to progress bars and results: drop Lightning's tips and known-harmless warnings."""
    import logging
    import warnings

    import lightning  # noqa: F401  (sets its own log level on import; override it afterwards)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen teacher, on purpose


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "report":
            from .report import write_report

            print(write_report(args.run_dir))
        elif args.command == "sweep":
            from .sweep import run_sweep

            out = args.out or Path("runs") / ("sweep-" + time.strftime("%Y%m%d-%H%M%S"))
            args.config = None
            overrides = resolve_overrides(args)
            if run_sweep(args.sweep_config, out, overrides, val_only=args.val_only, only_seeds=args.seeds) is None:
                print(f"seeds {args.seeds} done in {out}; rerun without --seeds for the table")
            else:
                print((out / "sweep.md").read_text())
        elif args.command == "predict":
            from .inference import predict_files, write_predictions

            rows, errors = predict_files(args.weights, args.paths, args.teacher, args.batch_size, views=args.views)
            for error in errors:
                print(f"dermkd: skipped {error}", file=sys.stderr)
            if rows:
                write_predictions(rows, args.out)
                print(f"{len(rows)} predictions written to {args.out}")
            if errors:
                if len(errors) == 1 and not rows:
                    raise DermkdError(errors[0])
                return 2
        elif args.command == "serve":
            from .serve import make_server

            server = make_server(args.weights, args.teacher, args.host, args.port, views=args.views)
            print(f"serving on http://{args.host}:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
            server.serve_forever()
        elif args.command == "export":
            print(json.dumps(export_weights(args), indent=2))
        elif args.command == "bench":
            from .bench import format_bench, run_bench

            out = args.out or Path("runs") / ("bench-" + time.strftime("%Y%m%d-%H%M%S"))
            print(format_bench(run_bench(resolve_config(args), out, args.steps, args.results)))
            print(f"written: {out / 'bench.json'}")
        elif args.command == "evaluate":
            print(json.dumps(evaluate_weights(args), indent=2))
        else:
            from . import pipeline

            if args.command == "run" and args.seeds and not args.resume:  # --resume with --seeds is refused below
                return run_seeds(args)
            study = _open_study(args)
            if args.command == "run":
                pipeline.run(study)
            elif args.command == "train":
                pipeline.train_stage(study, args.role)
            else:
                from .models import load_teacher

                # One teacher file must hold the configured teacher (teacher_model.arch; --set it for another).
                teacher = load_teacher(args.teacher, expect_arch=study.cfg.teacher_model.arch)
                pipeline.distill_stage(study, teacher)
                if pipeline.is_rank_zero() and not pipeline.recorded(study, "teacher"):
                    # The teacher (or ensemble) beside its student in results.json and the report.
                    pipeline.evaluate(study, "teacher", teacher)
            if pipeline.is_rank_zero():
                print(_summary(study.out / "results.json"))
    except DermkdError as exc:
        print(f"dermkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dermkd: interrupted", file=sys.stderr)
        return 130
    return 0


def run_seeds(args) -> int:
    """One full run per seed, then a report over all of them."""
    from dataclasses import replace

    from .pipeline import Study, is_rank_zero, run
    from .report import write_report

    cfg = resolve_config(args)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    for seed in args.seeds:
        run(Study.open(replace(cfg, seed=seed), out / f"seed{seed}"))
    if is_rank_zero():
        print(write_report(out))
    return 0


def export_weights(args) -> dict:
    from .data import load_dermamnist
    from .inference import data_size, export_onnx

    images = None
    if args.check_images:
        images = load_dermamnist(args.data_root, data_size(args.weights))["test"][0][: args.check_images]
    report = export_onnx(args.weights, args.onnx, images, views=args.views)
    if images is not None and report["max_abs_diff_probabilities"] >= 1e-4:
        raise DermkdError(f"ONNX and PyTorch disagree: max abs difference {report['max_abs_diff_probabilities']:.2e} >= 1e-4")
    return report


def evaluate_weights(args) -> dict:
    """Headline metrics of saved weights (several files: their ensemble, as distilled); the data size
    comes from the weights' metadata."""
    from .data import load_dermamnist
    from .metrics import classification_metrics
    from .models import data_size_of, load_teacher, read_metadata
    from .inference import predict_probs

    sizes = {data_size_of(read_metadata(path)) for path in args.weights}
    if len(sizes) > 1:
        raise DermkdError(f"these weights were trained on different image sizes {sorted(sizes)}; evaluate them separately")
    model = load_teacher(args.weights)
    splits = load_dermamnist(args.data_root, sizes.pop())
    out = {"weights": [str(path) for path in args.weights] if len(args.weights) > 1 else str(args.weights[0]), "arch": model.arch,
           "views": args.views}
    for split in ("val", "test") if args.split == "both" else (args.split,):
        images, labels = splits[split]
        metrics = classification_metrics(predict_probs(model, images, views=args.views), labels.numpy())
        out[split] = {key: value for key, value in metrics.items() if key != "per_class"}
    return out


if __name__ == "__main__":
    sys.exit(main())
