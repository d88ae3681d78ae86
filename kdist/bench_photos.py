"""`kdist bench --photos SHARDS`: the loader at a photograph's resolution, side by side in one run.

One process with one thread, as a DataLoader worker runs, turns the same train JPEGs into augmented float
batches at `size` px with the photo recipe, in two ways:
- kdist: a loader worker reads and decodes the shards as training streams them (shard_data.stream: centre
  square, resized); the training process augments whole batches on its device (data.photo_augment: dihedral
  view and crop in one grid_sample, then colour jitter), timed here on this CPU, and both in one thread;
- torchvision: `ImageFolder` over the same files (linked into class folders) and a `DataLoader`, each image
  through `transforms.v2` (centre square, resize, flips, RandomResizedCrop, ColorJitter) in the worker.
Then the student's training step at that size, for what the loader must keep up with.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import KdistError
from .bench import train_step
from .data import PHOTO_JITTER, PHOTO_RATIO, PHOTO_SCALE, epoch_draws, photo_augment, photo_draws
from .models import create_model
from .shard_data import stream, verify
from .shard_writer import folder_samples


def _images_per_s(batches, count: int) -> float:
    next(iter(batches))  # first batch: worker and file start-up, not counted
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch[0])
        if seen >= count:
            break
    return seen / (time.perf_counter() - start)


def kdist_batches(folder: Path, manifest: dict, size: int, batch: int, seed: int = 0):
    """What a kdist loader worker does: the train shards read and decoded (centre square, resized to `size`)."""
    return stream(folder, "train", size, batch, seed, 0, manifest=manifest)


def recipe_images_per_s(batches: list, count: int, seed: int = 0) -> float:
    """The batched photo recipe (dihedral view, crop, colour jitter) on uint8 batches, on this CPU: what the
    training process does on its device."""
    _, views, _ = epoch_draws(count, seed, 0)
    draws = photo_draws(count, seed, 0)
    raw, _, indices = batches[0]
    photo_augment(raw[:2], views[indices[:2]], draws[indices[:2]])  # warm-up
    start = time.perf_counter()
    for raw, _, indices in batches:
        photo_augment(raw, views[indices], draws[indices])
    return sum(len(raw) for raw, _, _ in batches) / (time.perf_counter() - start)


def imagefolder_loader(folder: Path, manifest: dict, size: int, batch: int, links: Path):
    """The torchvision way, over the same JPEGs: ImageFolder + transforms.v2 + DataLoader in this process."""
    from torchvision import datasets
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    source = manifest["splits"]["train"].get("source")
    if not source or not Path(source).exists():
        raise KdistError(f"{folder}: the train split's source images are not at {source!r}; bench them where they are")
    for index, (path, name) in enumerate(folder_samples(Path(source))):
        (links / name).mkdir(exist_ok=True)
        (links / name / f"{index:07d}{path.suffix}").symlink_to(path.resolve())
    recipe = v2.Compose(
        [
            v2.ToImage(),
            v2.Lambda(lambda image: TF.center_crop(image, min(image.shape[-2:]))),
            v2.Resize(size),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomResizedCrop(size, scale=PHOTO_SCALE, ratio=PHOTO_RATIO, antialias=False),
            v2.ToDtype(torch.float32, scale=True),
            v2.ColorJitter(PHOTO_JITTER, PHOTO_JITTER, PHOTO_JITTER),
        ]
    )
    dataset = datasets.ImageFolder(str(links), transform=recipe)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)


def student_step_images_per_s(arch: str, size: int, batch: int = 32, steps: int = 3) -> float:
    model = create_model(arch).train()
    optimizer = torch.optim.AdamW(model.parameters())
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, model.num_classes, (batch,))
    train_step(model, optimizer, images, labels)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, images, labels)
    return steps * batch / (time.perf_counter() - start)


def photo_figures(folder: Path, size: int = 224, images: int = 1024, batch: int = 64, arch: str = "student") -> dict:
    manifest = verify(Path(folder), ["train"])
    count = manifest["splits"]["train"]["count"]
    batch = min(batch, count // 2)
    images = min(images, count - batch)  # the first batch is start-up
    if batch < 1 or images < batch:
        raise KdistError(f"{folder} holds {count} train images, too few to bench; pass shards of more")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one DataLoader worker has
    try:
        decoded = iter(kdist_batches(Path(folder), manifest, size, batch))
        next(decoded)  # start-up, not counted
        start = time.perf_counter()
        batches = [next(decoded) for _ in range(images // batch)]
        worker_rate = len(batches) * batch / (time.perf_counter() - start)
        recipe_rate = recipe_images_per_s(batches, manifest["splits"]["train"]["count"])
        with tempfile.TemporaryDirectory() as links:
            loader = imagefolder_loader(Path(folder), manifest, size, batch, Path(links))
            torchvision_rate = _images_per_s(loader, images)
    finally:
        torch.set_num_threads(threads)
    one_thread = 1 / (1 / worker_rate + 1 / recipe_rate)
    return {
        "shards": str(folder),
        "size": size,
        "images": len(batches) * batch,
        "kdist_worker_img_s": round(worker_rate, 1),
        "kdist_recipe_img_s": round(recipe_rate, 1),
        "kdist_one_thread_img_s": round(one_thread, 1),
        "imagefolder_worker_img_s": round(torchvision_rate, 1),
        "worker_over_imagefolder": round(worker_rate / torchvision_rate, 3),
        "one_thread_over_imagefolder": round(one_thread / torchvision_rate, 3),
        "student_step_img_s": round(student_step_images_per_s(arch, size), 1),
        "student_threads": threads,
    }


def format_photos(figures: dict) -> str:
    f = figures
    return "\n".join(
        [
            f"photo loader, {f['size']} px, {f['images']} train JPEGs of {f['shards']} (1 process, 1 thread; images/s)",
            f"  kdist loader worker: read + decode + resize          {f['kdist_worker_img_s']:8.1f}   ratio "
            f"{f['worker_over_imagefolder']:.3f}",
            f"  torchvision ImageFolder worker: + v2 transforms      {f['imagefolder_worker_img_s']:8.1f}",
            f"  kdist batched photo recipe (on the device; here CPU) {f['kdist_recipe_img_s']:8.1f}",
            f"  kdist worker and recipe in one thread                {f['kdist_one_thread_img_s']:8.1f}   ratio "
            f"{f['one_thread_over_imagefolder']:.3f}",
            f"student training step at {f['size']} px ({f['student_threads']} threads)  {f['student_step_img_s']:8.1f}",
        ]
    )
