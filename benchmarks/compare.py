"""kdist against torchdistill 1.1.5 on the same KD job, interleaved, on this machine (issue 51).

    make -C benchmarks venv                      # torchdistill's own virtual environment (once)
    .venv/bin/python benchmarks/compare.py --rounds 3 --epochs 5 [--save]

The job: EfficientNet-B0 teacher (frozen, online) and SqueezeNet 1.1 student, both from the same safetensors
files, 28 px DermaMNIST upsampled to 64 inside the models, global batch 128, AdamW 3e-3, OneCycle, gradient
clip 1, Hinton KD T=4 with 0.9 on the KD term, a random flip/rotation of 8 per image, float32, validation on
the 1003 val images after every epoch. Each round runs every job once, in a rotated order, as a fresh process;
the seconds per epoch are the gaps between the epoch lines each job prints (the first epoch, with start-up and
warm-up, is dropped). Printed: the median s/epoch of each job over all rounds and, as this machine's speed drifts,
each job's ratio to torchdistill within each round and the median of those ratios.
`--save` writes the table to benchmarks/results/<date>-<cpu>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHDISTILL_PYTHON = REPO / "benchmarks" / ".venv" / "bin" / "python"
EPOCH_LINE = re.compile(rb"epoch (\d+)/(\d+)")
# Settings shared by every kdist job: the torchdistill job's (benchmarks/torchdistill/kd.yaml).
KDIST_KD = [
    "--set",
    "kd.method=hinton",
    "--set",
    "kd.temperature=4",
    "--set",
    "kd.alpha=0.9",
    "--val-only",
    "--tracker",
    "none",
    "--mixed-precision",
    "no",
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_models(folder: Path, data_root: str) -> tuple[Path, Path]:
    """The teacher and the student both packages start from: kdist's models (64 px input, train-split
    normalisation), seeded, in kdist's safetensors format."""
    import torch

    from kdist.data import channel_stats
    from kdist.datasets import load_medmnist
    from kdist.models import create_model, save_weights

    mean, std = channel_stats(load_medmnist(data_root, "dermamnist", 28, False)["train"][0])
    paths = []
    for role in ("teacher", "student"):
        torch.manual_seed(0)
        model = create_model(role, mean, std, 64)
        save_weights(model, folder / f"{role}.safetensors", {"data_size": 28})
        paths.append(folder / f"{role}.safetensors")
    return paths[0], paths[1]


def jobs(folder: Path, teacher: Path, student: Path, data_root: str, epochs: int, shards: bool) -> dict[str, list[str]]:
    kdist = [sys.executable, "-m", "kdist.cli"]
    common = ["--set", f"data.root={data_root}", "--set", "data.download=false"]
    distill = [
        *kdist,
        "distill",
        "--teacher",
        str(teacher),
        "--set",
        f"student_model.weights={student}",
        "--set",
        f"distill.epochs={epochs}",
        *KDIST_KD,
        *common,
    ]
    alone = [
        *kdist,
        "train",
        "student",
        "--set",
        f"student_model.weights={student}",
        "--set",
        f"student.epochs={epochs}",
        "--set",
        "student_model.input_size=64",
        "--val-only",
        "--tracker",
        "none",
        "--mixed-precision",
        "no",
        *common,
    ]
    table = {
        "torchdistill 1.1.5, online teacher": [
            str(TORCHDISTILL_PYTHON),
            str(REPO / "benchmarks" / "torchdistill" / "job.py"),
            str(REPO / "benchmarks" / "torchdistill" / "kd.yaml"),
            str(teacher),
            str(student),
            data_root,
            "--epochs",
            str(epochs),
        ],
        "kdist distill, online teacher": [*distill, "--teacher-mode", "online", "--shards", "none"],
        "kdist distill, cached teacher": [*distill, "--teacher-mode", "cached", "--shards", "none"],
        "kdist distill, online teacher in bf16 (kd.teacher_precision)": [
            *distill,
            "--teacher-mode",
            "online",
            "--shards",
            "none",
            "--set",
            "kd.teacher_precision=bf16",
        ],
        "kdist train student alone": [*alone, "--shards", "none"],
    }
    if shards:
        table["kdist distill, cached, default shards path"] = [*distill, "--teacher-mode", "cached", "--shards", "auto"]
        table["kdist train student alone, default shards path"] = [*alone, "--shards", "auto"]
    return table


