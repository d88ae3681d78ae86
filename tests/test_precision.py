"""Precision and the frozen teacher, as a GPU run would meet them, shown on a CPU: fp16 overflow steps are
skipped and counted (a CPU GradScaler stands in for CUDA's), the teacher never computes in fp16, metrics are
recorded in float32 under any launch precision, a SyncBatchNorm teacher is folded, a teacher that fails to
compile runs eagerly, and `kd.teacher_mode: auto` takes the path that works."""

from __future__ import annotations

import csv

import pytest
import torch

from kdist import KdistError
from kdist import engine as engine_module
from kdist.config import KDConfig, StageConfig, TrainerConfig
from kdist.data import MemoryImages
from kdist.engine import fit
from kdist.models import create_model, fold_batchnorm
from kdist.objectives import Distillation, Supervised, teacher_dtype
from kdist.processes import cpu_has_bf16, make_accelerator
from kdist.scoring import gathered_logits


class Overflowing(Supervised):
    """Cross-entropy whose loss is non-finite on the calls listed in `bad` (what an fp16 overflow produces)."""

    def __init__(self, stage, bad):
        super().__init__(stage)
        self.bad, self.calls = bad, 0

    def loss(self, logits, labels, targets=None, mix=None):
        loss, parts = super().loss(logits, labels, targets, mix)
        self.calls += 1
        return (loss * float("nan") if self.calls in self.bad else loss), parts


def small_splits(n=64):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 7, (n,), generator=generator)
    return {"train": (MemoryImages(images, labels), labels), "val": (images[:16], labels[:16])}


def scaled_accelerator():
    """A CPU Accelerator with a loss scaler, as fp16 on CUDA has (Accelerate gives none on CPUs)."""
    accelerator = make_accelerator(TrainerConfig(progress=False))
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def test_fp16_overflow_steps_are_skipped_counted_and_leave_the_schedule(tmp_path):
    stage = StageConfig(epochs=1, batch_size=16, schedule="cosine", lr=1e-3)  # 4 steps per epoch
    fit(
        scaled_accelerator(),
        create_model("student"),
        Overflowing(stage, {2, 3}),
        stage,
        small_splits(),
        tmp_path / "s",
        seed=0,
        progress=False,
    )
    row = next(csv.DictReader(open(tmp_path / "s" / "metrics.csv")))
    assert float(row["train/skipped_steps"]) == 2
    # cosine over 4 steps, 2 of them taken: half the peak (4 taken would give 0)
    assert float(row["lr"]) == pytest.approx(0.5e-3)


def test_fp16_stops_after_many_skipped_steps_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_SKIPPED_IN_A_ROW", 3)
    stage = StageConfig(epochs=1, batch_size=16)
    with pytest.raises(KdistError, match="3 optimizer steps in a row skipped.*fp16"):
        fit(
            scaled_accelerator(),
            create_model("student"),
            Overflowing(stage, {1, 2, 3}),
            stage,
            small_splits(),
            tmp_path / "s",
            seed=0,
            progress=False,
        )


def test_without_a_scaler_a_non_finite_loss_stops_the_run(tmp_path):
    stage = StageConfig(epochs=1, batch_size=16)
    accelerator = make_accelerator(TrainerConfig(progress=False))
    with pytest.raises(KdistError, match="non-finite loss by epoch 0, step 1"):
        fit(
            accelerator,
            create_model("student"),
            Overflowing(stage, {2}),
            stage,
            small_splits(),
            tmp_path / "s",
            seed=0,
            progress=False,
        )


def test_the_teacher_never_computes_in_fp16():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert teacher_dtype("same", "fp16", cpu) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert teacher_dtype("same", "no", cpu) == torch.float32
    assert teacher_dtype("same", "bf16", cuda) == teacher_dtype("bf16", "no", cuda) == torch.bfloat16
    teacher = Distillation(StageConfig(), KDConfig(), teacher=create_model("student"), mixed_precision="fp16")
    teacher.to("cpu")
    assert {p.dtype for p in teacher.teacher.parameters()} == {teacher.teacher_dtype} != {torch.float16}


