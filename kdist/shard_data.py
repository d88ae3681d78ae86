"""Reading webdataset shards: checked against their manifest, streamed to every process and worker, and
opened as a study's data.

Training (`ShardImages.loader`): shards are dealt to processes and DataLoader workers after a shard shuffle
that depends only on (seed, epoch) (the same order on every process, as open_clip does), samples are shuffled
in a buffer seeded the same way and decoded in the workers with the one preprocessing of preprocess.py
(centre square crop, bilinear resize to the data size). Every worker yields exactly the same number of
batches (its pass over its shards read again and again as one stream, cut at the count), so no process
waits on another at the end of an epoch; a worker whose shards run short wraps around them, one with more
leaves its last samples out of that epoch.
Where the decoded split fits data.memory_mb it is read once and kept (`DecodedSplit`): later epochs run the
same stages over each shard's indices, in tar order, so their batches are those of reading the shards.
The dihedral views and shifts of a batch are drawn in the main process from (seed, epoch, rank, step), and
augmentation runs on the device as for in-memory data, so a resumed run repeats an uninterrupted one.

Val and test (`evaluation_samples`) are read whole, every sample once, in index order, and then scored like
in-memory data (each process its part, joined by gather_for_metrics).

Shard locations: the folder holding manifest.json, or, for shards elsewhere, `data.shard_url`, a template
with `{name}` for each shard's file name, e.g. `pipe:aws s3 cp s3://bucket/derma/{name} -` or
`https://host/derma/{name}` (the manifest is then read from the local folder; checksums cannot be checked
before reading, so a corrupt remote shard is caught when it fails to decode).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from . import KdistError
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
        raise KdistError(f"{path} is not a current kdist shard manifest (format {manifest.get('format')!r}, expected {FORMAT}); "
                         "rewrite the shards with `kdist shards`")
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
                raise KdistError(f"shard {path} is missing ({split} split of {folder / MANIFEST}); restore it or rewrite the shards")
            if path.stat().st_size != shard["bytes"] or sha256(path) != shard["sha256"]:
                raise KdistError(f"shard {path} does not match its checksum in {MANIFEST} (truncated or corrupt); restore it or rewrite the shards")
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
        raise KdistError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')} lacks an integer cls/idx") from None


def _tar_errors(exn) -> bool:
    """webdataset's handler: a broken tar or member becomes one KdistError naming the shard."""
    if isinstance(exn, KdistError):
        raise exn
    raise KdistError(f"unreadable shard data ({type(exn).__name__}: {str(exn)[:200]}); check it against {MANIFEST} "
                     "with `kdist shards --verify`") from None