def epoch_seconds(command: list[str], out: Path) -> list[float]:
    """Run one job; the gaps (s) between the epoch lines it prints, the first epoch left out."""
    if "kdist.cli" in command:
        command = [*command, "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stamps, tail = [], b""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO) as job:
        for line in job.stdout:
            tail = (tail + line)[-4000:]
            if EPOCH_LINE.search(line):
                stamps.append(time.perf_counter())
    if job.returncode != 0:
        raise SystemExit(
            f"compare: job failed ({job.returncode}): {' '.join(command)}\n{tail.decode(errors='replace')}"
        )
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--no-shards", action="store_true", help="leave out the default-shards-path jobs")
    parser.add_argument("--save", action="store_true", help="write the table under benchmarks/results/")
    args = parser.parse_args()
    data_root = os.environ.get("KDIST_DATA_ROOT")
    if not data_root or not Path(data_root, "dermamnist.npz").exists():
        raise SystemExit("compare: set KDIST_DATA_ROOT to the folder of dermamnist.npz")
    if not TORCHDISTILL_PYTHON.exists():
        raise SystemExit(f"compare: {TORCHDISTILL_PYTHON} missing; build it with `make -C benchmarks venv`")
    with tempfile.TemporaryDirectory(prefix="kdist-compare-") as tmp:
        folder = Path(tmp)
        teacher, student = write_models(folder, data_root)
        table = jobs(folder, teacher, student, data_root, args.epochs, not args.no_shards)
        names = list(table)
        times: dict[str, list[float]] = {name: [] for name in names}
        by_round: list[dict[str, float]] = []  # each job's median s/epoch in each round
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotated, so no job always runs first
            by_round.append({})
            for name in order:
                seconds = epoch_seconds(table[name], folder / f"run-{round_}-{names.index(name)}")
                times[name] += seconds
                by_round[-1][name] = statistics.median(seconds)
                print(
                    f"round {round_ + 1}: {name}: " + " ".join(f"{s:.2f}" for s in seconds), file=sys.stderr, flush=True
                )
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = "torchdistill 1.1.5, online teacher"
    # The machine's speed drifts (a shared VM): a ratio is taken within each round, then its median over rounds.
    ratios = {name: statistics.median(r[name] / r[reference] for r in by_round) for name in names}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    lines = [
        f"# kdist vs torchdistill, {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, commit {commit}",
        "",
        f"`.venv/bin/python benchmarks/compare.py --rounds {args.rounds} --epochs {args.epochs}"
        f"{' --no-shards' if args.no_shards else ''}`: median s/epoch over "
        f"{args.rounds} rounds x {args.epochs - 1} epochs (first epoch of each run dropped)",
        "",
        "| job | s / epoch | / torchdistill (median of the rounds' ratios) | per round |",
        "| --- | ---: | ---: | --- |",
    ]
    for name in names:
        per_round = " / ".join(f"{r[name] / r[reference]:.3f}" for r in by_round)
        lines.append(f"| {name} | {medians[name]:.2f} | {ratios[name]:.3f} | {per_round} |")
    for shard_name, npz_name in (
        ("kdist distill, cached, default shards path", "kdist distill, cached teacher"),
        ("kdist train student alone, default shards path", "kdist train student alone"),
    ):
        if shard_name in medians:
            within = statistics.median(r[shard_name] / r[npz_name] for r in by_round)
            lines.append(f"\n{shard_name}: {within:.3f}x the npz path (median of the rounds' ratios)")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.save:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu_name().lower()).strip("-")[:40]
        path = REPO / "benchmarks" / "results" / f"{datetime.date.today()}-{slug}.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(report)
        print(f"written to {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
