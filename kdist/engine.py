"""The training loop on Hugging Face Accelerate, shared by teacher, student and distillation.

Accelerate owns the device, DDP, mixed precision, gradient accumulation and clipping; `fit` is the plain
loop of accelerate's examples (complete_cv_example.py, by_feature/checkpointing.py):

- the model, optimizer and scheduler go through `accelerator.prepare` (kdist steps the scheduler once per
  optimizer step); val batches come from a prepared loader (each process a shard) and are gathered with
  `gather_for_metrics`, which drops the padding duplicates, so val metrics under N processes are those of one;
- a stage's batch_size is the global batch: train batches come from kdist's own sampler
  (data.EpochBatchSampler: each process its slice of every micro-batch of one (seed, epoch) order) or, for
  shards too large for memory, streamed (shard_data.ShardImages), not a prepared loader; the loss is computed
  on the micro-batch gathered from every process (objectives.gather_batch), so N processes train as one does
  and a resumed run repeats an uninterrupted one;
- what a batch costs is an objective (objectives.py): cross-entropy, or distillation from a frozen teacher
  outside DDP fed the same augmented batch (online), or the exact cache (cached);
- every epoch ends with `save_state` into <stage>/checkpoints/last (checkpoints.py); `--resume` goes on from it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.profiler import record_function

from . import KdistError
from .checkpoints import (
    StopRequested,
    StopWatch,
    TrainState,
    chosen_checkpoint,
    load_kept_weights,
    restore_random_state,
    save_last,
    write_history,
)
from .config import StageConfig
from .data import audited, augment, derive_seed, mix_batch, photo_augment, photo_draws
from .models import save_weights
from .objectives import Objective, gather_batch
from .processes import describe_batch
from .scoring import gathered_logits
from .tracking import epoch_bar

SYNC_EVERY = 25  # on GPUs: steps between host syncs (stop requests, non-finite losses)
MAX_SKIPPED_IN_A_ROW = 50  # fp16: optimizer steps in a row skipped for overflow before the run stops


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, momentum=0.9, nesterov=True, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)


def make_scheduler(optimizer, stage: StageConfig, total_steps: int):
    if stage.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=stage.lr, total_steps=total_steps, pct_start=0.15)
    if stage.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# --- the loop -------------------------------------------------------------------------------------------


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    objective: Objective,
    stage: StageConfig,
    splits: dict,
    folder: Path,
    seed: int,
    resume: bool = False,
    progress: bool = True,
    sync_batchnorm: bool = True,
    val_teacher_logits: torch.Tensor | None = None,
    augment: str = "dihedral",
) -> tuple[torch.nn.Module, float]:
    """Train `model` on `objective`, validating every epoch; return it (unwrapped, on the CPU, eval mode)
    holding its best-on-val weights, and the training loop's seconds. Writes <folder>/metrics.csv and
    <folder>/checkpoints/. `val_teacher_logits`: a teacher's val logits, for how closely the student follows it.
    `augment`: data.augment, the recipe of the train batches (data.AUGMENTS).

    `stage.batch_size` is the global batch of an optimizer step, whatever the process count: each process
    trains on its slice of every micro-batch (epoch_batches) and the loss sees the whole micro-batch
    (gather_batch), so N processes train as one does, up to float rounding. `sync_batchnorm`: SyncBatchNorm
    in the trained model under several CUDA processes (on CPUs BatchNorm statistics stay per process)."""
    checkpoints = folder / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
    rank, world, accumulation = (
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.gradient_accumulation_steps,
    )
    train_images, train_labels = splits["train"]  # data.MemoryImages or, streamed, shard_data.ShardImages
    on_cuda = accelerator.device.type == "cuda"

    def epoch_batches(epoch):
        """This process's train batches (uint8 images, labels, positions, views, shifts) of an epoch: its slice
        of every micro-batch of the global order; `stage.batch_size` is the global batch."""
        return train_images.loader(
            stage.batch_size, seed, rank, world, epoch, stage.translate, accumulation, pin_memory=on_cuda
        )

    first_epoch = epoch_batches(0)
    if len(first_epoch) == 0:
        raise KdistError(
            f"{len(train_labels)} train images are fewer than one global batch of {stage.batch_size}; lower "
            f"{folder.name}'s batch_size"
        )
    optimizer_steps = len(first_epoch) // accumulation  # per epoch
    accelerator.print(
        f"{folder.name}: {describe_batch(accelerator, stage.batch_size)}; {optimizer_steps} steps per epoch, "
        f"{len(train_labels) % stage.batch_size} of {len(train_labels)} train samples left out each epoch (the last "
        "partial global batch)"
        + (
            "; streamed from shards: each sample at most once per epoch, in a shuffle-buffer order that depends on "
            "the process count"
            if train_images.streamed
            else ""
        )
    )
    if sync_batchnorm and world > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    total_steps = max(1, optimizer_steps * stage.epochs)
    optimizer = make_optimizer(model, stage)
    scheduler = make_scheduler(optimizer, stage, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    objective.to(accelerator.device)
    plain = accelerator.unwrap_model(model)
    ema = None
    if stage.ema_decay:  # validation and the kept weights use the exponential moving average
        ema = torch.optim.swa_utils.AveragedModel(
            plain, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(stage.ema_decay), use_buffers=True
        )
    state = TrainState()
    last, progress = chosen_checkpoint(accelerator, checkpoints) if resume else (None, None)
    if last is not None:
        accelerator.load_state(str(last))
        restore_random_state(accelerator, last)
        state = TrainState.from_json(progress)
        if ema is not None:
            ema.load_state_dict(load_file(str(last / "ema.safetensors")))
        accelerator.print(f"resumed {folder.name} at epoch {state.epoch} from {last}")

    if os.environ.get("KDIST_AUDIT_SAMPLES"):  # tests of the sharding: which samples each process saw
        epoch_batches = audited(epoch_batches, Path(os.environ["KDIST_AUDIT_SAMPLES"]), folder.name, rank)
    loop = TrainLoop(
        accelerator,
        model,
        ema,
        optimizer,
        scheduler,
        objective,
        stage,
        val=splits["val"],
        folder=folder,
        seed=seed,
        state=state,
        epoch_batches=epoch_batches,
        progress=progress,
        val_teacher_logits=val_teacher_logits,
        photo_draws=(lambda epoch: photo_draws(len(train_labels), seed, epoch)) if augment == "photo" else None,
    )
    start = time.perf_counter()
    with StopWatch() as watch:
        loop.run(watch)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # a plain float32 model, as saved
    accelerator.free_memory()
    load_kept_weights(accelerator, model, checkpoints / "best.safetensors")
    return model.cpu().eval(), time.perf_counter() - start


@dataclass
class TrainLoop:
    """One stage's training from where `state` stands: `run` is the epochs, `step` one batch, `validate` and
    `end_epoch` what follows each epoch. Raises StopRequested after saving, when the run's StopWatch is asked
    to stop."""

    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP-wrapped under several processes)
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    stage: StageConfig
    val: tuple  # (uint8 images, labels)
    folder: Path
    seed: int
    state: TrainState
    epoch_batches: Callable  # epoch -> this process's train batches (raw, labels, indices, views, shifts)
    progress: bool  # a line per epoch, and a bar within it on a terminal
    val_teacher_logits: torch.Tensor | None = None  # (N_val, C): agreement and KL with the teacher on val
    photo_draws: Callable | None = None  # epoch -> data.photo_draws per train position; None: no photo recipe

    def __post_init__(self):
        self.plain = self.accelerator.unwrap_model(self.model)
        self.checkpoints = self.folder / "checkpoints"
        self.nonfinite_losses = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        self.skipped_in_a_row = 0

    def run(self, watch: StopWatch) -> None:
        for epoch in range(self.state.epoch, self.stage.epochs):
            sums = self.train_epoch(epoch, watch)
            self.stop_if_diverged(f"the end of epoch {epoch}")
            self.end_epoch(epoch, {"epoch": epoch, **self.train_figures(sums), **self.validate()})

    def train_epoch(self, epoch: int, watch: StopWatch) -> dict:
        """This process's running sums (loss, correct, loss parts, "seen") over the epoch's batches."""
        skip = self.state.step_in_epoch  # > 0: this epoch was stopped part-way and resumes after that step
        if not skip:
            # Every epoch depends only on (seed, epoch) and the weights, so a resumed run repeats an uninterrupted
            # one: batch order and augmentation come from (seed, epoch) draws, dropout from the global RNG seeded
            # here alike on every process (models.BatchDropout draws the global batch's mask). Part-way through
            # an epoch, load_state has restored the RNG as it was at the stop instead.
            torch.manual_seed(derive_seed(self.seed, epoch))
        self.model.train()
        device = self.accelerator.device
        self.photo = self.photo_draws(epoch).to(device) if self.photo_draws else None
        saved = dict(self.state.epoch_sums) if skip else {}
        sums = {key: torch.tensor(float(saved.pop(key, 0.0)), device=device) for key in ("loss", "correct", "seen")}
        sums.update({key: torch.tensor(value, device=device) for key, value in saved.items()})
        batches = self.epoch_batches(epoch)
        bar = epoch_bar(self.progress and self.accelerator.is_main_process, len(batches), f"{self.folder.name} {epoch}")
        for step, batch in enumerate(bar(batches)):
            if step < skip:
                continue
            # On a GPU the host waits for the device only every SYNC_EVERY steps: to see a stop request or a
            # non-finite loss; on CPUs there is nothing to overlap, so every step.
            check = self.accelerator.device.type == "cpu" or step % SYNC_EVERY == 0
            self.step(batch, epoch, step, sums, check)
            if check and watch.requested(self.accelerator):  # finish this step, save, stop; --resume goes on
                self.state.step_in_epoch = step + 1
                self.state.epoch_sums = {key: value.item() for key, value in sums.items()}
                save_last(self.accelerator, self.checkpoints, self.state, self.ema)
                raise StopRequested(
                    f"stopped on request at epoch {epoch}, step {step}; state saved in {self.checkpoints / 'last'}"
                )
        return sums

    def augmented(self, raw, views, shifts, indices) -> torch.Tensor:
        """Train images as the model sees them: each in its dihedral view and shift, or the photo recipe."""
        if self.photo is None:
            return augment(raw, views, shifts, self.stage.translate)
        return photo_augment(raw, views, self.photo[indices])

    def step(self, batch, epoch: int, step: int, sums: dict, check: bool = True) -> None:
        """One (micro-)batch: augment, mix, forward, the loss on the gathered batch, backward, optimizer. `check`:
        look at the losses' finiteness now (a host sync)."""
        accelerator, stage = self.accelerator, self.stage
        with record_function("kdist/augment"):
            raw, labels, indices, views, shifts = (t.to(accelerator.device, non_blocking=True) for t in batch)
            images, mix = self.augmented(raw, views, shifts, indices), None
        if stage.mixup_alpha or stage.cutmix_alpha:  # one mixing per global micro-batch, for teacher and student
            partners_at = None
            if accelerator.num_processes > 1:
                # The global batch's uint8 images, views and shifts (a quarter of its float bytes); only the partner
                # rows this process needs are augmented.
                whole = accelerator.gather((raw.contiguous(), views, shifts, indices))

                def partners_at(positions):
                    return self.augmented(*(part[positions] for part in whole))

            images, mix = mix_batch(
                images,
                np.random.default_rng(derive_seed(self.seed, epoch, step)),
                stage.mixup_alpha,
                stage.cutmix_alpha,
                global_size=len(images) * accelerator.num_processes,
                offset=accelerator.process_index * len(images),
                partners_at=partners_at,
            )
        with accelerator.accumulate(self.model):
            with record_function("kdist/student_forward"), accelerator.autocast():
                logits = self.model(images)
            with record_function("kdist/teacher_forward"):
                targets = self.objective.targets(images, indices, views)
            with record_function("kdist/loss"):
                loss, parts = self.objective.loss(*gather_batch(accelerator, logits.float(), labels, targets), mix)
            if accelerator.scaler is None:  # fp16's scaler skips a non-finite step itself (step_skipped)
                self.nonfinite_losses += ~torch.isfinite(loss.detach())
                if check:
                    self.stop_if_diverged(f"epoch {epoch}, step {step}")
            with record_function("kdist/backward"):
                accelerator.backward(loss)
            with record_function("kdist/optimizer"):
                if stage.gradient_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.model.parameters(), stage.gradient_clip)
                self.optimizer.step()
                if accelerator.sync_gradients:
                    if not self.step_skipped(epoch, step):  # the schedule counts the optimizer steps taken
                        self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and accelerator.sync_gradients:
            self.ema.update_parameters(self.plain)
        n = len(labels)
        sums["seen"] += n
        sums["loss"] += loss.detach() * n  # the global micro-batch's loss, weighted by this process's share
        sums["correct"] += (logits.argmax(1) == labels).sum()
        for key, value in parts.items():
            sums[key] = sums.get(key, torch.zeros((), device=accelerator.device)) + value * n

    def stop_if_diverged(self, where: str) -> None:
        """Stop at the first look after a non-finite loss: the checkpoint on disk is from the last good epoch and
        stays as it is."""
        if self.nonfinite_losses.item():
            raise KdistError(
                f"training diverged: non-finite loss by {where}; the last good checkpoint is "
                f"kept in {self.checkpoints / 'last'}; lower the learning rate"
            )

    def step_skipped(self, epoch: int, step: int) -> bool:
        """Whether fp16's GradScaler skipped this optimizer step for non-finite gradients (never without a scaler);
        a run stops only when MAX_SKIPPED_IN_A_ROW steps in a row are skipped (the scale would then be far below
        any useful value)."""
        if self.accelerator.scaler is None or not self.accelerator.optimizer_step_was_skipped:
            self.skipped_in_a_row = 0
            return False
        self.state.skipped_steps += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise KdistError(
                f"training diverged under fp16: {self.skipped_in_a_row} optimizer steps in a row skipped for "
                f"non-finite gradients, by epoch {epoch}, step {step}; the last good checkpoint is kept in "
                f"{self.checkpoints / 'last'}; lower the learning rate or use --mixed-precision bf16"
            )
        return True

    def train_figures(self, sums: dict) -> dict:
        """Train loss, accuracy and loss parts over every process's samples, and the learning rate."""
        totals = dict(zip(sums, self.accelerator.reduce(torch.stack(list(sums.values())), "sum").tolist()))
        seen = totals.pop("seen")
        row = {"train/acc" if key == "correct" else f"train/{key}": value / seen for key, value in totals.items()}
        if self.accelerator.scaler is not None:  # fp16: overflow steps skipped so far
            row["train/skipped_steps"] = self.state.skipped_steps
        return {**row, "lr": self.scheduler.get_last_lr()[0]}

    def judged(self) -> torch.nn.Module:
        """The weights validated and kept: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.plain

    def validate(self) -> dict:
        """Val loss and accuracy over the whole split; for distillation, how closely the student follows its teacher."""
        logits, labels = gathered_logits(self.accelerator, self.judged(), *self.val)
        row = {
            "val/loss": F.cross_entropy(logits, labels).item(),
            "val/acc": (logits.argmax(1) == labels).float().mean().item(),
        }
        teacher_logits = self.val_teacher_logits
        if teacher_logits is not None:
            row["val/teacher_agreement"] = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
            row["val/teacher_kl"] = F.kl_div(
                F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), log_target=True, reduction="batchmean"
            ).item()
        return row

    def end_epoch(self, epoch: int, row: dict) -> None:
        """Record the epoch: curves, best-on-val weights, trackers, the checkpoint to resume from."""
        accelerator, state = self.accelerator, self.state
        state.history.append(row)
        state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
        if row["val/acc"] > state.best_acc:  # the kept weights: best on val, first of ties
            state.best_acc, state.best_epoch = row["val/acc"], epoch
            if accelerator.is_main_process:
                save_weights(self.judged(), self.checkpoints / "best.safetensors")
        if accelerator.is_main_process:
            write_history(self.folder / "metrics.csv", state.history)
        accelerator.log({key: value for key, value in row.items() if key != "epoch"}, step=epoch)  # main process only
        save_last(accelerator, self.checkpoints, state, self.ema)
        if self.progress:
            accelerator.print(
                f"{self.folder.name} epoch {epoch + 1}/{self.stage.epochs}  train loss "
                f"{row['train/loss']:.4f} acc {row['train/acc']:.4f}  val loss {row['val/loss']:.4f} "
                f"acc {row['val/acc']:.4f}"
            )
