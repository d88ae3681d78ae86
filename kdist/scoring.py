"""Scoring a model on a whole split under any number of processes: each process its shard of a prepared
loader, `gather_for_metrics` joining them without the padding duplicates, always in float32 (a recorded
metric does not depend on the launch's mixed precision). Used by validation, evaluation and the pipeline."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from .data import to_float
from .inference import check_views, view_logits


def eval_loader(
    accelerator: Accelerator, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> DataLoader:
    """A prepared loader of (uint8 images, labels): each process a shard, padded to equal length;
    `gather_for_metrics` drops the padding again."""
    return accelerator.prepare_data_loader(
        DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)
    )


@contextlib.contextmanager
def float32_forward(model: torch.nn.Module):
    """`model` computing in float32 for the duration: Accelerate's prepare wraps a model's forward in the launch's
    autocast (an instance attribute, kept by unwrap_model); without it the class's own forward runs."""
    patched = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if patched is not None:
            model.forward = patched


@torch.no_grad()
def gathered_logits(
    accelerator: Accelerator, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, views: str = "one"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits, computed in float32, and (N,) labels of the whole split, in order, on every process: each
    process runs its shard, then `gather_for_metrics` joins them without duplicates."""
    check_views(views)
    model.eval()
    all_logits, all_labels = [], []
    with float32_forward(model):  # whatever the launch's mixed precision: a recorded metric does not depend on it
        for batch_images, batch_labels in eval_loader(accelerator, images, labels):
            logits = view_logits(model, to_float(batch_images), views).float()
            logits, batch_labels = accelerator.gather_for_metrics((logits, batch_labels))
            all_logits.append(logits.cpu())
            all_labels.append(batch_labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def split_probs(
    accelerator: Accelerator, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, views: str = "one"
) -> np.ndarray:
    """Softmax probabilities of the whole split, computed by every process on its shard."""
    logits, _ = gathered_logits(accelerator, model, images, labels, views)
    return torch.softmax(logits, dim=1).numpy()
