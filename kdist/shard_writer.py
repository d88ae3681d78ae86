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

from . import KdistError
from .data import channel_stats
from .datasets import as_rgb_nchw, medmnist_info, medmnist_spec, npz_name, read_medmnist_npz, resolve_root
from .files import atomic_write_text
from .preprocess import IMAGE_SUFFIXES, decode_image, source_channels
from .shard_data import FORMAT, MANIFEST, read_manifest, sha256


def medmnist_samples(root, flag: str, size: int) -> tuple[dict, dict]:
    """{split: (images, labels)} and manifest facts of a MedMNIST file of any 2D flag and size."""
    info = medmnist_info(flag)
    path = resolve_root(root) / npz_name(flag, size)
    if not path.exists():
        raise KdistError(
            f"data file {path} not found; put it there or point --data-root / $KDIST_DATA_ROOT at its folder"
        )
    splits = read_medmnist_npz(path, size, info)
    spec = medmnist_spec(flag)
    facts = {"source": str(path), "flag": flag, "classes": list(spec.classes), "channels": spec.channels}
    return splits, {**facts, "image_size": size}


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def folder_samples(source: Path) -> list[tuple[Path, str]]:
    """(path, class name) rows of an image folder with one sub-folder per class, or of a CSV of path,label (a
    header line allowed; paths relative to the CSV's folder; labels are class names, or numbers)."""
    source = Path(source)
    if source.is_dir():
        classes = sorted(p.name for p in source.iterdir() if p.is_dir())
        if not classes:
            raise KdistError(
                f"{source} has no class sub-folders; give one sub-folder per class, or a CSV of path,label"
            )
        rows = []
        for name in classes:
            found = [path for path in sorted((source / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise KdistError(f"class folder {source / name} holds no images; add some or remove the folder")
            rows += [(path, name) for path in found]
        return rows
    import csv

    try:
        with open(source, newline="") as handle:
            table = [row for row in csv.reader(handle) if row]
    except (FileNotFoundError, IsADirectoryError):
        raise KdistError(f"{source} not found; give an image folder or a CSV of path,label") from None
    if table and [cell.strip().lower() for cell in table[0][:2]] == ["path", "label"]:
        table = table[1:]
    rows = []
    for number, row in enumerate(table, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise KdistError(f"{source}, row {number}: expected path,label, got {row}")
        path = Path(row[0].strip())
        rows.append((path if path.is_absolute() else source.parent / path, row[1].strip()))
    return rows


def class_order(names) -> list[str]:
    """Class names in label order: numerically when every name is a whole number, else alphabetically."""
    names = set(names)
    numeric = all(name.lstrip("-").isdigit() for name in names)
    return sorted(names, key=int) if numeric else sorted(names)


def _resized(data: bytes, image, side: int, suffix: str) -> tuple[bytes, str]:
    """(bytes, extension) of the image scaled so its shorter side is `side` px (aspect kept), re-encoded: JPEG
    (quality 95) for JPEG sources, PNG otherwise. Images already that small keep their bytes."""
    from PIL import Image

    if min(image.size) <= side:
        return data, suffix
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    buffer = io.BytesIO()
    jpeg = suffix in ("jpg", "jpeg")
    image.resize(size, Image.BILINEAR).save(buffer, format="JPEG" if jpeg else "PNG", quality=95)
    return buffer.getvalue(), "jpg" if jpeg else "png"


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
    # the statistics training computes on these images, decoded
    manifest["channel_mean"], manifest["channel_std"] = channel_stats(as_rgb_nchw(splits["train"][0]))
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def write_images(
    source: Path,
    out: Path,
    split: str = "train",
    maxcount: int = 2000,
    maxsize: int = 1 << 30,
    resize: int | None = None,
) -> dict:
    """Shards of an image folder or CSV, as one split, added to the folder's manifest: the original bytes, or with
    `resize` the image scaled to that shorter side. The first split written names the classes; later ones must
    use only those. A split mixing grayscale and colour images, or unlike the earlier splits, is refused."""
    rows = folder_samples(source)
    if not rows:
        raise KdistError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    manifest = read_manifest(out) if (out / MANIFEST).exists() else {"format": FORMAT, "splits": {}}
    if split in manifest["splits"] or list(out.glob(f"{split}-*.tar")):
        raise KdistError(f"{out} already holds a {split} split; choose another --out or --split")
    classes = manifest.get("classes") or class_order(name for _, name in rows)
    if len(classes) < 2:
        raise KdistError(f"{source} names one class ({classes[0]}); a classifier needs two or more: check its labels")
    unknown = sorted({name for _, name in rows} - set(classes))
    if unknown:
        raise KdistError(
            f"{source}: label(s) {', '.join(unknown)} are not among the classes of the splits already in {out} "
            f"({', '.join(classes)}); fix the labels or write the splits into a new --out"
        )
    index_of = {name: i for i, name in enumerate(classes)}
    moments = np.zeros((3, 3))  # per channel: pixel count, sum, sum of squares (in [0, 1] units), for normalisation
    modes = {}  # grayscale or colour -> the first file of that kind

    def samples():
        for index, (path, name) in enumerate(rows):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise KdistError(f"{path}: cannot read ({exc.strerror}); fix or remove that row") from None
            modes.setdefault(source_channels(data, str(path)), path)
            if len(modes) > 1:
                raise KdistError(
                    f"{source} mixes grayscale ({modes[1]}) and colour ({modes[3]}) images; convert them to one mode"
                )
            image = decode_image(data, str(path))  # unreadable: refused now
            suffix = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            if resize:
                data, suffix = _resized(data, image, resize, suffix)
                image = decode_image(data, str(path))  # the statistics of the pixels stored
            pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
            moments[:] += [[len(pixels)] * 3, pixels.sum(0), (pixels**2).sum(0)]
            yield data, suffix, index_of[name], index

    entry = write_split(out, split, samples(), maxcount, maxsize)
    channels = next(iter(modes))
    if manifest.get("channels", channels) != channels:
        for path in out.glob(f"{split}-*.tar"):
            path.unlink()
        raise KdistError(
            f"{source} holds {'grayscale' if channels == 1 else 'colour'} images, the earlier splits in {out} do not; "
            "convert them to one mode"
        )
    # the dataset's name (in results and weights): the shard folder's, as the user named it
    manifest.setdefault("name", Path(out).resolve().name)
    manifest.update({"classes": classes, "channels": channels, "image_size": resize})
    manifest["splits"][split] = {"source": str(source), **entry}
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
