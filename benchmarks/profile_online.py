"""Where an online distillation step's time goes, by the torch profiler (issue 51), on compare.py's job:
EfficientNet-B0 teacher and SqueezeNet 1.1 student at 64 px input, batch 128, Hinton KD T=4, float32.

    KDIST_DATA_ROOT=../shared/data .venv/bin/python benchmarks/profile_online.py [--steps 15] [--out DIR]

Prints ms per step for each region of the engine's step (kdist.bench.online_breakdown) and writes the
profiler's top operators to DIR/online_profile.txt.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from kdist.bench import bench_data, online_breakdown
from kdist.config import Config
from kdist.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/profile-online"))
    args = parser.parse_args()
    cfg = Config()
    cfg = replace(cfg, kd=replace(cfg.kd, method="hinton", temperature=4.0, alpha=0.9))
    cfg = replace(cfg, data=replace(cfg.data, root=os.environ.get("KDIST_DATA_ROOT"), download=False, shards="none"))
    splits, mean, std, _ = bench_data(cfg)  # the npz in memory, as training opens it
    teacher = create_model("teacher", mean, std, 64).eval()

    def student():
        torch.manual_seed(0)
        return create_model("student", mean, std, 64)

    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(online_breakdown(cfg, splits, teacher, student, args.out, steps=args.steps), indent=1))


if __name__ == "__main__":
    main()
