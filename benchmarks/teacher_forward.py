"""The frozen teacher's forward pass, one lever at a time (issue 51): EfficientNet-B0 (BatchNorm statistics made
non-trivial, as a trained model's), batch 128 of 28 px images upsampled to 64, channels_last, 2 threads.

    .venv/bin/python benchmarks/teacher_forward.py [--compile]

Prints ms per forward (mean of 8 after one warm-up) and the largest logit difference from the first row:
deterministic mode with and without its NaN-filling of new tensors, inference_mode, BatchNorm folded
(kdist.models.frozen_copy), bf16 autocast on top, the folded teacher as kdist runs it online (one chunk of the
batch per CPU thread, objectives.Distillation), and with --compile torch.compile(freezing=True).
"""

from __future__ import annotations

import sys
import time

import torch

from kdist.config import KDConfig, StageConfig
from kdist.models import create_model, frozen_copy
from kdist.objectives import Distillation


def timed(name, forward, reference=None, context=torch.no_grad, repeats=8):
    x = torch.rand(128, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    with context():
        forward(x)
        start = time.perf_counter()
        for _ in range(repeats):
            out = forward(x)
    ms = (time.perf_counter() - start) / repeats * 1000
    diff = "" if reference is None else f"  max |logit difference| {(out.float() - reference).abs().max().item():.2e}"
    print(f"{name:45s} {ms:8.1f} ms{diff}", flush=True)
    return out.float()


def bf16(model):
    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    return forward


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    teacher = create_model("teacher", (0.5,) * 3, (0.25,) * 3, 64).eval()
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    reference = timed("no_grad, NaN-filling on (the old default)", teacher)
    torch.utils.deterministic.fill_uninitialized_memory = False
    timed("no_grad, NaN-filling off", teacher, reference)
    timed("inference_mode", teacher, reference, torch.inference_mode)
    folded = frozen_copy(teacher)
    timed("inference_mode, BatchNorm folded (kdist)", folded, reference, torch.inference_mode)
    timed("... in bf16 autocast (kd.teacher_precision)", bf16(folded), reference, torch.inference_mode)
    online = Distillation(StageConfig(), KDConfig(), teacher=teacher).to("cpu")  # what kdist's online teacher runs
    timed(
        f"... one chunk per thread, {online.teacher_threads} threads (kdist)",
        lambda x: online.teacher_logits(x, None, None),
        reference,
    )
    if "--compile" in sys.argv:
        start = time.perf_counter()
        compiled = torch.compile(frozen_copy(teacher), options={"freezing": True})
        with torch.no_grad():
            compiled(torch.rand(128, 3, 28, 28).contiguous(memory_format=torch.channels_last))
        print(f"compiling took {time.perf_counter() - start:.1f} s")
        timed("torch.compile(freezing=True) (kd.compile_teacher)", compiled, reference)


if __name__ == "__main__":
    main()
