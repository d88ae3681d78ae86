"""Lightning modules: supervised training and distillation from a frozen teacher.

Batches arrive as (float images in [0, 1], labels, dataset indices, dihedral view ids), already
augmented on the device by `DermaDataModule`.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from . import DermkdError
from .config import KDConfig, StageConfig
from .cache import logits_for_all_views
from .data import NUM_CLASSES
from .losses import distillation_loss


class SupervisedModule(L.LightningModule):
    """Cross-entropy training of one classifier; logs per-epoch train/val loss and accuracy."""

    def __init__(self, model: torch.nn.Module, stage: StageConfig, seed: int = 0, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.model, self.stage, self.seed = model, stage, seed
        self.register_buffer("class_weights", class_weights, persistent=False)  # None: plain cross-entropy
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_train_epoch_start(self):
        # Every epoch depends only on (seed, epoch) and the weights, so a resumed run repeats an
        # uninterrupted one: batch order and views come from the sampler's (seed, epoch) generator,
        # dropout from the global RNG reseeded here (nothing else draws from it during training).
        torch.manual_seed(self.seed * 100_003 + self.current_epoch + self.global_rank * 7919)

    def training_loss(self, logits, batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch[1], weight=self.class_weights, label_smoothing=self.stage.label_smoothing)

    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        loss = self.training_loss(logits, batch)
        if not torch.isfinite(loss):
            # Stop at once: the checkpoints on disk are from the last good epoch and stay as they are.
            raise DermkdError(
                f"training diverged: non-finite loss at epoch {self.current_epoch}, step {self.global_step}; "
                "last good checkpoint kept in checkpoints/last.ckpt; lower the learning rate"
            )
        self.train_acc(logits, batch[1])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(logits))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.val_acc(logits, batch[1])
        loss = F.cross_entropy(logits, batch[1])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(logits))
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        stage = self.stage
        if stage.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=0.9, nesterov=True, weight_decay=stage.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        if stage.schedule == "none":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if stage.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=stage.lr, total_steps=total, pct_start=0.15)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DistillModule(SupervisedModule):
    """Trains `student` on alpha * KD(student, teacher) + (1 - alpha) * CE.

    The teacher's logits come either from `teacher_logits_cache` (N, 8 views, C), looked up by the
    dataset index and dihedral view of each image, or from running the frozen `teacher` (kept in
    eval mode) on the batch: both give the same numbers. With kd.teacher_views = mean the target is
    the teacher's mean logits over all 8 views instead.
    """

    def __init__(self, student, stage: StageConfig, kd: KDConfig, teacher=None, teacher_logits_cache=None, seed: int = 0,
                 class_weights: torch.Tensor | None = None):
        super().__init__(student, stage, seed, class_weights)
        if (teacher is None) == (teacher_logits_cache is None):
            raise ValueError("give exactly one of teacher and teacher_logits_cache")
        self.kd, self.teacher = kd, teacher
        if teacher is not None:
            self.teacher.eval().requires_grad_(False)
        # Not persistent: the cache is rebuilt or reloaded from its own file, never from checkpoints.
        self.register_buffer("teacher_logits_cache", teacher_logits_cache, persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm/dropout of the teacher never switch to training behaviour
        return self

    def teacher_logits(self, batch) -> torch.Tensor:
        images, _, indices, views = batch
        mean_over_views = self.kd.teacher_views == "mean"
        if self.teacher_logits_cache is not None:
            if mean_over_views:
                return self.teacher_logits_cache[indices].mean(dim=1)
            return self.teacher_logits_cache[indices, views]
        with torch.no_grad():
            if mean_over_views:
                # The 8 views of a view are the 8 views of the original image (a group), so no undoing.
                return logits_for_all_views(self.teacher, images).mean(dim=1)
            return self.teacher(images)

    def training_loss(self, logits, batch) -> torch.Tensor:
        kd = self.kd
        return distillation_loss(logits, self.teacher_logits(batch), batch[1], kd.method, kd.temperature, kd.alpha,
                                 kd.standardize, kd.options, self.class_weights)
