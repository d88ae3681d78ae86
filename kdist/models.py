"""Model factory: role names over torchvision classifiers, plus safe weight files.

`create_model("teacher")` is EfficientNet-B0, `create_model("student")` is SqueezeNet v1.1; any
other torchvision classification model can be named directly, and so can `efficientnet_lite0|1|2`
(see pretrained.py, which also holds the ImageNet starting points). Every model is wrapped in
`DermClassifier`, which owns the input normalisation (train-split statistics) and an optional
upsampling, so training, predict, export and serve all feed it the same thing: float images in
[0, 1], NCHW.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import KdistError, __version__
from .datasets import DatasetSpec, default_spec
from .files import atomic_output
from .pretrained import EXTRA_ARCHS, build_backbone, load_imagenet, load_matching, pretrained_norm

ROLES = {"teacher": "efficientnet_b0", "student": "squeezenet1_1"}
# channels_last speeds up these families (measured on 2 CPU cores, a training step at batch 128:
# EfficientNet-B0 194 vs 554 ms, SqueezeNet 1.1 31 vs 40 ms).
CHANNELS_LAST_PREFIXES = ("efficientnet", "squeezenet", "mobilenet", "regnet", "convnext", "resnet")


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models) + list(EXTRA_ARCHS))


def resolve_arch(name: str) -> str:
    arch = ROLES.get(name, name)
    if arch not in available_archs():
        raise KdistError(f"unknown model {name!r}; use teacher, student or a torchvision classifier such as resnet18")
    return arch


def _process_slice() -> tuple[int, int]:
    """(processes, this process's rank), for drawing a random tensor for the global batch and keeping our rows."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class BatchDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn for the global batch (every process's rows, from the global RNG, which the
    engine seeds alike on every process) and then cut to this process's rows: a sample's mask is the same
    whatever the process count. On one process it is plain dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        world, rank = _process_slice()
        mask = torch.empty((len(x) * world, *x.shape[1:]), device=x.device).bernoulli_(1 - self.p)[
            rank * len(x) : (rank + 1) * len(x)
        ]
        return x * mask.to(x.dtype) / (1 - self.p)


class BatchStochasticDepth(torchvision.ops.StochasticDepth):
    """torchvision's StochasticDepth ("row": one draw per sample) with the draws made for the global batch, as
    BatchDropout does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.mode != "row":
            return super().forward(x)
        world, rank = _process_slice()
        keep = torch.empty((len(x) * world,) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(1 - self.p)
        return x * keep[rank * len(x) : (rank + 1) * len(x)].to(x.dtype) / (1 - self.p)


def draw_per_global_batch(module: nn.Module) -> nn.Module:
    """Swap nn.Dropout and StochasticDepth layers for their global-batch versions (no weights change)."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, BatchDropout(child.p))
        elif type(child) is torchvision.ops.StochasticDepth:
            setattr(module, name, BatchStochasticDepth(child.p, child.mode))
        else:
            draw_per_global_batch(child)
    return module


