"""Webdataset shards, the bottom layer: their format and manifest, checks against it, and reading them back
(whole splits, or streamed to every process and worker). Writing is shard_writer.py; which shards a study
uses, study_data.py.

Training: where the decoded train split fits data.memory_mb (the default for DermaMNIST) it is read once,
in index order, and trained on exactly as the npz in memory (data.EpochBatchSampler: one global sample order
per (seed, epoch), dealt out to the processes). Larger splits are streamed every epoch (`ShardImages.loader`,
`stream`): the shards are laid out in an order drawn from (seed, epoch), the same on every process; each
process takes an equal range of the samples and its DataLoader workers split that range by whole batches,
reading only the shards it touches. Each sample is used at most once per epoch and all but the last partial
global batch are used; the order within a range comes from a shuffle buffer, so streaming is not the
in-memory order. Views and shifts are drawn per sample from (seed, epoch); augmentation runs on the device.

Val and test (`read_split`) are read whole, every sample once, in index order, and then scored like
in-memory data (each process its part, joined by gather_for_metrics).

Shard locations: the folder holding manifest.json, or, for shards elsewhere, `data.shard_url`, a template
with `{name}` for each shard's file name, e.g. `pipe:aws s3 cp s3://bucket/derma/{name} -` or
`https://host/derma/{name}` (the manifest is then read from the local folder; checksums cannot be checked
before reading, so a corrupt remote shard is caught when it fails to decode).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from . import KdistError
from .data import derive_seed, epoch_draws
from .preprocess import decode_image, to_model_array

MANIFEST = "manifest.json"
FORMAT = "kdist-shards/2"  # /2: the manifest lists every split's labels in index order
IMAGE_KEYS = ("png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise KdistError(f"{path} not found; write the shards with `kdist shards`") from None
    except json.JSONDecodeError as exc:
        raise KdistError(f"{path} is not valid JSON ({exc.msg}); rewrite the shards with `kdist shards`") from None
    if manifest.get("format") != FORMAT:
        raise KdistError(
            f"{path} is not a current kdist shard manifest (format {manifest.get('format')!r}, expected {FORMAT}); "
            "rewrite the shards with `kdist shards`"
        )
    return manifest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path, splits=None) -> dict:
    """Every shard of the manifest is there with its size and sha256; returns the manifest."""
    manifest = read_manifest(folder)
    for split, entry in manifest["splits"].items():
        if splits and split not in splits:
            continue
        for shard in entry["shards"]:
            path = Path(folder) / shard["name"]
            if not path.exists():
                raise KdistError(
                    f"shard {path} is missing ({split} split of {folder / MANIFEST}); restore it or rewrite the shards"
                )
            if path.stat().st_size != shard["bytes"] or sha256(path) != shard["sha256"]:
                raise KdistError(
                    f"shard {path} does not match its checksum in {MANIFEST} (truncated or corrupt); restore it or "
                    "rewrite the shards"
                )
    return manifest


def shard_urls(folder: Path, manifest: dict, split: str, url_template: str | None = None) -> list[str]:
    """Where each shard of `split` is read from: the local folder, or `url_template` with {name} filled in."""
    if split not in manifest["splits"]:
        raise KdistError(f"{Path(folder) / MANIFEST} has no {split} split (has {', '.join(manifest['splits'])})")
    names = [shard["name"] for shard in manifest["splits"][split]["shards"]]
    if url_template:
        return [url_template.replace("{name}", name) for name in names]
    return [str(Path(folder) / name) for name in names]


def decode_sample(sample: dict, size: int, num_classes: int) -> tuple[torch.Tensor, int, int]:
    """A raw webdataset sample -> (uint8 CHW image at size x size, label, index), or KdistError naming it."""
    name = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    image_key = next((key for key in IMAGE_KEYS if key in sample), None)
    if image_key is None:
        raise KdistError(f"{name} holds no image (keys {sorted(k for k in sample if not k.startswith('__'))})")
    label, index = sample_label_index(sample)
    if not 0 <= label < num_classes:
        raise KdistError(f"{name}: label {label} outside 0..{num_classes - 1}")
    array = to_model_array(decode_image(sample[image_key], name), size)
    return torch.from_numpy(array.copy()).permute(2, 0, 1), label, index


def sample_label_index(sample: dict) -> tuple[int, int]:
    try:
        return int(sample["cls"]), int(sample["idx.cls"])
    except (KeyError, ValueError):
        raise KdistError(
            f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')} lacks an integer cls/idx"
        ) from None


def _tar_errors(exn) -> bool:
    """webdataset's handler: a broken tar or member becomes one KdistError naming the shard."""
    if isinstance(exn, KdistError):
        raise exn
    raise KdistError(
        f"unreadable shard data ({type(exn).__name__}: {str(exn)[:200]}); check it against {MANIFEST} "
        "with `kdist shards --verify`"
    ) from None


def _collate(samples):
    images, labels, indices = zip(*samples)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def shard_ranges(manifest: dict, split: str) -> list[tuple[int, int]]:
    """[start, end) split indices of each shard, in manifest order (shards hold consecutive indices)."""
    ranges, start = [], 0
    for shard in manifest["splits"][split]["shards"]:
        ranges.append((start, start + shard["count"]))
        start += shard["count"]
    return ranges