def _collate(samples):
    images, labels, indices = zip(*samples)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def stream(folder: Path, split: str, size: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
           num_workers: int = 0, buffer: int = 2000, keep: np.ndarray | None = None, url_template: str | None = None,
           manifest: dict | None = None, decoded: "DecodedSplit | None" = None):
    """A webdataset pipeline of training batches (uint8 images, labels, split indices) for process `rank` of
    `world`, the number of batches it yields and the number of DataLoader workers to read it with (up to
    `num_workers`): a disjoint share of the shards each epoch, the same number of batches on every process and
    worker. `keep`: the split indices to use (sorted; a subset for --quick), else all. `decoded`: the split
    already decoded in memory; its samples then come in the very order reading the shards gives (the same
    stages over each shard's indices, without reading or decoding)."""
    import webdataset as wds

    manifest = manifest or read_manifest(folder)
    urls = shard_urls(folder, manifest, split, url_template)
    count = manifest["splits"][split]["count"] if keep is None else len(keep)
    if len(urls) < world:
        raise KdistError(f"{split} has {len(urls)} shards for {world} processes; rewrite the shards smaller "
                         f"(kdist shards --maxcount {max(1, count // world)})")
    if count < batch_size * world:
        raise KdistError(f"{split} has {count} samples, too few for a batch of {batch_size} on each of {world} processes; "
                         "lower the batch size")
    # Fewer workers than asked where the shards or samples cannot give each one a whole share (a small subset).
    workers = max(1, min(num_workers, len(urls) // world, count // (batch_size * world)))
    batches_per_worker = count // (batch_size * world * workers)
    order = random.Random(f"{seed}-{epoch}").sample(urls, len(urls))  # the same shard order on every process
    num_classes = len(manifest["classes"])
    stages = [wds.SimpleShardList(order[rank::world]),  # this process's shards; workers split them further
              wds.split_by_worker,
              wds.tarfile_to_samples(handler=_tar_errors) if decoded is None else decoded.samples_of_shards]
    if keep is not None:
        wanted = frozenset(int(i) for i in keep)
        stages.append(wds.select(lambda sample: sample_label_index(sample)[1] in wanted))  # before decoding: skipped samples cost no decode
    to_item = decoded.sample if decoded is not None else lambda sample: decode_sample(sample, size, num_classes)
    stages += [wds.shuffle(buffer, rng=random.Random(f"{seed}-{epoch}-{rank}")), wds.map(to_item)]
    return (WorkerBatches(wds.DataPipeline(*stages), batch_size, batches_per_worker, split), batches_per_worker * workers,
            workers if num_workers else 0)


class WorkerBatches(IterableDataset):
    """Exactly `batches` batches from each DataLoader worker: its pass over its shards (`one_pass`) is read again
    and again as one stream, so a worker whose shards hold fewer samples wraps around them (and one with more
    leaves its last samples out of this epoch); every process then runs the same number of steps."""

    def __init__(self, one_pass, batch_size: int, batches: int, split: str):
        self.one_pass, self.batch_size, self.batches, self.split = one_pass, batch_size, batches, split

    def _samples(self):
        while True:
            count = 0
            for sample in self.one_pass:  # its shuffle buffer's generator goes on from pass to pass
                count += 1
                yield sample
            if count == 0:
                raise KdistError(f"a DataLoader worker's {self.split} shards hold none of the samples to train on; lower "
                                 "data.num_workers or write more, smaller shards")

    def __iter__(self):
        samples = self._samples()
        for _ in range(self.batches):
            yield _collate([next(samples) for _ in range(self.batch_size)])


def evaluation_samples(folder: Path, split: str, size: int, url_template: str | None = None,
                       manifest: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split, every sample once, in index order: (uint8 NCHW images, labels), for val and test."""
    images, labels, _ = read_split(folder, split, size, url_template, manifest)
    return images, labels


def read_split(folder: Path, split: str, size: int, url_template: str | None = None, manifest: dict | None = None):
    """evaluation_samples, and each shard's split indices in the order its tar holds them."""
    import webdataset as wds

    manifest = manifest or verify(folder, [split])
    num_classes = len(manifest["classes"])
    images, labels, indices, per_shard = [], [], [], {}
    urls = shard_urls(folder, manifest, split, url_template)
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=_tar_errors)):
        image, label, index = decode_sample(sample, size, num_classes)
        images.append(image), labels.append(label), indices.append(index)
        per_shard.setdefault(sample["__url__"], []).append(index)
    for url, shard in zip(urls, manifest["splits"][split]["shards"]):
        if len(per_shard.get(url, [])) != shard["count"]:
            raise KdistError(f"shard {url} holds {len(per_shard.get(url, []))} samples, {MANIFEST} says {shard['count']}; rewrite the shards")
    expected = manifest["splits"][split]["count"]
    if len(indices) != expected or sorted(indices) != list(range(expected)):
        raise KdistError(f"{split} shards in {folder} hold {len(indices)} samples with indices other than 0..{expected - 1}, "
                         f"as {MANIFEST} says; rewrite the shards")
    order = np.argsort(indices)
    return torch.stack(images)[order].contiguous(), torch.tensor(labels)[order], per_shard


class DecodedSplit:
    """A split read and decoded once, kept in memory (data.memory_mb): what a worker's shards would yield, by
    index, shard by shard in tar order, so the shuffle and batches are those of reading the shards."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, layout: dict):
        self.images, self.labels, self.layout = images, labels, layout

    def samples_of_shards(self, shards):
        for shard in shards:
            url = shard["url"]
            for index in self.layout[url]:
                yield {"__url__": url, "__key__": str(index), "cls": int(self.labels[index]), "idx.cls": index}

    def sample(self, sample: dict) -> tuple[torch.Tensor, int, int]:
        index = sample["idx.cls"]
        return self.images[index], sample["cls"], index


class ShardImages:
    """The train images of a shard set, read on demand: what a study's splits["train"][0] holds when it trains
    from shards, in place of an in-memory uint8 tensor. Indexing by positions gives a subset (--quick);
    `load()` reads the images whole, in order (for the teacher-logit cache); `loader()` streams an epoch."""

    def __init__(self, folder: Path, manifest: dict, split: str, size: int, keep=None, url_template: str | None = None,
                 num_workers: int = 2, memory_mb: int = 0, memory: dict | None = None):
        self.folder, self.manifest, self.split, self.size = Path(folder), manifest, split, size
        self.url_template, self.num_workers, self.memory_mb = url_template, num_workers, memory_mb
        self.memory = {} if memory is None else memory  # the DecodedSplit, once read; shared with subsets
        self.keep = np.arange(manifest["splits"][split]["count"]) if keep is None else np.asarray(keep, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def shape(self) -> tuple:
        return (len(self), 3, self.size, self.size)

    def __getitem__(self, positions) -> "ShardImages":
        return ShardImages(self.folder, self.manifest, self.split, self.size, self.keep[np.asarray(positions)], self.url_template,
                           self.num_workers, self.memory_mb, self.memory)

    def is_whole(self) -> bool:
        return len(self.keep) == self.manifest["splits"][self.split]["count"]

    def load(self) -> torch.Tensor:
        """Every kept image, uint8 NCHW, in index order."""
        images = self.decoded().images
        return images if self.is_whole() else images[torch.from_numpy(self.keep)]

    def decoded(self) -> DecodedSplit:
        """The whole split decoded, read once and kept (for the teacher cache, and for training where it fits)."""
        if "split" not in self.memory:
            self.memory["split"] = DecodedSplit(*read_split(self.folder, self.split, self.size, self.url_template, self.manifest))
        return self.memory["split"]

    def fits_in_memory(self) -> bool:
        count = self.manifest["splits"][self.split]["count"]
        return "split" in self.memory or count * 3 * self.size * self.size <= self.memory_mb * 2**20

    def loader(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, epoch: int = 0, translate: int = 0):
        """An epoch of (uint8 images, labels, positions, views, shifts) batches for process `rank`, like
        data.batch_loader's; positions index the kept images (the teacher cache's rows)."""
        pipeline, batches, workers = stream(self.folder, self.split, self.size, batch_size, seed, epoch, rank, world, self.num_workers,
                                            keep=None if self.is_whole() else self.keep, url_template=self.url_template,
                                            manifest=self.manifest, decoded=self.decoded() if self.fits_in_memory() else None)
        loader = DataLoader(pipeline, batch_size=None, num_workers=workers, generator=torch.Generator())
        return AugmentDraws(loader, batches, self.keep, seed, epoch, rank, translate)


class AugmentDraws:
    """Adds each batch's dihedral views and pixel shifts, drawn from (seed, epoch, rank, step), and maps split
    indices to positions among the kept images."""

    def __init__(self, loader, batches: int, keep: np.ndarray, seed: int, epoch: int, rank: int, translate: int):
        self.loader, self.batches, self.keep = loader, batches, torch.from_numpy(keep)
        self.seed, self.epoch, self.rank, self.translate = seed, epoch, rank, translate

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        try:
            yield from self._batches()
        except KdistError as exc:  # raised in a worker, it comes back wrapped in the worker's traceback: keep its one line
            raise KdistError(str(exc).strip().splitlines()[-1].split("KdistError: ", 1)[-1]) from None

    def _batches(self):
        for step, (images, labels, indices) in enumerate(self.loader):
            generator = torch.Generator().manual_seed(((self.seed * 100_003 + self.epoch) * 1009 + self.rank) * 1_000_003 + step)
            views = torch.randint(0, 8, (len(labels),), generator=generator)
            shifts = torch.zeros(len(labels), 2, dtype=torch.long)
            if self.translate:
                shifts = torch.randint(-self.translate, self.translate + 1, (len(labels), 2), generator=generator)
            yield images, labels, torch.searchsorted(self.keep, indices), views, shifts


# --- a study's data from shards -------------------------------------------------------------------------


def cache_folder(npz: Path, flag: str, size: int) -> Path:
    """Where `--shards auto` keeps the shards written from a MedMNIST file: $KDIST_SHARD_CACHE, else
    ~/.cache/kdist/shards, in a folder named by the file's content (a changed file gets new shards)."""
    base = Path(os.environ.get("KDIST_SHARD_CACHE") or Path.home() / ".cache" / "kdist" / "shards").expanduser()
    return base / f"{flag}_{size}-{sha256(npz)[:12]}"


