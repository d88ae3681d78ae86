"""The Accelerator of a command: CPU or GPU processes, mixed precision, and how the global batch is split
among processes and accumulation steps. Used by every training and evaluation command."""

from __future__ import annotations

import ctypes
import os
import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs
from accelerate.utils.environment import str_to_bool

from . import KdistError
from .config import TrainerConfig
from .ranks import watch_for_errors


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX-512 BF16), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_requested(trainer: TrainerConfig) -> bool:
    """Whether CPU processes were asked for: `--cpu` (trainer.cpu), ACCELERATE_USE_CPU=true, or every GPU hidden
    with CUDA_VISIBLE_DEVICES=-1 (launch/cpu.yaml does that through its gpu_ids)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() == "-1"
    return bool(trainer.cpu) or str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) or hidden


def launched_for_gpus() -> bool:
    """Whether `accelerate launch` (or torchrun) started this process without asking for the CPU: a GPU launch."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ


def make_accelerator(trainer: TrainerConfig) -> Accelerator:
    """The one Accelerator of a command. Mixed precision: the config's, else the launcher's
    (`accelerate launch --mixed_precision bf16`), else none. CPU processes (gloo) run when asked for
    (cpu_requested) or for a plain one-process command on a machine without CUDA; a GPU launch where no CUDA
    device is visible stops with one line instead of running on the CPU."""
    use_cpu = cpu_requested(trainer)
    if not use_cpu and not torch.cuda.is_available():
        if launched_for_gpus():
            raise KdistError(
                f"this launch asks for GPUs but torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda}); fix the driver or the torch build (README: the cluster's Install), or "
                "run on CPUs with --config_file launch/cpu.yaml, ACCELERATE_USE_CPU=true or --cpu"
            )
        use_cpu = True  # a plain command (no launcher) on a machine without CUDA: one CPU process
    if not torch.distributed.is_initialized():  # a second command in one Python process (tests) starts afresh
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    from .tracking import log_with

    accelerator = Accelerator(
        cpu=use_cpu,
        log_with=log_with(trainer.tracker),
        mixed_precision=trainer.mixed_precision,
        # Steps are counted across epochs (kdist's train loader is not a prepared one).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=trainer.gradient_accumulation_steps, adjust_scheduler=False, sync_with_dataloader=False
        ),
        # kdist steps the scheduler itself, once per optimizer step: the schedule is one of optimizer steps,
        # whatever the process count (Accelerate would step it once per process, for per-process batches).
        step_scheduler_with_optimizer=False,
        # A hung collective fails in minutes, not Accelerate's default 30.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=trainer.timeout_s))],
    )
    watch_for_errors()  # any rank's error ends every rank within seconds (ranks.py)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch and image shapes: cuDNN's fastest kernels, chosen once
    if accelerator.device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # CPU runs (and resumes) repeat bit for bit
        # ...without deterministic mode's NaN-filling of every new tensor, which no kernel reads: it took 20% of
        # an online distillation step (profiled).
        torch.utils.deterministic.fill_uninitialized_memory = False
        keep_freed_memory()  # ...nor the page faults of memory handed back to the kernel after every step
        warn_if_bf16_is_emulated(accelerator.mixed_precision)
    return accelerator


def per_process_batch(batch_size: int, processes: int, accumulation: int) -> int:
    """The configured batch is the global batch of one optimizer step: each process takes
    batch_size / (processes x accumulation) samples per micro-step; a batch that does not divide is an error."""
    if batch_size % (processes * accumulation):
        share = batch_size // accumulation if batch_size % accumulation == 0 else None
        works = [n for n in range(1, (share or 0) + 1) if share % n == 0] if share else []
        raise KdistError(
            f"global batch {batch_size} does not divide into {processes} processes x {accumulation} accumulation "
            "steps; "
            + (
                f"process counts that work with {accumulation} accumulation step(s): {', '.join(map(str, works))}"
                if works
                else "choose a batch size divisible by trainer.gradient_accumulation_steps"
            )
            + "; or change batch_size (--set STAGE.batch_size=N)"
        )
    return batch_size // (processes * accumulation)


def describe_batch(accelerator: Accelerator, batch_size: int) -> str:
    """e.g. "4 processes on cpu: global batch 128 = 32 per process x 4 x 1 accumulation step"."""
    processes, accumulation = accelerator.num_processes, accelerator.gradient_accumulation_steps
    per_process = per_process_batch(batch_size, processes, accumulation)
    return (
        f"{processes} process{'es' if processes > 1 else ''} on {accelerator.device.type}: global batch {batch_size} = "
        f"{per_process} per process x {processes} x {accumulation} accumulation step{'s' if accumulation > 1 else ''}"
    )


def warn_if_bf16_is_emulated(mixed_precision: str) -> None:
    """Warn about bf16 on a CPU that emulates it: measured 35x slower than float32 on an AVX2-only EPYC."""
    if mixed_precision == "bf16" and not cpu_has_bf16():  # the probe runs only when bf16 is asked for
        warnings.warn(
            "mixed precision bf16 on a CPU without bf16 hardware (no AMX or AVX-512 BF16) trains far slower "
            "than float32 (35x measured); use --mixed-precision no",
            stacklevel=3,
        )


def keep_freed_memory() -> bool:
    """Keep the memory a training step frees in this process's heap, for the next step (glibc only; True where it
    applied).

    By default glibc maps every large buffer afresh and hands the heap's free top back to the kernel, so each step
    page-faults its activations in again: 0.84M minor faults and 1.6 s of system time per cached-distillation
    epoch here, a tenth of the epoch, 1.3M per online one (jemalloc and tcmalloc avoid it the same way).
    Now no buffer is mapped on its own and the heap keeps up to 1 GiB free: the process stays at its largest
    step's memory instead of giving it back between steps."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators keep memory their own way
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