def stream(
    folder: Path,
    split: str,
    size: int,
    batch_size: int,
    seed: int,
    epoch,
    rank: int = 0,
    world: int = 1,
    accumulation: int = 1,
    num_workers: int = 0,
    buffer: int = 2000,
    keep: np.ndarray | None = None,
    url_template: str | None = None,
    manifest: dict | None = None,
) -> "StreamedBatches":
    """An epoch of training batches (uint8 images, labels, split indices) streamed from shards for process
    `rank` of `world`, when the split does not fit in memory. `batch_size` is the global batch. `epoch`: a number,
    or a shared multiprocessing.Value read at the start of each pass (one DataLoader with persistent workers
    then serves every epoch).

    The epoch lays the samples out shard by shard in an order drawn from (seed, epoch), the same on every
    process; all but the last partial global batch are used, each exactly once: process `rank` takes the
    rank-th equal range of them, and its DataLoader workers split that range by whole batches (so a range may
    begin or end inside a shard: any process and worker count works with any number of shards). Samples are
    shuffled within a worker's range by a buffer. `keep`: the split indices to use (sorted; --quick), else all."""
    manifest = manifest or read_manifest(folder)
    keep = np.arange(manifest["splits"][split]["count"]) if keep is None else np.asarray(keep, dtype=np.int64)
    if len(keep) < batch_size:
        raise KdistError(
            f"{split} has {len(keep)} samples, fewer than one global batch of {batch_size}; lower the batch size"
        )
    layout = EpochLayout(
        shard_urls(folder, manifest, split, url_template),
        shard_ranges(manifest, split),
        keep,
        batch_size // (world * accumulation),
        (len(keep) - len(keep) % batch_size) // world,
        rank,
        max(1, num_workers),
        seed,
    )
    return StreamedBatches(
        layout, epoch, size, len(manifest["classes"]), buffer, split, num_workers if num_workers else 0
    )


class EpochLayout:
    """Which samples each DataLoader worker of a process reads in an epoch, and from which shards."""

    def __init__(self, urls, ranges, keep, per_process, used_per_process, rank, workers, seed):
        self.urls, self.ranges, self.keep, self.per_process = urls, ranges, keep, per_process
        self.used_per_process, self.rank, self.workers, self.seed = used_per_process, rank, workers, seed
        self.batches = used_per_process // per_process  # per process, whatever the epoch

    def plan(self, epoch: int, worker: int) -> tuple[list[str], np.ndarray, int]:
        """(shard urls in order, the split indices it yields, its batch count) of `worker` in `epoch`."""
        urls, ranges, keep = self.urls, self.ranges, self.keep
        shard_order = random.Random(derive_seed(self.seed, epoch)).sample(
            range(len(urls)), len(urls)
        )  # alike on every rank
        kept = [keep[(keep >= ranges[j][0]) & (keep < ranges[j][1])] for j in shard_order]
        sequence = np.concatenate(kept)  # the epoch's samples, shard after shard
        shard_of_position = np.repeat(shard_order, [len(k) for k in kept])
        first, last = self.batches * worker // self.workers, self.batches * (worker + 1) // self.workers
        start = self.rank * self.used_per_process
        positions = slice(start + first * self.per_process, start + last * self.per_process)
        shard_ids = list(dict.fromkeys(shard_of_position[positions].tolist()))
        return [urls[j] for j in shard_ids], sequence[positions], last - first


class StreamedBatches(IterableDataset):
    """What each DataLoader worker of a process reads: only the shards that hold its range of samples, every
    sample of that range once, shuffled, as exactly its number of batches."""

    def __init__(self, layout: EpochLayout, epoch, size, num_classes, buffer, split, num_workers):
        self.layout, self.epoch, self.size, self.num_classes = layout, epoch, size, num_classes
        self.buffer, self.split, self.num_workers = buffer, split, num_workers

    def __len__(self) -> int:
        return self.layout.batches

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        epoch = self.epoch if isinstance(self.epoch, int) else self.epoch.value
        urls, indices, batches = self.layout.plan(epoch, worker)
        if batches == 0:
            return
        wanted = frozenset(indices.tolist())
        seed = derive_seed(self.layout.seed, epoch, self.layout.rank, worker)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=_tar_errors),
            wds.select(
                lambda sample: sample_label_index(sample)[1] in wanted
            ),  # before decoding: skipped samples cost nothing
            wds.shuffle(self.buffer, rng=random.Random(seed)),
            wds.map(lambda sample: decode_sample(sample, self.size, self.num_classes)),
        )
        samples = iter(pipeline)
        for _ in range(batches):
            batch = [sample for _, sample in zip(range(self.layout.per_process), samples)]
            if len(batch) < self.layout.per_process:
                raise KdistError(
                    f"the {self.split} shards {urls} hold fewer of their samples than {MANIFEST} says; "
                    "check them with `kdist shards --verify` or rewrite them"
                )
            yield _collate(batch)


