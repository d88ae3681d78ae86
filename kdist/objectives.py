"""What a training batch costs: cross-entropy on the labels (Supervised), or distillation from a frozen teacher
run online or looked up in the exact cache (Distillation); and the global batch gathered from every process,
on which the loss is computed (gather_batch)."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from . import KdistError
from .cache import logits_for_all_views
from .config import KDConfig, StageConfig
from .losses import distillation_terms, mix_terms
from .models import frozen_copy
from .processes import cpu_has_bf16, warn_if_bf16_is_emulated


@functools.cache
def single_thread_pool(workers: int) -> ThreadPoolExecutor:
    """`workers` threads, each running torch ops on one intra-op thread; one pool per size for the process."""
    return ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))


class Objective(Protocol):
    """What the training loop asks of an objective (Supervised, Distillation): each process computes the
    `targets` of its own samples (a teacher's logits, or None); `loss` sees the batch gathered from every process."""

    def to(self, device) -> "Objective": ...

    def targets(self, images, indices, views) -> torch.Tensor | None: ...

    def loss(self, logits, labels, targets=None, mix=None) -> tuple[torch.Tensor, dict]: ...


class Supervised:
    """Cross-entropy on the labels (optionally class-weighted and label-smoothed)."""

    def __init__(self, stage: StageConfig, class_weights: torch.Tensor | None = None):
        self.stage, self.class_weights = stage, class_weights

    def to(self, device):
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(device)
        return self

    def cross_entropy(self, logits, labels, mix=None) -> torch.Tensor:
        """Cross-entropy on the labels, or on the mixed labels of a mixed batch:
        lam * CE(y) + (1 - lam) * CE(y[perm])."""

        def ce(targets):
            smoothing = self.stage.label_smoothing
            return F.cross_entropy(logits, targets, weight=self.class_weights, label_smoothing=smoothing)

        if mix is None:
            return ce(labels)
        lam, perm = mix
        return lam * ce(labels) + (1 - lam) * ce(labels[perm])

    def targets(self, images, indices, views) -> torch.Tensor | None:
        """Per-sample targets besides the labels, computed on each process for its own samples (none here)."""
        return None

    def loss(self, logits, labels, targets=None, mix=None) -> tuple[torch.Tensor, dict]:
        """The loss of a batch (under several processes: the global batch, gathered) and its parts."""
        return self.cross_entropy(logits, labels, mix), {}


class Distillation(Supervised):
    """alpha * KD(student, teacher; T) + (1 - alpha) * CE, per the KD registry (losses.py).

    The teacher's logits come from `teacher_logits_cache` (N, 8 views, C), looked up by dataset index and
    dihedral view, or from the frozen `teacher` run on the very batch the student sees (online). With
    kd.teacher_views = mean the target is the teacher's mean over all 8 views instead.
    """

    def __init__(
        self,
        stage: StageConfig,
        kd: KDConfig,
        teacher=None,
        teacher_logits_cache=None,
        class_weights=None,
        mixed_precision: str = "no",
    ):
        super().__init__(stage, class_weights)
        if (teacher is None) == (teacher_logits_cache is None):
            raise ValueError("give exactly one of teacher and teacher_logits_cache")
        self.kd, self.teacher, self.cache = kd, teacher, teacher_logits_cache
        self.mixed_precision = mixed_precision  # the student's; the teacher's dtype follows from it in to()
        self.teacher_dtype = torch.float32
        self.teacher_pool, self.teacher_threads = None, 1  # on CPUs: one thread per core, see to()
        if teacher is not None:
            self.teacher = self.eager_teacher = frozen_copy(teacher)  # BatchNorms folded: the same logits, faster
            if kd.compile_teacher:  # compiled lazily, on the first batch, on the device the teacher is then on
                self.teacher = torch.compile(self.teacher, options={"freezing": True})

    def to(self, device):
        super().to(device)
        device = torch.device(device)
        if self.teacher is not None:
            # The frozen teacher is cast once to the dtype it runs in, not by autocast on every forward.
            self.teacher_dtype = teacher_dtype(self.kd.teacher_precision, self.mixed_precision, device)
            self.teacher.to(device=device, dtype=self.teacher_dtype)
            threads = torch.get_num_threads()
            if device.type == "cpu" and threads > 1 and not self.kd.compile_teacher and not self.teacher_pool:
                # On CPUs the frozen teacher runs as one chunk of the batch per core, each on its own thread with
                # one intra-op thread: 1.2-1.3x faster than one forward on every core (EfficientNet-B0, 2 cores,
                # benchmarks/teacher_forward.py), the same logits (eval mode: each sample's are its own).
                self.teacher_pool, self.teacher_threads = single_thread_pool(threads), threads
        if self.cache is not None:
            self.cache = self.cache.to(device)
        return self

    def teacher_logits(self, images, indices, views) -> torch.Tensor:
        mean_over_views = self.kd.teacher_views == "mean"
        if self.cache is not None:
            return self.cache[indices].mean(dim=1) if mean_over_views else self.cache[indices, views]
        if self.teacher_pool is None:
            return self.teacher_forward(images)
        with torch.inference_mode():
            chunks = images.chunk(self.teacher_threads)
            return torch.cat(list(self.teacher_pool.map(self.teacher_forward, chunks)))

    def teacher_forward(self, images) -> torch.Tensor:
        """The frozen teacher's float32 logits for `images` (inference mode is per thread: set here). A teacher
        that fails to compile (no C toolchain on the node, a compiler bug) runs eagerly instead, said in one line."""
        with torch.inference_mode():
            images = images.to(self.teacher_dtype)
            try:
                logits = self.run_teacher(images)
            except Exception as exc:
                if self.teacher is self.eager_teacher:
                    raise
                reason = (str(exc).strip().splitlines() or [""])[0][:160]
                print(
                    f"kdist: rank {os.environ.get('RANK', '0')}: compiling the teacher failed ({type(exc).__name__}: "
                    f"{reason}); it runs eagerly",
                    file=sys.stderr,
                    flush=True,
                )
                self.teacher = self.eager_teacher
                logits = self.run_teacher(images)
            return logits.float()

    def run_teacher(self, images) -> torch.Tensor:
        if self.kd.teacher_views == "mean":
            # The 8 views of a view are the 8 views of the original image (a group), so nothing to undo.
            return logits_for_all_views(self.teacher, images).mean(dim=1)
        return self.teacher(images)

    def targets(self, images, indices, views) -> torch.Tensor:
        return self.teacher_logits(images, indices, views)

    def loss(self, logits, labels, targets=None, mix=None):
        kd = self.kd
        if mix is not None and self.cache is not None:
            raise KdistError(
                "mixup/cutmix needs the teacher online (kd.teacher_mode: online): the cache holds its outputs on "
                "unmixed images"
            )
        kd_term, ce_term = distillation_terms(
            logits,
            targets,
            labels,
            kd.method,
            kd.temperature,
            kd.standardize,
            kd.options,
            self.class_weights,
            self.stage.label_smoothing,
        )
        if mix is not None:  # the teacher saw the mixed batch; the labels only count on request, mixed
            ce_term = self.cross_entropy(logits, labels, mix)
        alpha = kd.alpha if mix is None or kd.mixed_ce else 1.0
        loss = mix_terms(kd_term, ce_term, alpha)
        return loss, {"kd": kd_term.detach(), "ce": ce_term.detach()}


def teacher_dtype(teacher_precision: str, student_precision: str, device: torch.device) -> torch.dtype:
    """What the frozen teacher computes in: bfloat16 for kd.teacher_precision bf16 or a bf16 student; never
    float16, whose range overflows without a loss scaler: under an fp16 student, bfloat16 where the device
    computes it, else float32."""
    if teacher_precision == "bf16" or student_precision == "bf16":
        if device.type == "cpu":
            warn_if_bf16_is_emulated("bf16")
        return torch.bfloat16
    if student_precision == "fp16":
        hardware = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
        return torch.bfloat16 if hardware else torch.float32
    return torch.float32


def gather_batch(accelerator: Accelerator, logits: torch.Tensor, *others):
    """The global (micro-)batch on every process: the student's logits gathered with their gradients
    (torch.distributed.nn.functional.all_gather), the labels and targets without. A loss computed on these is
    the 1-process loss of the global batch, batch-level terms included (DIST's intra-class relation, class-
    weighted means). Its gradient on each process is N times its share (all_gather's backward sums the N
    identical losses' gradients) and DDP averages over N: the 1-process gradient."""
    if accelerator.num_processes == 1:
        return (logits, *others)
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():  # deprecated in favour of functional collectives, which have no autograd on gloo
        warnings.simplefilter("ignore", FutureWarning)
        gathered = torch.cat(dist_nn.all_gather(logits))
    return (gathered, *(None if t is None else accelerator.gather(t) for t in others))
