"""`kdist bench` on a CUDA device: the GPU's own figures, in float32 and bf16 (autocast for the student, the
frozen teacher cast once, as training runs them): the teacher's forward, the student's training step and an
online distillation step (teacher forward + student step + KD loss) in images/s, each timed between CUDA
synchronisations after warm-up; and the fraction of the device's peak that the student's step reaches
(training FLOPs per image, counted by torch.utils.flop_counter, x images/s, over the data-sheet peak)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .losses import distillation_terms
from .models import create_model, frozen_copy
from .study_data import planned_dataset

# Dense peaks from NVIDIA's data sheets, TFLOP/s: (bf16 tensor cores, float32 without tensor cores).
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 51.2),
    "H100": (989.4, 66.9),
    "H200": (989.4, 66.9),
    "A100": (312.0, 19.5),
    "L40S": (362.1, 91.6),
    "A10": (125.0, 31.2),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),  # fp16 tensor cores: V100 has no bf16
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of the named device for `precision` (bf16 or fp32); None for a device not listed."""
    for name, (bf16, fp32) in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if name in device_name:
            return bf16 if precision == "bf16" else fp32
    return None


def images_per_s(step, batch: int, steps: int, device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(3):  # warm-up: cuDNN's autotuning, the allocator
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return batch * steps / (time.perf_counter() - start)


def cuda_figures(cfg, mean, std, size: int, steps: int, device: torch.device = torch.device("cuda")) -> dict:
    """The figures above on `device` (a CUDA device; the CPU only to test this function)."""
    batch = cfg.distill.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, planned_dataset(cfg.data).num_classes, (batch,), device=device)
    teacher32 = frozen_copy(
        create_model(cfg.teacher_model.arch, mean, std, cfg.teacher_model.input_size, dataset=planned_dataset(cfg.data))
    ).to(device)
    student = (
        create_model(cfg.student_model.arch, mean, std, cfg.student_model.input_size, dataset=planned_dataset(cfg.data))
        .to(device)
        .train()
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    figures = {"device": name}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        teacher = teacher32.to(dtype)

        def teacher_forward():
            with torch.inference_mode():
                return teacher(images.to(dtype)).float()

        def student_step(targets=None):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = student(images)
            if targets is None:
                loss = F.cross_entropy(logits.float(), labels)
            else:
                kd, ce = distillation_terms(logits.float(), targets, labels, "hinton", 4.0, False, {}, None)
                loss = 0.9 * kd + 0.1 * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        with FlopCounterMode(display=False) as counter:
            student_step()
        flops_per_image = counter.get_total_flops() / batch
        step_img_s = images_per_s(student_step, batch, steps, device)
        peak = peak_tflops(name, precision)
        figures[precision] = {
            "teacher_forward_img_s": round(images_per_s(teacher_forward, batch, steps, device), 1),
            "student_step_img_s": round(step_img_s, 1),
            "online_step_img_s": round(images_per_s(lambda: student_step(teacher_forward()), batch, steps, device), 1),
            "student_step_flops_per_image": flops_per_image,
            "student_step_tflops": round(flops_per_image * step_img_s / 1e12, 3),
            "peak_tflops": peak,
            "student_step_fraction_of_peak": round(flops_per_image * step_img_s / 1e12 / peak, 4) if peak else None,
        }
    teacher32.float()
    return figures


def format_cuda(figures: dict) -> list[str]:
    lines = [f"on {figures['device']} (images/s; the student's step as a fraction of the device's peak FLOP/s)"]
    for precision in ("fp32", "bf16"):
        f = figures[precision]
        peak = (
            f"{f['student_step_fraction_of_peak']:.4f} of {f['peak_tflops']} TFLOP/s"
            if f["peak_tflops"]
            else "peak unknown"
        )
        lines.append(
            f"  {precision}: teacher forward {f['teacher_forward_img_s']:9.1f}  student step "
            f"{f['student_step_img_s']:9.1f}  online step {f['online_step_img_s']:9.1f}  student "
            f"{f['student_step_tflops']:.3f} TFLOP/s = {peak}"
        )
    return lines
