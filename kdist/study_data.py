"""Which shards a study reads, and its splits from them: the data file's cached shard set (`--shards auto`,
written once), a folder written by `kdist shards`, or shards elsewhere (data.shard_url); the train split in
memory where it fits data.memory_mb, else streamed (shard_data.ShardImages).

Above shard_data.py (format and reading) and shard_writer.py (writing); used by pipeline, evaluate and bench.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import KdistError
from .data import MemoryImages, channel_stats
from .datasets import DatasetSpec, load_medmnist, manifest_spec, medmnist_spec, npz_name, resolve_root
from .ranks import main_first
from .shard_data import (
    MANIFEST,
    ShardImages,
    read_manifest,
    read_split,
    sha256,
    verify,
)
from .shard_writer import write_medmnist


def cache_folder(npz: Path, flag: str, size: int) -> Path:
    """Where `--shards auto` keeps the shards written from a MedMNIST file: $KDIST_SHARD_CACHE, else
    ~/.cache/kdist/shards, in a folder named by the file's content (a changed file gets new shards)."""
    base = Path(os.environ.get("KDIST_SHARD_CACHE") or Path.home() / ".cache" / "kdist" / "shards").expanduser()
    return base / f"{flag}_{size}-{sha256(npz)[:12]}"


def auto_shards(root, flag: str, size: int, download: bool = True) -> Path:
    """The cached shard set of the MedMNIST file `flag` at `size`, written on first use (into a temporary folder,
    then renamed: a set is there whole or not at all, also when two jobs race). `download`: data.download."""
    import shutil

    npz = resolve_root(root) / npz_name(flag, size)
    if not npz.exists():
        load_medmnist(root, flag, size, download)  # downloads it (if allowed), or names what is missing
    folder = cache_folder(npz, flag, size)
    if (folder / MANIFEST).exists():
        return folder
    # a broken file is named as the in-memory path names it, before any writing
    train_count = len(load_medmnist(root, flag, size, download=False)["train"][1])
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"kdist: writing the webdataset shards of {npz} once, into {folder}", file=sys.stderr, flush=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    # 16 equal train shards: up to 16 processes x workers each read a whole one, and ranks get equal shares.
    write_medmnist(root, flag, size, partial, maxcount=-(-train_count // 16))
    try:
        partial.rename(folder)
    except OSError:  # another job finished first: use its set
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def locate_shards(data, check: bool = True) -> tuple[Path, dict]:
    """The shard folder of a data config (`auto` or unset: the data file's cached shards) and its manifest,
    each local shard checked against it when `check` (remote ones, data.shard_url, cannot be)."""
    if data.shards in (None, "auto"):
        folder = auto_shards(data.root, data.flag, data.size, data.download)
    else:
        folder = Path(data.shards)
    manifest = verify(folder) if check and not data.shard_url else read_manifest(folder)
    if manifest.get("flag") not in (None, data.flag):
        raise KdistError(
            f"{folder / MANIFEST} holds MedMNIST's {manifest['flag']}, data.flag is {data.flag}; set --flag "
            f"{manifest['flag']} or choose the shards of {data.flag}"
        )
    return folder, manifest


def loader_workers(num_workers: int | None) -> int:
    """data.num_workers, or for None the CPUs this process may use shared by the node's processes
    (LOCAL_WORLD_SIZE under a launcher), less one for the training process itself; at most 8."""
    if num_workers is not None:
        return num_workers
    cpus = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(8, cpus - 1))


def open_shard_splits(data, accelerator) -> tuple[dict, list[float], list[float], Path, DatasetSpec]:
    """A study's splits from shards (data.shards: a folder, or `auto`): val/test in memory; train in memory
    where it fits data.memory_mb, else as ShardImages (streamed); the normalisation from the train images in
    memory, else from the manifest. The main process writes (auto) and checks the shards first."""
    with main_first("shards", accelerator.is_main_process):
        folder, manifest = locate_shards(data, check=accelerator.is_main_process)
    spec = manifest_spec(manifest, folder)
    histogram = manifest["splits"].get("train", {}).get("class_histogram", {})
    empty = [name for label, name in enumerate(spec.classes) if not histogram.get(str(label))]
    if "train" in manifest["splits"] and empty:
        raise KdistError(
            f"{folder / MANIFEST}: class(es) {', '.join(empty)} have no train images; add some, or leave them out of "
            "every split"
        )
    for split in ("train", "val", "test"):
        if split not in manifest["splits"]:
            raise KdistError(
                f"{folder / MANIFEST} has no {split} split; write train, val and test shards (kdist shards --images "
                f"... --split {split})"
            )
    splits = {split: read_split(folder, split, data.size, data.shard_url, manifest) for split in ("val", "test")}
    train_labels = torch.tensor(manifest["splits"]["train"]["labels"])
    if "channel_mean" not in manifest:
        raise KdistError(f"{folder / MANIFEST} lacks channel statistics; rewrite the shards with `kdist shards`")
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    if len(train_labels) * 3 * data.size**2 <= data.memory_mb * 2**20:
        # Decoded once and kept: then trained on exactly as the npz in memory (the same global sample order and
        # the same normalisation, computed from the decoded images).
        images, labels = read_split(folder, "train", data.size, data.shard_url, manifest)
        splits["train"] = (MemoryImages(images, labels), labels)
        mean, std = channel_stats(images)
    else:  # streamed every epoch (ShardImages.loader)
        splits["train"] = (
            ShardImages(
                folder,
                manifest,
                "train",
                data.size,
                url_template=data.shard_url,
                num_workers=loader_workers(data.num_workers),
            ),
            train_labels,
        )
    return splits, mean, std, folder, spec


def planned_dataset(data) -> DatasetSpec:
    """The dataset a data config will read, without reading its images: a shard folder's manifest, else the
    MedMNIST set data.flag (`--shards auto` writes its shards from that file)."""
    if data.shards and str(data.shards).lower() not in ("auto", "none"):
        return manifest_spec(read_manifest(Path(data.shards)), Path(data.shards))
    return medmnist_spec(data.flag)


@dataclass
class DataInfo:
    """A command's data, chosen once (the npz in memory, or shards) and used alike by training, evaluation and
    bench: split -> (images, labels), where the train images are data.MemoryImages or, streamed,
    shard_data.ShardImages (one interface: `loader(..., epoch)` gives an epoch's batches); the train split's
    normalisation (None when train was not asked for); the shard folder, if any; the dataset's facts."""

    splits: dict
    mean: list[float] | None
    std: list[float] | None
    shard_folder: Path | None
    spec: DatasetSpec


def open_data(data, accelerator, names: tuple = ("train", "val", "test")) -> DataInfo:
    """The splits `names` of a data config: from shards (data.shards: `auto` or a folder; see open_shard_splits)
    or from the npz (data.shards None or "none"). The main process downloads or writes first."""
    if data.shards and str(data.shards).lower() != "none":
        if "train" in names:
            splits, mean, std, folder, spec = open_shard_splits(data, accelerator)
            return DataInfo({name: splits[name] for name in names}, mean, std, folder, spec)
        with main_first("shards", accelerator.is_main_process):
            folder, manifest = locate_shards(data, check=accelerator.is_main_process)
        splits = {name: read_split(folder, name, data.size, data.shard_url, manifest) for name in names}
        return DataInfo(splits, None, None, folder, manifest_spec(manifest, folder))
    with main_first("data file", accelerator.is_main_process):  # a download, if any, happens once
        full = load_medmnist(data.root, data.flag, data.size, data.download)
    mean, std = channel_stats(full["train"][0]) if "train" in names else (None, None)
    if "train" in names:
        full["train"] = (MemoryImages(*full["train"]), full["train"][1])
    return DataInfo({name: full[name] for name in names}, mean, std, None, medmnist_spec(data.flag))