def auto_shards(root, size: int) -> Path:
    """The cached shard set of the DermaMNIST file at `size`, written on first use (into a temporary folder,
    then renamed: a set is there whole or not at all, also when two jobs race)."""
    import shutil

    from .data import FLAG, load_dermamnist, npz_name, resolve_root
    from .shards import write_medmnist

    npz = resolve_root(root) / npz_name(size)
    if not npz.exists():
        load_dermamnist(root, size)  # downloads it, or names what is missing
    folder = cache_folder(npz, FLAG, size)
    if (folder / MANIFEST).exists():
        return folder
    load_dermamnist(root, size, download=False)  # a broken file is named as the in-memory path names it, before any writing
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"kdist: writing the webdataset shards of {npz} once, into {folder}", file=sys.stderr, flush=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    # 16 equal train shards: up to 16 processes x workers each read a whole one, and ranks get equal shares.
    write_medmnist(root, FLAG, size, partial, maxcount=-(-7007 // 16))
    try:
        partial.rename(folder)
    except OSError:  # another job finished first: use its set
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def locate_shards(data, check: bool = True) -> tuple[Path, dict]:
    """The shard folder of a data config (`auto` or unset: the data file's cached shards) and its manifest,
    each local shard checked against it when `check` (remote ones, data.shard_url, cannot be)."""
    folder = auto_shards(data.root, data.size) if data.shards in (None, "auto") else Path(data.shards)
    return folder, verify(folder) if check and not data.shard_url else read_manifest(folder)


def open_shard_splits(data, accelerator) -> tuple[dict, list[float], list[float], Path]:
    """A study's splits from shards (data.shards: a folder, or `auto`): train as ShardImages, val/test in
    memory; the normalisation from the manifest. The main process writes (auto) and checks the shards first."""
    from .data import NUM_CLASSES

    with accelerator.main_process_first():
        folder, manifest = locate_shards(data, check=accelerator.is_main_process)
    if len(manifest["classes"]) != NUM_CLASSES:
        raise KdistError(f"{folder / MANIFEST} has {len(manifest['classes'])} classes; kdist trains DermaMNIST's {NUM_CLASSES}")
    for split in ("train", "val", "test"):
        if split not in manifest["splits"]:
            raise KdistError(f"{folder / MANIFEST} has no {split} split; write train, val and test shards (kdist shards --images ... --split {split})")
    splits = {split: evaluation_samples(folder, split, data.size, data.shard_url, manifest) for split in ("val", "test")}
    train = ShardImages(folder, manifest, "train", data.size, url_template=data.shard_url, num_workers=data.num_workers,
                        memory_mb=data.memory_mb)
    splits["train"] = (train, torch.tensor(manifest["splits"]["train"]["labels"]))
    if "channel_mean" not in manifest:
        raise KdistError(f"{folder / MANIFEST} lacks channel statistics; rewrite the shards with `kdist shards`")
    return splits, manifest["channel_mean"], manifest["channel_std"], folder
