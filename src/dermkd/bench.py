"""`dermkd bench`: speed figures measured side by side in one run on this machine.

- student training throughput on synthetic tensors (model-only limit) and through dermkd's data
  path (in-memory uint8 batches, batched dihedral augmentation, channels_last);
- one distillation epoch with the cached teacher, one with the online teacher, one supervised
  student epoch (Lightning fit, same settings), and the cached one again in bf16 mixed precision
  (faster on CPUs with AMX, such as Sapphire Rapids, and on GPUs; slower on CPUs without bf16 units);
- inference latency of teacher and student at batch 1 and 256, parameters, FLOPs per image;
- the wall time of the latest `dermkd run` (from a results.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .cache import teacher_cache
from .config import Config
from .data import DermaDataModule, apply_views, batch_loader, channel_stats, load_dermamnist, subset, to_float
from .lit import DistillModule, SupervisedModule
from .inference import WithSoftmax, write_onnx
from .models import count_params, create_model


def _train_step(model, optimizer, images, labels):
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def throughput(cfg: Config, splits, mean, std, steps: int) -> dict:
    """Images/s of student training steps: fixed synthetic batch vs dermkd's data path."""
    batch_size = cfg.student.batch_size
    results = {}
    for source in ("synthetic", "data_path"):
        torch.manual_seed(0)
        model = create_model(cfg.student_model.arch, mean, std, cfg.student_model.input_size).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        size = splits["train"][0].shape[-1]
        fixed = (torch.rand(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last), torch.randint(0, 7, (batch_size,)))
        loader = iter(batch_loader(*splits["train"], batch_size, shuffle=True))
        done, start = 0, None
        for step in range(steps + 3):
            if step == 3:  # warm-up steps are not timed
                start, done = time.perf_counter(), 0
            if source == "synthetic":
                images, labels = fixed
            else:
                try:
                    raw, labels, _, views, _ = next(loader)
                except StopIteration:
                    loader = iter(batch_loader(*splits["train"], batch_size, shuffle=True))
                    raw, labels, _, views, _ = next(loader)
                images = to_float(apply_views(raw, views))
            _train_step(model, optimizer, images, labels)
            done += len(labels)
        results[source] = done / (time.perf_counter() - start)
    return {"synthetic_img_s": round(results["synthetic"], 1), "data_path_img_s": round(results["data_path"], 1),
            "data_path_over_synthetic": round(results["data_path"] / results["synthetic"], 3)}


def epoch_seconds(module, splits, batch_size: int, precision: str = "32-true") -> float:
    trainer = L.Trainer(max_epochs=1, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, precision=precision)
    start = time.perf_counter()
    trainer.fit(module, datamodule=DermaDataModule(splits, batch_size))
    return time.perf_counter() - start


def epochs(cfg: Config, splits, mean, std, cache_dir: Path) -> dict:
    """One epoch each: supervised student, distillation with cached teacher, with online teacher."""
    teacher = create_model(cfg.teacher_model.arch, mean, std, cfg.teacher_model.input_size).eval()
    start = time.perf_counter()
    cache = teacher_cache(teacher, *splits["train"], cache_dir)
    cache_s = time.perf_counter() - start

    def student():
        torch.manual_seed(0)
        return create_model(cfg.student_model.arch, mean, std, cfg.student_model.input_size)

    student_s = epoch_seconds(SupervisedModule(student(), cfg.student), splits, cfg.student.batch_size)
    cached_s = epoch_seconds(DistillModule(student(), cfg.distill, cfg.kd, teacher_logits_cache=cache), splits, cfg.distill.batch_size)
    online_s = epoch_seconds(DistillModule(student(), cfg.distill, cfg.kd, teacher=teacher), splits, cfg.distill.batch_size)
    cached_bf16_s = epoch_seconds(DistillModule(student(), cfg.distill, cfg.kd, teacher_logits_cache=cache), splits,
                                  cfg.distill.batch_size, precision="bf16-mixed")
    return {"student_epoch_s": round(student_s, 2), "distill_cached_epoch_s": round(cached_s, 2),
            "distill_online_epoch_s": round(online_s, 2), "teacher_cache_build_s": round(cache_s, 2),
            "distill_cached_over_student": round(cached_s / student_s, 3),
            "distill_online_over_student": round(online_s / student_s, 3),
            "distill_cached_bf16_epoch_s": round(cached_bf16_s, 2), "distill_cached_bf16_over_32": round(cached_bf16_s / cached_s, 3)}