def _without_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What is left of a BatchNorm once folded: nothing, or timm's BatchNormAct2d's dropout and activation."""
    rest = [getattr(norm, name) for name in ("drop", "act") if isinstance(getattr(norm, name, None), nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


# Modules whose Conv2d -> BatchNorm2d pairs run in the order they are registered (a Sequential by definition).
IN_ORDER_MODULES = ("torchvision.models.resnet", "timm.models.efficientnet", "timm.models._efficientnet_blocks")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d into the convolution's weights, in place:
    in nn.Sequential (torchvision's Conv2dNormActivation, SqueezeNet), torchvision's ResNets and timm's
    EfficientNets, whose layers run in the order they are registered. Other modules keep their BatchNorms.
    For frozen models only: the same function up to float rounding, without the normalisation pass."""
    for child in module.children():
        fold_batchnorm(child)
    if not (isinstance(module, nn.Sequential) or type(module).__module__ in IN_ORDER_MODULES):
        return module
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        conv, norm = module._modules[first], module._modules[second]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm))  # SyncBatchNorm: a teacher trained on GPUs
            and not norm.training
            and norm.track_running_stats
        ):
            module._modules[first] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
            module._modules[second] = _without_norm(norm)
    return module


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` for inference beside training (the online teacher): eval mode, no gradients,
    BatchNorms folded (the same logits, a faster forward)."""
    return fold_batchnorm(copy.deepcopy(model).eval().requires_grad_(False))


class DermClassifier(nn.Module):
    """Normalise, optionally upsample to `input_size`, then run a torchvision backbone with a head for the classes
    of `dataset` (default: the default dataset's)."""

    def __init__(self, arch: str, mean, std, input_size: int | None = None, dataset: DatasetSpec | None = None):
        super().__init__()
        self.dataset = dataset or default_spec()
        self.arch, self.input_size, self.num_classes = arch, input_size, self.dataset.num_classes
        self.data_size: int | None = None  # the data file's image size it was trained on, once loaded from one
        self.backbone = draw_per_global_batch(build_backbone(arch, self.num_classes))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone(x)

    def metadata(self) -> dict:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": list(self.dataset.classes),
            "dataset": self.dataset.to_dict(),
            "input_size": self.input_size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "kdist_version": __version__,
        }


def create_model(
    name: str, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=None, pretrained=None, dataset=None
) -> DermClassifier:
    """`pretrained="imagenet"`: start from ImageNet weights, with the normalisation they were trained with.
    `dataset`: the DatasetSpec whose classes the head predicts (default: the default dataset's)."""
    arch = resolve_arch(name)
    if pretrained:
        mean, std = pretrained_norm(arch)
    model = DermClassifier(arch, mean, std, input_size, dataset)
    if pretrained:
        load_imagenet(model.backbone, arch)
    if arch.startswith(CHANNELS_LAST_PREFIXES):
        model = model.to(memory_format=torch.channels_last)
    return model


class TeacherEnsemble(nn.Module):
    """Several trained teachers as one: the mean of their logits (each keeps its own normalisation
    and input size). Distilled like a single teacher, cached or online."""

    def __init__(self, members: list[DermClassifier]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.arch = "ensemble(" + ", ".join(member.arch for member in members) + ")"
        sizes = sorted({member.input_size for member in members}, key=lambda size: size or 0)
        self.input_size = sizes[0] if len(sizes) == 1 else sizes  # recorded in results.json
        data_sizes = sorted({member.data_size for member in members}, key=lambda size: size or 0)
        if len(data_sizes) > 1:  # the ensemble sees one image per sample, so its members must share a size
            raise KdistError(
                f"the teachers were trained on different image sizes {data_sizes}; ensemble teachers of one size"
            )
        self.data_size = data_sizes[0]
        if len({member.dataset.classes for member in members}) > 1:
            raise KdistError("the teachers predict different classes; ensemble teachers trained on one dataset")
        self.dataset = members[0].dataset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images) for member in self.members]).mean(0)


def load_teacher(paths: list[Path], expect_arch: str | None = None, expect_dataset=None) -> nn.Module:
    """One teacher file: that model (checked against `expect_arch`). Several: their ensemble, any architectures.
    `expect_dataset`: the student's data, whose classes the teacher must predict."""
    if len(paths) == 1:
        return load_model(paths[0], expect_arch, expect_dataset)
    return TeacherEnsemble([load_model(path, expect_dataset=expect_dataset) for path in paths]).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, path: Path, extra: dict | None = None) -> None:
    """A safetensors state dict, written atomically (a killed run never leaves half a file); for a DermClassifier
    its metadata (arch, classes, normalisation, ...) as JSON in the header, which load_model reads."""
    meta = {**model.metadata(), **(extra or {})} if isinstance(model, DermClassifier) else None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata={"kdist": json.dumps(meta)} if meta else None)


def read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except FileNotFoundError:
        raise KdistError(f"weights file {path} not found") from None
    except Exception as exc:
        raise KdistError(f"{path} is not a kdist safetensors weights file ({exc})") from None
    if "kdist" not in header:
        raise KdistError(f"{path} has no kdist metadata; pass a .safetensors file written by kdist")
    return json.loads(header["kdist"])


def data_size_of(meta: dict) -> int:
    """The data file size weights were trained on (files from before it was recorded: 28 px)."""
    return int(meta.get("data_size", 28))


def dataset_of(meta: dict) -> DatasetSpec:
    """The dataset weights were trained on (files from before it was recorded: the default dataset's classes)."""
    if "dataset" in meta:
        return DatasetSpec.from_dict(meta["dataset"])
    return DatasetSpec(default_spec().name, tuple(meta["classes"]), default_spec().channels)


def load_model(path: Path, expect_arch: str | None = None, expect_dataset: DatasetSpec | None = None) -> DermClassifier:
    """Rebuild a DermClassifier from a kdist safetensors file. Never unpickles anything. `expect_dataset`: refuse
    weights trained on other classes."""
    meta = read_metadata(path)
    if expect_arch and meta["arch"] != resolve_arch(expect_arch):
        raise KdistError(f"{path} holds a {meta['arch']}, expected {resolve_arch(expect_arch)}")
    dataset = dataset_of(meta)
    if expect_dataset and dataset.classes != expect_dataset.classes:
        raise KdistError(
            f"{path} predicts the {dataset.num_classes} classes of {dataset.name} ({', '.join(dataset.classes)}), the "
            f"data has the {expect_dataset.num_classes} of {expect_dataset.name} ({', '.join(expect_dataset.classes)})"
            "; use a model trained on this data"
        )
    model = create_model(meta["arch"], meta["mean"], meta["std"], meta["input_size"], dataset=dataset)
    load_state(model, path)
    model.data_size = data_size_of(meta)
    return model.eval()


def load_state(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict (any file, with or without kdist metadata) into `model`."""
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise KdistError(f"cannot read weights {path} ({exc}); pass a .safetensors state dict") from None
    if not any(key.startswith("backbone.") for key in state):
        # A plain torchvision state dict (e.g. pretrained weights): into the backbone, leaving out
        # tensors whose shape differs (the 1000-class ImageNet head).
        load_matching(model.backbone, state, f"weights {path}")
        return
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise KdistError(f"weights {path} do not fit the model: {first}") from None