def test_metrics_are_recorded_in_float32_under_a_bf16_launch():
    torch.manual_seed(0)
    model, images = create_model("student"), torch.randint(0, 256, (12, 3, 28, 28), dtype=torch.uint8)
    labels = torch.zeros(12, dtype=torch.long)
    plain = gathered_logits(make_accelerator(TrainerConfig()), model, images, labels)[0]
    bf16 = make_accelerator(TrainerConfig(mixed_precision="bf16"))
    prepared = bf16.prepare(model)  # Accelerate wraps its forward in bf16 autocast
    assert not torch.equal(prepared(images.float() / 255).float(), model.__class__.forward(model, images.float() / 255))
    torch.testing.assert_close(gathered_logits(bf16, prepared, images, labels)[0], plain, atol=1e-6, rtol=1e-6)
    assert "forward" in prepared.__dict__  # the wrapper is back for training


def test_a_syncbatchnorm_teacher_is_folded():
    torch.manual_seed(0)
    model = create_model("teacher", input_size=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
    images = torch.rand(2, 3, 28, 28)
    expected = model(images)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()  # as fit returns it from several GPUs
    folded = fold_batchnorm(synced)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(images), expected, atol=1e-4, rtol=1e-4)


def test_a_teacher_that_fails_to_compile_runs_eagerly(capfd, monkeypatch):
    def broken_compile(model, **kwargs):
        def fails(images):
            raise RuntimeError("InductorError: no C compiler found\nmore")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    teacher = create_model("student").eval()
    compiled = Distillation(StageConfig(), KDConfig(compile_teacher=True), teacher=teacher)
    eager = Distillation(StageConfig(), KDConfig(), teacher=teacher)
    images, indices, views = torch.rand(4, 3, 28, 28), torch.arange(4), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(
        compiled.teacher_logits(images, indices, views), eager.teacher_logits(images, indices, views)
    )
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "compiling the teacher failed (RuntimeError: InductorError" in err
    assert "runs eagerly" in err and compiled.teacher is compiled.eager_teacher


def test_the_gpu_bench_figures_are_computed_and_named(monkeypatch):
    """kdist bench's CUDA section, run here on the CPU (the function takes the device): every figure is there,
    and the peak comes from the named device's data sheet (the PCIe H100 before the SXM one)."""
    from kdist.bench_cuda import cuda_figures, format_cuda, peak_tflops
    from kdist.config import QUICK, load_config

    cfg = load_config(None, [QUICK, {"distill": {"batch_size": 8}}])
    figures = cuda_figures(cfg, [0.5] * 3, [0.25] * 3, 28, steps=1, device=torch.device("cpu"))
    for precision in ("fp32", "bf16"):
        row = figures[precision]
        assert row["student_step_flops_per_image"] > 1e6 and row["online_step_img_s"] > 0
        assert row["peak_tflops"] is None and row["student_step_fraction_of_peak"] is None
    assert len(format_cuda(figures)) == 3
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4 and peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.2


@pytest.mark.gpu
def test_fp16_on_cuda_skips_overflow_steps_with_accelerates_scaler(tmp_path):
    stage = StageConfig(epochs=1, batch_size=16, schedule="cosine", lr=1e-3)
    accelerator = make_accelerator(TrainerConfig(mixed_precision="fp16", progress=False))
    assert accelerator.device.type == "cuda" and accelerator.scaler is not None
    fit(accelerator, create_model("student"), Overflowing(stage, {2}), stage, small_splits(), tmp_path / "s", seed=0,
        progress=False)  # fmt: skip
    row = next(csv.DictReader(open(tmp_path / "s" / "metrics.csv")))
    assert float(row["train/skipped_steps"]) >= 1  # the NaN step, and any the scaler's first scale overflowed


@pytest.mark.gpu
def test_the_gpu_bench_on_cuda():
    from kdist.bench_cuda import cuda_figures
    from kdist.config import QUICK, load_config

    figures = cuda_figures(load_config(None, [QUICK]), [0.5] * 3, [0.25] * 3, 28, steps=5)
    assert figures["bf16"]["student_step_img_s"] > 0 and figures["device"] == torch.cuda.get_device_name()
