"""Knowledge-distillation losses, chosen by name from a registry.

Each entry computes the distillation term from student and teacher logits; the training module
combines it with the label loss as `alpha * kd + (1 - alpha) * CE(z_s, y)`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

KD_LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str):
    def wrap(fn):
        KD_LOSSES[name] = fn
        return fn

    return wrap


def get_kd_loss(name: str) -> Callable[..., torch.Tensor]:
    from . import DermkdError

    if name not in KD_LOSSES:
        raise DermkdError(f"unknown KD method {name!r}; choose one of {sorted(KD_LOSSES)}")
    return KD_LOSSES[name]


@register("hinton")
def hinton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target KD (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

        kd = T^2 * mean_batch KL( softmax(z_t / T) || softmax(z_s / T) )

    The T^2 factor keeps the gradient scale of the soft term independent of T.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    method: str = "hinton",
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """loss = alpha * kd(z_s, z_t; T) + (1 - alpha) * CE(z_s, y)."""
    kd = get_kd_loss(method)(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)
