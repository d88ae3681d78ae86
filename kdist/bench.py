"""`kdist bench`: speed figures measured side by side in one run on this machine.

- student training throughput on synthetic tensors (model-only limit) and through kdist's data
  path (in-memory uint8 batches, batched dihedral augmentation, channels_last);
- one distillation epoch with the cached teacher, one with the online teacher, one supervised
  student epoch (engine.fit, same settings), and the cached one again in bf16 mixed precision
  (faster on CPUs with AMX, such as Sapphire Rapids, and on GPUs; slower on CPUs without bf16 units);
- one cached distillation epoch under `accelerate launch` with 1 and with 2 processes (bench_processes.py);
- inference latency of teacher and student at batch 1 and 256, parameters, FLOPs per image;
- the wall time of the latest `kdist run` (from a results.json).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .bench_processes import endless_batches, process_scaling
from .cache import teacher_cache
from .config import Config, TrainerConfig
from .data import apply_views, subset, to_float
from .engine import fit
from .inference import WithSoftmax, write_onnx
from .models import count_params, create_model
from .objectives import Distillation, Supervised
from .processes import cpu_has_bf16, make_accelerator
from .study_data import open_data, planned_dataset


def train_step(model, optimizer, images, labels):
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def throughput(cfg: Config, splits, mean, std, steps: int, shard_images=None) -> dict:
    """Images/s of student training steps fed by a fixed synthetic batch (the model-step limit), by the
    in-memory data path and, with `shard_images`, by webdataset shards (decoded in data.num_workers
    DataLoader workers); and of the shard path's data alone (decode + collate + augment, no model)."""
    batch_size = cfg.student.batch_size
    sources = {
        "synthetic": None,
        "data_path": lambda epoch: splits["train"][0].loader(batch_size, seed=0, epoch=epoch),
    }
    if shard_images is not None:
        sources["shards"] = lambda epoch: shard_images.loader(batch_size, seed=0, epoch=epoch)
    results = {}
    for source, make_loader in sources.items():
        torch.manual_seed(0)
        model = create_model(
            cfg.student_model.arch, mean, std, cfg.student_model.input_size, dataset=planned_dataset(cfg.data)
        ).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        size = splits["val"][0].shape[-1]
        fixed = (
            torch.rand(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last),
            torch.randint(0, planned_dataset(cfg.data).num_classes, (batch_size,)),
        )
        batches = endless_batches(make_loader) if make_loader else None
        done, start = 0, None
        for step in range(steps + 3):
            if step == 3:  # warm-up steps (and worker start-up) are not timed
                start, done = time.perf_counter(), 0
            if batches is None:
                images, labels = fixed
            else:
                raw, labels, _, views, _ = next(batches)
                images = to_float(apply_views(raw, views))
            train_step(model, optimizer, images, labels)
            done += len(labels)
        results[source] = done / (time.perf_counter() - start)
    out = {
        "synthetic_img_s": round(results["synthetic"], 1),
        "data_path_img_s": round(results["data_path"], 1),
        "data_path_over_synthetic": round(results["data_path"] / results["synthetic"], 3),
    }
    if shard_images is not None:
        batches, done = endless_batches(lambda epoch: shard_images.loader(batch_size, seed=0, epoch=epoch)), 0
        next(batches)
        start = time.perf_counter()
        for _ in range(steps):
            raw, labels, _, views, _ = next(batches)
            to_float(apply_views(raw, views))
            done += len(labels)
        data_only = done / (time.perf_counter() - start)
        out.update(
            {
                "shard_workers": shard_images.num_workers,
                "shard_path_img_s": round(results["shards"], 1),
                "shard_path_over_synthetic": round(results["shards"] / results["synthetic"], 3),
                "shard_data_only_img_s": round(data_only, 1),
                "shard_data_only_over_synthetic": round(data_only / results["synthetic"], 3),
            }
        )
    return out


def epoch_seconds(model, objective, stage, splits, mixed_precision: str = "no", cpu: bool = False) -> float:
    """Wall time of one training epoch through engine.fit (validation on a 128-image slice, one checkpoint)."""
    accelerator = make_accelerator(TrainerConfig(cpu=cpu, mixed_precision=mixed_precision, progress=False))
    short = {"train": splits["train"], "val": tuple(t[:128] for t in splits["val"])}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        fit(accelerator, model, objective, replace(stage, epochs=1), short, Path(folder), seed=0, progress=False)
        return time.perf_counter() - start


