"""Mixup/CutMix on the online path: one mixing per batch, applied before both models, so the teacher's
targets are for the very images the student sees; the label loss of a mixed batch uses mixed labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdist import KdistError
from kdist.config import KDConfig, StageConfig, TrainerConfig
from kdist.data import MemoryImages, mix_batch
from kdist.engine import fit
from kdist.models import create_model
from kdist.objectives import Distillation, Supervised
from kdist.processes import make_accelerator


def test_mixup_is_a_convex_blend_and_repeats_from_its_seed():
    images = torch.rand(6, 3, 8, 8)
    mixed, (lam, perm) = mix_batch(images, np.random.default_rng(3), mixup_alpha=0.4)
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])
    again, (lam2, perm2) = mix_batch(images, np.random.default_rng(3), mixup_alpha=0.4)
    assert lam2 == lam and torch.equal(perm2, perm) and torch.equal(again, mixed)


def test_cutmix_pastes_one_box_and_reports_its_area():
    images = torch.rand(4, 3, 16, 16)
    mixed, (lam, perm) = mix_batch(images, np.random.default_rng(0), cutmix_alpha=1.0)
    from_other = (mixed != images).any(dim=1)  # pixels that came from the partner image
    pasted = (mixed == images[perm]).all(dim=1) & from_other
    for i in range(4):
        if perm[i] != i:
            assert pasted[i].sum().item() == pytest.approx((1 - lam) * 256, abs=1)


def test_mixed_cross_entropy_weights_both_labels():
    logits, labels = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    perm = torch.tensor([1, 0, 3, 2])
    loss, _ = Supervised(StageConfig()).loss(logits, labels, mix=(0.3, perm))
    torch.testing.assert_close(
        loss, 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(logits, labels[perm])
    )


def test_teacher_and_student_receive_the_identical_mixed_batch(tmp_path):
    torch.manual_seed(0)
    n = 64
    images, labels = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8), torch.randint(0, 7, (n,))
    splits = {"train": (MemoryImages(images, labels), labels), "val": (images[:16], labels[:16])}
    teacher, student = create_model("student").eval(), create_model("student")
    seen = {"teacher": [], "student": []}
    teacher.register_forward_pre_hook(lambda module, args: seen["teacher"].append(args[0].detach().clone()))
    student.register_forward_pre_hook(
        lambda module, args: seen["student"].append(args[0].detach().clone()) if module.training else None
    )
    stage = StageConfig(epochs=1, batch_size=16, mixup_alpha=0.4, cutmix_alpha=1.0)
    accelerator = make_accelerator(TrainerConfig(progress=False))
    objective = Distillation(stage, KDConfig(), teacher=teacher, mixed_precision=accelerator.mixed_precision)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one teacher call per batch (with more threads, one per chunk: test_cache.py)
    try:
        fit(accelerator, student, objective, stage, splits, tmp_path / "distilled", seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    # teacher calls: 4 training batches, then none (no val teacher logits given)
    assert len(seen["student"]) == 4 and len(seen["teacher"]) == 4
    for shown_to_student, shown_to_teacher in zip(seen["student"], seen["teacher"]):
        assert torch.equal(shown_to_student, shown_to_teacher)
    unmixed = [batch for batch in seen["student"] if ((batch * 255).round() - batch * 255).abs().max() < 1e-4]
    assert len(unmixed) < 4  # the batches really were mixed (not whole uint8 levels any more)


def test_mixup_with_the_cached_teacher_is_refused():
    cache = torch.zeros(8, 8, 7)
    objective = Distillation(StageConfig(mixup_alpha=0.4), KDConfig(), teacher_logits_cache=cache)
    with pytest.raises(KdistError, match="teacher_mode: online"):
        targets = objective.targets(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 0]))
        objective.loss(torch.randn(2, 7), torch.tensor([0, 1]), targets, mix=(0.5, torch.tensor([1, 0])))


@pytest.mark.processes
def test_two_processes_mix_as_one_does(tmp_path, synthetic_root):
    """Mixup and CutMix draw partners over the global batch: under 2 processes each process gathers the batch's
    uint8 images and builds the partners it needs, and trains the weights of one process to float rounding."""
    import subprocess
    import sys

    from launching import kdist_env, launch
    from test_world_size import relative_l2

    args = ["-m", "kdist.train", "student", "--quick", "--no-progress", "--val-only", "--shards", "none",
            "--set", "data.train_subset=256", "--set", "data.val_subset=64", "--set", "student.epochs=1",
            "--set", "student.mixup_alpha=0.4", "--set", "student.cutmix_alpha=1.0"]  # fmt: skip
    env = kdist_env(synthetic_root, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", tmp_path / "one"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(launch("--num_processes", 2, *args, "--out", tmp_path / "two"), env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert relative_l2(tmp_path / "one" / "student.safetensors", tmp_path / "two" / "student.safetensors") < 1e-4
