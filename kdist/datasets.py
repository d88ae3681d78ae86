"""Which dataset a study trains on: its facts (DatasetSpec) and its MedMNIST files.

A study's data is a MedMNIST 2D set named by `data.flag` (default dermamnist; its facts from medmnist's INFO,
its npz files in the data root under medmnist's names), or a shard folder written by `kdist shards` (its
facts from the manifest: the class names of an image folder or CSV). The spec travels with the weights
(models.py), so predict, serve, export and the report name the same classes as training did.

Grayscale sets are read as three equal channels, as preprocess.py converts a grayscale photograph: every model
takes RGB and ImageNet weights apply unchanged.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT

from . import KdistError

DEFAULT_FLAG = "dermamnist"  # the benchmark: what data.flag and a model without a dataset mean
SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)  # the resolutions medmnist publishes
TASKS = ("multi-class", "binary-class", "ordinal-regression")  # one label per image: trained as classes


@dataclass(frozen=True)
class DatasetSpec:
    """What a model trained on a dataset must know about it: its name (a MedMNIST flag or the shards' source),
    its class names in label order and its images' channels (1: grayscale, shown to models as RGB)."""

    name: str
    classes: tuple[str, ...]
    channels: int = 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, values: dict) -> "DatasetSpec":
        return cls(str(values["name"]), tuple(values["classes"]), int(values.get("channels", 3)))

    def positive_index(self, wanted: str | None) -> int | None:
        """The class of interest for sensitivity/specificity (report.positive_class): `wanted` when the set has a
        class of that name, else the positive class (label 1) of a two-class set, else None."""
        if wanted in self.classes:
            return self.classes.index(wanted)
        return 1 if self.num_classes == 2 else None


def medmnist_info(flag: str) -> dict:
    """medmnist's INFO entry of a 2D single-label set, or one line saying what kdist supports."""
    if flag not in INFO:
        two_d = sorted(name for name in INFO if not name.endswith("3d"))
        raise KdistError(f"data.flag {flag!r} is not a MedMNIST dataset; choose one of {', '.join(two_d)}")
    info = INFO[flag]
    if flag.endswith("3d"):
        raise KdistError(f"data.flag {flag}: 3D volumes are not supported; kdist trains 2D MedMNIST sets")
    if info["task"] not in TASKS:
        raise KdistError(
            f"data.flag {flag}: its task is {info['task']}; kdist trains one label per image (multi-class, binary, "
            "ordinal as classes), not multi-label sets"
        )
    return info


def medmnist_spec(flag: str) -> DatasetSpec:
    info = medmnist_info(flag)
    return DatasetSpec(flag, tuple(info["label"][str(i)] for i in range(len(info["label"]))), info["n_channels"])


def default_spec() -> DatasetSpec:
    return medmnist_spec(DEFAULT_FLAG)


def npz_name(flag: str, size: int) -> str:
    """medmnist's file name: <flag>.npz at 28 px, <flag>_<size>.npz otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """--data-root, else $KDIST_DATA_ROOT, else medmnist's default root."""
    return Path(root or os.environ.get("KDIST_DATA_ROOT") or DEFAULT_ROOT).expanduser()


def _download(root: Path, flag: str, size: int) -> None:
    """Fetch the file through medmnist; raises KdistError when that is not possible (offline)."""
    path = root / npz_name(flag, size)
    hint = f"put {npz_name(flag, size)} in {root} or point --data-root / $KDIST_DATA_ROOT at a folder that has it"
    if os.environ.get("KDIST_NO_DOWNLOAD"):
        raise KdistError(f"data file {path} not found (downloads disabled); {hint}")
    try:
        import medmnist

        root.mkdir(parents=True, exist_ok=True)
        getattr(medmnist, INFO[flag]["python_class"])(split="train", root=str(root), download=True, size=size)
    except Exception as exc:  # medmnist/torchvision raise many kinds of network errors
        raise KdistError(f"data file {path} not found and download failed ({type(exc).__name__}); {hint}") from None
    if not path.exists():
        raise KdistError(f"data file {path} not found after download; {hint}")


def read_medmnist_npz(path: Path, size: int, info: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read and validate a MedMNIST npz of any 2D flag against its entry in medmnist's INFO: split -> (uint8
    images (N, size, size, 3), or (N, size, size) for one channel; int64 labels (N,)). The one npz reader."""
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise KdistError(f"{path} is not a readable npz file ({exc}); re-download it or fix --data-root") from None
    shape = (size, size, 3) if info["n_channels"] == 3 else (size, size)
    classes = len(info["label"])
    splits = {}
    for split in SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise KdistError(
                f"{path} lacks {split}_images/{split}_labels (has {sorted(arrays)}); it is not a medmnist file"
            )
        if images.dtype != np.uint8 or images.shape[1:] != shape:
            raise KdistError(
                f"{path}: {split}_images is {images.dtype} {images.shape}, expected uint8 "
                f"(N, {', '.join(map(str, shape))}); check --size and data.flag match the file"
            )
        if labels.dtype.kind not in "iu" or labels.ndim not in (1, 2) or labels.shape[1:] not in ((), (1,)):
            raise KdistError(f"{path}: {split}_labels is {labels.dtype} {labels.shape}, expected integers (N, 1)")
        labels = labels.reshape(-1).astype(np.int64)
        expected = info["n_samples"][split]
        if len(images) != expected or len(labels) != expected:
            raise KdistError(
                f"{path}: {split} has {len(images)} images / {len(labels)} labels, "
                f"medmnist's {info['python_class']} has {expected}; use the official file"
            )
        if labels.min() < 0 or labels.max() >= classes:
            raise KdistError(f"{path}: {split}_labels range {labels.min()}..{labels.max()}, expected 0..{classes - 1}")
        splits[split] = (images, labels)
    return splits


def as_rgb_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or NHW, grayscale) -> uint8 NCHW with 3 channels: a view of NHWC memory (channels_last);
    a grayscale image becomes three equal channels, as a grayscale photograph does in preprocess.py."""
    tensor = torch.from_numpy(images)
    if tensor.ndim == 3:
        tensor = tensor[..., None].expand(-1, -1, -1, 3)
    return tensor.permute(0, 3, 1, 2)


def load_medmnist(root=None, flag: str = DEFAULT_FLAG, size: int = 28, download: bool = True) -> dict:
    """Find (or download) and load a MedMNIST 2D set at `size` px from the data root: split -> (uint8 images
    NCHW, 3 channels; int64 labels)."""
    info = medmnist_info(flag)
    if size not in SIZES:
        raise KdistError(f"size {size} is not a MedMNIST resolution; choose one of {SIZES} (or train from shards)")
    root = resolve_root(root)
    path = root / npz_name(flag, size)
    if not path.exists():
        if not download:
            raise KdistError(f"data file {path} not found; put {npz_name(flag, size)} there or set --data-root")
        _download(root, flag, size)
    return {
        split: (as_rgb_nchw(images), torch.from_numpy(labels))
        for split, (images, labels) in read_medmnist_npz(path, size, info).items()
    }


def manifest_spec(manifest: dict, folder: Path) -> DatasetSpec:
    """The dataset of a shard set, from its manifest."""
    classes = manifest.get("classes") or []
    if len(classes) < 2:
        raise KdistError(f"{folder} holds {len(classes)} class(es); a classifier needs at least 2")
    name = manifest.get("flag") or manifest.get("name") or Path(folder).resolve().name
    return DatasetSpec(name, tuple(classes), int(manifest.get("channels", 3)))