def epochs(cfg: Config, splits, mean, std, cache_dir: Path, shard_split=None) -> dict:
    """One epoch each: supervised student (from memory and, with `shard_split` (ShardImages, labels), from
    shards, as engine.fit reads them), distillation with cached teacher, with online teacher."""
    teacher = create_model(
        cfg.teacher_model.arch, mean, std, cfg.teacher_model.input_size, dataset=planned_dataset(cfg.data)
    ).eval()
    start = time.perf_counter()
    cache = teacher_cache(teacher, splits["train"][0].load(), splits["train"][1], cache_dir)
    cache_s = time.perf_counter() - start

    def student():
        torch.manual_seed(0)
        return create_model(
            cfg.student_model.arch, mean, std, cfg.student_model.input_size, dataset=planned_dataset(cfg.data)
        )

    cpu = cfg.trainer.cpu  # --cpu: every figure on the CPU, even where CUDA is present
    student_s = epoch_seconds(student(), Supervised(cfg.student), cfg.student, splits, cpu=cpu)
    shard_figures = {}
    if shard_split is not None:  # the same epoch with the train split streamed from shards: images/s against memory's
        shard_s = epoch_seconds(
            student(), Supervised(cfg.student), cfg.student, {**splits, "train": shard_split}, cpu=cpu
        )
        seen = len(shard_split[0].loader(cfg.student.batch_size, seed=0)) * cfg.student.batch_size  # whole batches only
        shard_figures = {
            "student_epoch_shards_s": round(shard_s, 2),
            "student_epoch_shards_over_memory": round((seen / shard_s) / (len(splits["train"][1]) / student_s), 3),
        }
    cached_s = epoch_seconds(
        student(), Distillation(cfg.distill, cfg.kd, teacher_logits_cache=cache), cfg.distill, splits, cpu=cpu
    )
    online_s = epoch_seconds(
        student(), Distillation(cfg.distill, cfg.kd, teacher=teacher), cfg.distill, splits, cpu=cpu
    )
    bf16_teacher = {}
    if torch.cuda.is_available() or cpu_has_bf16():  # the teacher alone in bf16, where the hardware has it
        kd = replace(cfg.kd, teacher_precision="bf16")
        seconds = epoch_seconds(student(), Distillation(cfg.distill, kd, teacher=teacher), cfg.distill, splits, cpu=cpu)
        bf16_teacher = {
            "distill_online_bf16_teacher_epoch_s": round(seconds, 2),
            "distill_online_bf16_teacher_over_32": round(seconds / online_s, 3),
        }
    cached_bf16_s = epoch_seconds(
        student(), Distillation(cfg.distill, cfg.kd, teacher_logits_cache=cache), cfg.distill, splits, "bf16", cpu
    )
    return {
        "student_epoch_s": round(student_s, 2),
        **shard_figures,
        "distill_cached_epoch_s": round(cached_s, 2),
        "distill_online_epoch_s": round(online_s, 2),
        "teacher_cache_build_s": round(cache_s, 2),
        "distill_cached_over_student": round(cached_s / student_s, 3),
        "distill_online_over_student": round(online_s / student_s, 3),
        **bf16_teacher,
        "distill_cached_bf16_epoch_s": round(cached_bf16_s, 2),
        "distill_cached_bf16_over_32": round(cached_bf16_s / cached_s, 3),
    }


STEP_PARTS = ("augment", "teacher_forward", "student_forward", "loss", "backward", "optimizer")