@torch.inference_mode()
def latency_ms(model, size: int, batch: int, repeats: int) -> float:
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        model(x)
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return 1000 * (time.perf_counter() - start) / repeats


def onnx_latency_ms(model, size: int, folder: Path) -> dict:
    """ONNX Runtime (CPU provider) latency of the exported model at batch 1 and 256."""
    import onnxruntime

    path = folder / f"{model.arch}.onnx"
    write_onnx(WithSoftmax(model.to(memory_format=torch.contiguous_format)), size, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = {}
    for batch, repeats in ((1, 30), (256, 3)):
        x = np.random.rand(batch, 3, size, size).astype(np.float32)
        session.run(None, {"images": x})
        start = time.perf_counter()
        for _ in range(repeats):
            session.run(None, {"images": x})
        out[f"onnx_latency_ms_batch{batch}"] = round(1000 * (time.perf_counter() - start) / repeats, 2)
    return out


def model_figures(cfg: Config, mean, std, size: int, folder: Path) -> dict:
    out = {}
    for role, spec in (("teacher", cfg.teacher_model), ("student", cfg.student_model)):
        model = create_model(spec.arch, mean, std, spec.input_size).eval()
        with FlopCounterMode(display=False) as counter:
            with torch.inference_mode():
                model(torch.rand(1, 3, size, size))
        out[role] = {"arch": model.arch, "input_size": spec.input_size or size, "params": count_params(model),
                     "flops_per_image": counter.get_total_flops(),
                     "latency_ms_batch1": round(latency_ms(model, size, 1, 30), 2),
                     "latency_ms_batch256": round(latency_ms(model, size, 256, 3), 1),
                     **onnx_latency_ms(model, size, folder)}
    return out


def run_bench(cfg: Config, out: Path, steps: int = 30, results_json: Path | None = None) -> dict:
    full = load_dermamnist(cfg.data.root, cfg.data.size, cfg.data.download)
    mean, std = channel_stats(full["train"][0])
    splits = subset(full, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "train_images": len(splits["train"][1]),
        "throughput": throughput(cfg, splits, mean, std, steps),
        "epochs": epochs(cfg, splits, mean, std, out / "cache"),
        "models": model_figures(cfg, mean, std, cfg.data.size, out),
    }
    if results_json and results_json.exists():
        report["run_wall_time_s"] = json.loads(results_json.read_text()).get("wall_time_s")
        report["run_results"] = str(results_json)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report


def format_bench(report: dict) -> str:
    t, e = report["throughput"], report["epochs"]
    lines = [
        "student training throughput (images/s)",
        f"  synthetic tensors   {t['synthetic_img_s']:10.1f}",
        f"  dermkd data path    {t['data_path_img_s']:10.1f}   ratio {t['data_path_over_synthetic']:.3f}",
        "one training epoch (s)",
        f"  student alone       {e['student_epoch_s']:10.2f}",
        f"  distill, cached     {e['distill_cached_epoch_s']:10.2f}   / student {e['distill_cached_over_student']:.3f}",
        f"  distill, online     {e['distill_online_epoch_s']:10.2f}   / student {e['distill_online_over_student']:.3f}",
        f"  distill, cached bf16{e['distill_cached_bf16_epoch_s']:10.2f}   / 32-bit {e['distill_cached_bf16_over_32']:.3f}",
        f"  teacher cache build {e['teacher_cache_build_s']:10.2f}   (once per teacher)",
        "inference (CPU)                     params  MFLOPs/img  torch ms@1  ms@256  onnxruntime ms@1  ms@256",
    ]
    for role, m in report["models"].items():
        lines.append(f"  {role:8s} {m['arch']:16s} {m['input_size']:3d}px {m['params'] / 1e6:5.2f}M  {m['flops_per_image'] / 1e6:9.1f}  "
                     f"{m['latency_ms_batch1']:10.2f}  {m['latency_ms_batch256']:6.1f}  {m['onnx_latency_ms_batch1']:16.2f}  {m['onnx_latency_ms_batch256']:6.1f}")
    if report.get("run_wall_time_s"):
        lines.append(f"dermkd run wall time  {report['run_wall_time_s'] / 60:.1f} min  ({report['run_results']})")
    return "\n".join(lines)