def read_split(
    folder: Path, split: str, size: int, url_template: str | None = None, manifest: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split, every sample once, in index order: (uint8 NCHW images, labels); for val and test, and
    for train where it fits in memory (data.memory_mb)."""
    import webdataset as wds

    manifest = manifest or verify(folder, [split])
    num_classes = len(manifest["classes"])
    images, labels, indices, per_shard = [], [], [], {}
    urls = shard_urls(folder, manifest, split, url_template)
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=_tar_errors)):
        image, label, index = decode_sample(sample, size, num_classes)
        images.append(image), labels.append(label), indices.append(index)
        per_shard[sample["__url__"]] = per_shard.get(sample["__url__"], 0) + 1
    for url, shard in zip(urls, manifest["splits"][split]["shards"]):
        if per_shard.get(url, 0) != shard["count"]:
            raise KdistError(
                f"shard {url} holds {per_shard.get(url, 0)} samples, {MANIFEST} says {shard['count']}; rewrite the "
                "shards"
            )
    expected = manifest["splits"][split]["count"]
    if len(indices) != expected or sorted(indices) != list(range(expected)):
        raise KdistError(
            f"{split} shards in {folder} hold {len(indices)} samples with indices other than 0..{expected - 1}, "
            f"as {MANIFEST} says; rewrite the shards"
        )
    order = np.argsort(indices)
    return torch.stack(images)[order].contiguous(), torch.tensor(labels)[order]


class ShardImages:
    """The train images of a shard set too large for memory (data.memory_mb), read on demand: what a study's
    splits["train"][0] holds then, in place of data.MemoryImages, with the same interface. Indexing by positions
    gives a subset (--quick); `load()` reads the kept images whole, in order (for the teacher-logit cache);
    `loader()` streams an epoch."""

    streamed = True

    def __init__(
        self,
        folder: Path,
        manifest: dict,
        split: str,
        size: int,
        keep=None,
        url_template: str | None = None,
        num_workers: int = 2,
    ):
        self.folder, self.manifest, self.split, self.size = Path(folder), manifest, split, size
        self.url_template, self.num_workers = url_template, num_workers
        self.keep = np.arange(manifest["splits"][split]["count"]) if keep is None else np.asarray(keep, dtype=np.int64)
        self.loaders = {}  # (batch size, seed, rank, world, accumulation, pinned) -> (DataLoader, shared epoch)

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def shape(self) -> tuple:
        return (len(self), 3, self.size, self.size)

    def __getitem__(self, positions) -> "ShardImages":
        return ShardImages(
            self.folder,
            self.manifest,
            self.split,
            self.size,
            self.keep[np.asarray(positions)],
            self.url_template,
            self.num_workers,
        )

    def load(self) -> torch.Tensor:
        """Every kept image, uint8 NCHW, in index order."""
        images, _ = read_split(self.folder, self.split, self.size, self.url_template, self.manifest)
        return images[torch.from_numpy(self.keep)]

    def loader(
        self,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        epoch: int = 0,
        translate: int = 0,
        accumulation: int = 1,
        pin_memory: bool = False,
    ) -> "AugmentDraws":
        """An epoch of (uint8 images, labels, positions, views, shifts) batches for process `rank`, like
        data.batch_loader's; positions index the kept images (the teacher cache's rows)."""
        key = (batch_size, seed, rank, world, accumulation, pin_memory)
        if key not in self.loaders:  # one DataLoader for every epoch: its workers persist, told the epoch
            epoch_value = multiprocessing.Value("i", epoch)
            batches = stream(
                self.folder,
                self.split,
                self.size,
                batch_size,
                seed,
                epoch_value,
                rank,
                world,
                accumulation,
                self.num_workers,
                keep=self.keep,
                url_template=self.url_template,
                manifest=self.manifest,
            )
            loader = DataLoader(
                batches,
                batch_size=None,
                num_workers=batches.num_workers,
                generator=torch.Generator(),
                pin_memory=pin_memory,
                persistent_workers=batches.num_workers > 0,
            )
            self.loaders[key] = (loader, epoch_value)
        loader, epoch_value = self.loaders[key]
        epoch_value.value = epoch  # read by the workers when this epoch's iteration starts
        return AugmentDraws(
            loader, len(loader.dataset), self.keep, self.manifest["splits"][self.split]["count"], seed, epoch, translate
        )


class AugmentDraws:
    """Adds each sample's dihedral view and pixel shift, drawn from (seed, epoch) by split index (the same
    whatever process reads it), and maps split indices to positions among the kept images."""

    def __init__(self, loader, batches: int, keep: np.ndarray, count: int, seed: int, epoch: int, translate: int):
        self.loader, self.batches, self.keep = loader, batches, torch.from_numpy(keep)
        _, self.views, self.shifts = epoch_draws(count, seed, epoch, translate)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        try:
            for images, labels, indices in self.loader:
                yield images, labels, torch.searchsorted(self.keep, indices), self.views[indices], self.shifts[indices]
        except (
            KdistError
        ) as exc:  # raised in a worker, it comes back wrapped in the worker's traceback: keep its one line
            raise KdistError(str(exc).strip().splitlines()[-1].split("KdistError: ", 1)[-1]) from None