def online_breakdown(cfg: Config, splits, teacher, make_student, out: Path, steps: int = 20) -> dict:
    """Where an online distillation step's time goes: `steps` steps of engine.fit under the torch profiler,
    split by the engine's record_function regions (kdist/augment, teacher_forward, student_forward, loss,
    backward, optimizer); "other" is the rest of the step (reading the batch, per-step bookkeeping). In ms per
    step, with the step's wall time from the profiler's clock. The profiler's top operators go to
    <out>/online_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    stage = replace(cfg.distill, epochs=1)
    n = (steps + 1) * stage.batch_size
    positions = torch.arange(n)
    short = {"train": tuple(t[positions] for t in splits["train"]), "val": tuple(t[:128] for t in splits["val"])}
    objective = Distillation(cfg.distill, cfg.kd, teacher=teacher)
    accelerator = make_accelerator(TrainerConfig(cpu=cfg.trainer.cpu, mixed_precision="no", progress=False))
    with tempfile.TemporaryDirectory() as folder, profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(accelerator, make_student(), objective, stage, short, Path(folder), seed=0, progress=False)
    starts = sorted(event.time_range.start for event in prof.events() if event.name == "kdist/augment")[
        1:
    ]  # first step: warm-up
    step_ms = (starts[-1] - starts[0]) / (len(starts) - 1) / 1000
    totals = {part: 0.0 for part in STEP_PARTS}
    for event in prof.events():
        part = event.name.removeprefix("kdist/")
        if (
            event.name.startswith("kdist/")
            and part in totals
            and event.time_range.start >= starts[0]
            and event.time_range.start < starts[-1]
        ):
            totals[part] += event.time_range.elapsed_us() / 1000
    parts = {part: round(total / (len(starts) - 1), 2) for part, total in totals.items()}
    parts["other"] = round(step_ms - sum(parts.values()), 2)
    (out / "online_profile.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return {
        "step_ms": round(step_ms, 2),
        "parts_ms": parts,
        "teacher_share": round(parts["teacher_forward"] / step_ms, 3),
    }


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
        model = create_model(spec.arch, mean, std, spec.input_size, dataset=planned_dataset(cfg.data)).eval()
        with FlopCounterMode(display=False) as counter:
            with torch.inference_mode():
                model(torch.rand(1, 3, size, size))
        out[role] = {
            "arch": model.arch,
            "input_size": spec.input_size or size,
            "params": count_params(model),
            "flops_per_image": counter.get_total_flops(),
            "latency_ms_batch1": round(latency_ms(model, size, 1, 30), 2),
            "latency_ms_batch256": round(latency_ms(model, size, 256, 3), 1),
            **onnx_latency_ms(model, size, folder),
        }
    return out


def bench_data(cfg: Config) -> tuple[dict, list, list, tuple | None]:
    """The study's splits as training opens them (study_data.open_data) from the npz in memory; and the train
    split streamed from shards (data.shards, else the data file's cached shards; data.memory_mb 0 forces
    streaming, as for a split too large for memory), the same subset; None with --shards none."""
    accelerator = make_accelerator(TrainerConfig(cpu=cfg.trainer.cpu, progress=False))
    memory = open_data(replace(cfg.data, shards="none"), accelerator)
    splits = subset(memory.splits, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
    shard_split = None
    if cfg.data.shards and str(cfg.data.shards).lower() != "none":
        streamed = open_data(replace(cfg.data, memory_mb=0), accelerator)
        shard_split = subset(streamed.splits, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)["train"]
    return splits, memory.mean, memory.std, shard_split


def run_bench(
    cfg: Config, out: Path, steps: int = 30, results_json: Path | None = None, processes: bool = True
) -> dict:
    splits, mean, std, shard_split = bench_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "train_images": len(splits["train"][1]),
        "throughput": throughput(cfg, splits, mean, std, steps, shard_split and shard_split[0]),
        "epochs": epochs(cfg, splits, mean, std, out / "cache", shard_split),
        "models": model_figures(cfg, mean, std, cfg.data.size, out),
        "online_step": online_breakdown(
            cfg,
            splits,
            create_model(
                cfg.teacher_model.arch, mean, std, cfg.teacher_model.input_size, dataset=planned_dataset(cfg.data)
            ).eval(),
            lambda: create_model(
                cfg.student_model.arch, mean, std, cfg.student_model.input_size, dataset=planned_dataset(cfg.data)
            ),
            out,
            steps=max(2, min(steps, 20)),
        ),
    }
    if torch.cuda.is_available() and not cfg.trainer.cpu:  # the GPU's own figures; the rows above are the CPU's
        from .bench_cuda import cuda_figures

        report["cuda"] = cuda_figures(cfg, mean, std, cfg.data.size, steps)
    if processes:
        report["processes"] = process_scaling(cfg, out)
    if results_json and results_json.exists():
        report["run_wall_time_s"] = json.loads(results_json.read_text()).get("wall_time_s")
        report["run_results"] = str(results_json)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report


def format_bench(report: dict) -> str:
    t, e, o = report["throughput"], report["epochs"], report["online_step"]
    lines = [
        "student training throughput on the CPU (images/s)",
        f"  synthetic tensors   {t['synthetic_img_s']:10.1f}",
        f"  kdist data path    {t['data_path_img_s']:10.1f}   ratio {t['data_path_over_synthetic']:.3f}",
        *(
            [
                f"  shards, {t['shard_workers']} workers  {t['shard_path_img_s']:10.1f}   ratio "
                f"{t['shard_path_over_synthetic']:.3f}",
                f"  shards, data alone {t['shard_data_only_img_s']:10.1f}   ratio "
                f"{t['shard_data_only_over_synthetic']:.3f}  (read + collate + augment)",
                "  (shards that fit data.memory_mb are decoded once and are the data path itself; the shard rows "
                "stream)",
            ]
            if "shard_workers" in t
            else []
        ),
        "one training epoch (s)",
        f"  student alone       {e['student_epoch_s']:10.2f}",
        *(
            [
                f"  student, shards     {e['student_epoch_shards_s']:10.2f}   images/s over memory's "
                f"{e['student_epoch_shards_over_memory']:.3f}"
            ]
            if "student_epoch_shards_s" in e
            else []
        ),
        f"  distill, cached     {e['distill_cached_epoch_s']:10.2f}   / student {e['distill_cached_over_student']:.3f}",
        f"  distill, online     {e['distill_online_epoch_s']:10.2f}   / student {e['distill_online_over_student']:.3f}",
        f"  distill, cached bf16{e['distill_cached_bf16_epoch_s']:10.2f}   / 32-bit "
        f"{e['distill_cached_bf16_over_32']:.3f}",
        *(
            [
                f"  distill, online, bf16 teacher {e['distill_online_bf16_teacher_epoch_s']:.2f}   / 32-bit teacher "
                f"{e['distill_online_bf16_teacher_over_32']:.3f}"
            ]
            if "distill_online_bf16_teacher_epoch_s" in e
            else []
        ),
        f"  teacher cache build {e['teacher_cache_build_s']:10.2f}   (once per teacher)",
        f"an online distillation step (ms, torch profiler; top operators in online_profile.txt): {o['step_ms']:.1f}",
        "  " + "  ".join(f"{part} {ms:.1f}" for part, ms in o["parts_ms"].items()),
        "inference (CPU)                     params  MFLOPs/img  torch ms@1  ms@256  onnxruntime ms@1  ms@256",
    ]
    for role, m in report["models"].items():
        lines.append(
            f"  {role:8s} {m['arch']:16s} {m['input_size']:3d}px {m['params'] / 1e6:5.2f}M  "
            f"{m['flops_per_image'] / 1e6:9.1f}  "
            f"{m['latency_ms_batch1']:10.2f}  {m['latency_ms_batch256']:6.1f}  {m['onnx_latency_ms_batch1']:16.2f}  "
            f"{m['onnx_latency_ms_batch256']:6.1f}"
        )
    if report.get("processes"):
        p = report["processes"]
        lines += [
            "one cached distillation epoch under accelerate launch (images/s)",
            f"  1 process ({p['processes1_threads']} threads)  {p['processes1_img_s']:8.1f}",
            f"  2 processes ({p['processes2_threads']} thread each) {p['processes2_img_s']:6.1f}   ratio "
            f"{p['processes2_over_1']:.3f}",
            "a distillation step on 2 processes: the loss on the gathered global batch vs each process's own (ms)",
            f"  gathered {p['gather_step_ms']:8.2f}   local {p['local_step_ms']:8.2f}   ratio "
            f"{p['gather_over_local']:.3f}",
        ]
    if report.get("cuda"):
        from .bench_cuda import format_cuda

        lines += format_cuda(report["cuda"])
    if report.get("run_wall_time_s"):
        lines.append(f"kdist run wall time  {report['run_wall_time_s'] / 60:.1f} min  ({report['run_results']})")
    return "\n".join(lines)
