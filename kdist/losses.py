"""Knowledge-distillation losses, chosen by name from a registry.

Each entry computes the distillation term from student logits, teacher logits, labels and a
temperature T; `distillation_terms` gives it beside the label loss, and objectives.Distillation combines them
as `alpha * kd + (1 - alpha) * CE(z_s, y)` (`mix_terms`), optionally after logit standardisation.
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
    from . import KdistError

    if name not in KD_LOSSES:
        raise KdistError(f"unknown KD method {name!r}; choose one of {sorted(KD_LOSSES)}")
    return KD_LOSSES[name]


@register("hinton")
def hinton(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Soft-target KD (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

        kd = T^2 * mean_batch KL( softmax(z_t / T) || softmax(z_s / T) )

    The T^2 factor keeps the gradient scale of the soft term independent of T.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def _kl(p_teacher: torch.Tensor, p_student: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_teacher || p_student) of probability rows."""
    eps = 1e-12
    return (p_teacher * ((p_teacher + eps).log() - (p_student + eps).log())).sum(1)


@register("dkd")
def dkd(
    student_logits, teacher_logits, labels, temperature: float, beta: float = 8.0, tckd_weight: float = 1.0
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

        b = [p_y, 1 - p_y]                         binary target / non-target split, p = softmax(z / T)
        q = softmax over the non-target classes of z / T
        TCKD = KL(b_t || b_s),  NCKD = KL(q_t || q_s)
        kd = T^2 * mean_batch(tckd_weight * TCKD + beta * NCKD)

    Plain KD equals TCKD + (1 - p_t,y) NCKD; DKD frees NCKD from that damping factor.
    """
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    b_s = torch.stack([p_s[target], 1 - p_s[target]], dim=1)
    b_t = torch.stack([p_t[target], 1 - p_t[target]], dim=1)
    tckd = _kl(b_t, b_s)
    q_s = F.softmax((student_logits / temperature).masked_fill(target, -1e9), dim=1)
    q_t = F.softmax((teacher_logits / temperature).masked_fill(target, -1e9), dim=1)
    nckd = _kl(q_t, q_s)
    return temperature**2 * (tckd_weight * tckd + beta * nckd).mean()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


@register("dist")
def dist(
    student_logits, teacher_logits, labels, temperature: float, inter_weight: float = 1.0, intra_weight: float = 1.0
) -> torch.Tensor:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

        Y = softmax(z / T)                               (batch x classes)
        inter = mean_i (1 - pearson(Y_s[i, :], Y_t[i, :]))   relation between classes, per sample
        intra = mean_j (1 - pearson(Y_s[:, j], Y_t[:, j]))   relation between samples, per class
        kd = T^2 * (inter_weight * inter + intra_weight * intra)

    Matching correlations instead of exact probabilities tolerates a much stronger teacher.
    """
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = (1 - _pearson_rows(y_s, y_t)).mean()
    intra = (1 - _pearson_rows(y_s.T, y_t.T)).mean()
    return temperature**2 * (inter_weight * inter + intra_weight * intra)


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024):
    z -> (z - mean(z)) / std(z) per sample, so the student matches the teacher's logit *shape*, not
    its scale. Applied to student and teacher logits before any KD term (not to the CE term)."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-7)


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    method: str = "hinton",
    temperature: float = 4.0,
    standardize_logits: bool = False,
    options: dict | None = None,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd(z_s, z_t, y; T), CE(z_s, y)): the two parts of the distillation loss, z standardised first for
    kd if asked; `class_weights` and `label_smoothing` shape the CE term only (the teacher's soft targets are
    left as they are)."""
    z_s, z_t = (
        (standardize(student_logits), standardize(teacher_logits))
        if standardize_logits
        else (student_logits, teacher_logits)
    )
    kd = get_kd_loss(method)(z_s, z_t, labels, temperature, **(options or {}))
    return kd, F.cross_entropy(student_logits, labels, weight=class_weights, label_smoothing=label_smoothing)


def mix_terms(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * kd + (1 - alpha) * ce; with alpha = 1 exactly kd (no 0 x ce term, which a non-finite ce would spoil)."""
    return kd if alpha == 1.0 else alpha * kd + (1 - alpha) * ce
