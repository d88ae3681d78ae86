"""Writing webdataset shards: from a MedMNIST file or an image folder / CSV, with their manifest.

A shard set is a folder of tar files, `<split>-000000.tar ...`, written by webdataset's ShardWriter, and
`manifest.json` beside them. Each sample holds its key, the image (lossless PNG for MedMNIST arrays; the
original bytes for JPEG/PNG sources), its integer label (`cls`) and its index in the split (`idx`). The
manifest records the source, per split the samples per shard, the class histogram, the labels in index order
and a sha256 per shard, the image size and the train split's channel statistics.

Below it: shard_data.py (the format, checks and reading). Above it: study_data.py (which shards a study uses)
and shards.py (the `kdist shards` command).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from . import KdistError
from .data import channel_stats, read_medmnist_npz, resolve_root
from .files import atomic_write_text
from .preprocess import IMAGE_SUFFIXES, decode_image
from .shard_data import FORMAT, MANIFEST, read_manifest, sha256


def medmnist_samples(root, flag: str, size: int) -> tuple[dict, dict]:
    """{split: iterator of (png bytes, label, index)} and facts of a MedMNIST file of any 2D flag and size."""
    from medmnist import INFO

    if flag not in INFO:
        raise KdistError(f"--flag {flag!r} is not a MedMNIST dataset; choose one of {', '.join(sorted(INFO))}")
    info = INFO[flag]
    path = resolve_root(root) / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    if not path.exists():
        raise KdistError(
            f"data file {path} not found; put it there or point --data-root / $KDIST_DATA_ROOT at its folder"
        )
    splits = read_medmnist_npz(path, size, info)
    classes = [info["label"][str(i)] for i in range(len(info["label"]))]
    return splits, {"source": str(path), "flag": flag, "classes": classes, "image_size": size}


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def folder_samples(source: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) rows of an image folder with one sub-folder per class (sorted names), or of a CSV of path,label."""
    source = Path(source)
    if source.is_dir():
        classes = sorted(p.name for p in source.iterdir() if p.is_dir())
        if not classes:
            raise KdistError(
                f"{source} has no class sub-folders; give one sub-folder per class, or a CSV of path,label"
            )
        rows = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((source / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        return rows, classes
    import csv

    try:
        with open(source, newline="") as handle:
            table = [row for row in csv.reader(handle) if row]
    except FileNotFoundError:
        raise KdistError(f"{source} not found; give an image folder or a CSV of path,label") from None
    if table and not table[0][1].strip().lstrip("-").isdigit():
        table = table[1:]  # a header line
    rows = []
    for number, row in enumerate(table, start=1):
        if len(row) < 2 or not row[1].strip().lstrip("-").isdigit():
            raise KdistError(f"{source}, row {number}: expected path,integer label, got {row}")
        path = Path(row[0]) if Path(row[0]).is_absolute() else source.parent / row[0]
        rows.append((path, int(row[1])))
    classes = [str(i) for i in range(max(label for _, label in rows) + 1)] if rows else []
    return rows, classes


def write_split(out: Path, split: str, samples, maxcount: int, maxsize: int) -> dict:
    """Write one split's samples [(image bytes, extension, label, index)] as shards; their manifest entry."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    histogram: dict[int, int] = {}
    labels: dict[int, int] = {}
    pattern = str(out / f"{split}-%06d.tar")
    try:
        # mtime=0: plain ustar headers (a float mtime adds a pax header to every member, doubling the readers'
        # tar parsing, the largest cost of a 28 px sample) and the same bytes, so the same sha256, every time
        with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0) as writer:
            for data, extension, label, index in samples:
                writer.write(
                    {"__key__": f"{split}-{index:07d}", extension: data, "cls": int(label), "idx.cls": int(index)}
                )
                histogram[int(label)] = histogram.get(int(label), 0) + 1
                labels[int(index)] = int(label)
    except BaseException:
        for path in out.glob(f"{split}-*.tar"):  # a split is written whole or not at all
            path.unlink()
        raise
    shards = []
    for path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            count = len({Path(member.name).name.split(".")[0] for member in tar.getmembers()})
        shards.append({"name": path.name, "count": count, "bytes": path.stat().st_size, "sha256": sha256(path)})
    last = len(shards) - 1
    return {
        "count": sum(s["count"] for s in shards),
        "class_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "pattern": f"{split}-{{000000..{last:06d}}}.tar",
        "shards": shards,
        "labels": [labels[i] for i in sorted(labels)],
    }  # in index order: a study's train labels without reading the shards


def write_medmnist(root, flag: str, size: int, out: Path, maxcount: int = 2000, maxsize: int = 1 << 30) -> dict:
    """Shards of every split of a MedMNIST file, and its manifest (written last: a set without one is unfinished)."""
    splits, facts = medmnist_samples(root, flag, size)
    _refuse_existing(out)
    manifest = {"format": FORMAT, **facts, "splits": {}}
    for split, (images, labels) in splits.items():
        manifest["splits"][split] = write_split(
            out,
            split,
            ((_png(image), "png", label, i) for i, (image, label) in enumerate(zip(images, labels))),
            maxcount,
            maxsize,
        )
    train = torch.from_numpy(splits["train"][0])  # the statistics training computes on these images, decoded
    train = train.permute(0, 3, 1, 2) if train.ndim == 4 else train[:, None].expand(-1, 3, -1, -1)
    manifest["channel_mean"], manifest["channel_std"] = channel_stats(train)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def write_images(source: Path, out: Path, split: str = "train", maxcount: int = 2000, maxsize: int = 1 << 30) -> dict:
    """Shards of an image folder or CSV (the original bytes), as one split; added to the folder's manifest."""
    rows, classes = folder_samples(source)
    if not rows:
        raise KdistError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    manifest = read_manifest(out) if (out / MANIFEST).exists() else {"format": FORMAT, "splits": {}}
    if split in manifest["splits"] or list(out.glob(f"{split}-*.tar")):
        raise KdistError(f"{out} already holds a {split} split; choose another --out or --split")

    moments = np.zeros((3, 3))  # per channel: pixel count, sum, sum of squares (in [0, 1] units), for normalisation

    def samples():
        for index, (path, label) in enumerate(rows):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise KdistError(f"{path}: cannot read ({exc.strerror}); fix or remove that row") from None
            pixels = (
                np.asarray(decode_image(data, str(path)), dtype=np.float64).reshape(-1, 3) / 255.0
            )  # unreadable: refused now
            moments[:] += [[len(pixels)] * 3, pixels.sum(0), (pixels**2).sum(0)]
            yield data, path.suffix.lower().lstrip(".").replace("jpeg", "jpg"), label, index

    manifest.update({"source": str(source), "classes": classes, "image_size": None})
    manifest["splits"][split] = write_split(out, split, samples(), maxcount, maxsize)
    if split == "train":
        count, mean = moments[0], moments[1] / moments[0]
        # The sample std, as data.channel_stats computes it on images in memory, here from running sums.
        manifest["channel_mean"], manifest["channel_std"] = (
            mean.tolist(),
            np.sqrt((moments[2] - count * mean**2) / (count - 1)).tolist(),
        )
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _refuse_existing(out: Path) -> None:
    if (out / MANIFEST).exists() or list(out.glob("*.tar")):
        raise KdistError(f"{out} already holds shards; choose another --out (nothing was overwritten)")
