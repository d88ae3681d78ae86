"""Teacher-output cache: the frozen teacher's logits for every train image under all 8 views.

Training augmentation is exactly the dihedral group (flips and 90-degree rotations), so an image
is only ever shown in one of 8 views: computing the teacher's logits for all of them once makes
the cache exact, and distillation then costs about as much as training the student alone.
(A stage with `translate` > 0 also shifts images by a few pixels; the cache then gives the teacher's
output on the unshifted view, an approximation; `kd.teacher_mode: online` gives the exact one.)
A teacher trained on another data file (e.g. 64 px teaching a 28 px student) is cached on the train
images of its own file (pipeline.distill_stage). The cache file is keyed by a hash of the teacher
weights, the train images/labels and the preprocessing, and is rebuilt whenever any of them changes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import dihedral, to_float
from .files import atomic_output

log = logging.getLogger(__name__)
# Changing augmentation or to_float must change this string, so old caches are not trusted.
PREPROCESSING = "dihedral8+uint8/255+channels_last:v1"
NUM_VIEWS = 8


def cache_key(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(PREPROCESSING.encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def logits_for_all_views(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 8, C) logits of `teacher` for float NCHW `images` under every dihedral view."""
    views = (dihedral(images, view).contiguous(memory_format=torch.channels_last) for view in range(NUM_VIEWS))
    return torch.stack([teacher(view) for view in views], dim=1)


@torch.no_grad()  # not inference_mode: the result becomes a module buffer that DDP syncs
def compute_teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, 8, C) float32 logits of `teacher` for every uint8 image under every dihedral view."""
    device = next(teacher.parameters()).device
    teacher.eval()
    out = None
    for start in range(0, len(images), batch_size):
        logits = logits_for_all_views(teacher, to_float(images[start : start + batch_size].to(device))).float().cpu()
        if out is None:
            out = torch.empty(len(images), NUM_VIEWS, logits.shape[2])
        out[start : start + len(logits)] = logits
    return out


def teacher_cache(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, folder: Path) -> torch.Tensor:
    """Load the cached logits for this teacher and data, or compute and save them (atomically)."""
    key = cache_key(teacher, images, labels)
    path = Path(folder) / f"teacher_logits-{key}.safetensors"
    if path.exists():
        try:
            logits = load_file(str(path))["logits"]
            if logits.shape[:2] == (len(images), NUM_VIEWS):
                log.info("teacher cache: using %s", path)
                return logits
        except Exception:  # an unreadable cache is rebuilt, never trusted
            pass
    log.info("teacher cache: computing %d x %d teacher outputs into %s", len(images), NUM_VIEWS, path)
    logits = compute_teacher_logits(teacher, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp))
    return logits
