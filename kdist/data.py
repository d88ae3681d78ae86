"""In-memory batching and batched augmentation of a study's images (which dataset, and reading its files:
datasets.py).

The whole split lives in memory as uint8 tensors; a batch is one tensor index, and augmentation (the 8
flips/rotations of the square, optionally a random shift of a few pixels) is applied to the whole batch at once.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from . import KdistError


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 NCHW images (computed on the train split)."""
    # One row per channel in a fixed layout: the sums do not depend on how the images lie in memory (the npz's
    # NHWC view or shards' NCHW), so every data path gets the same normalisation to the last bit.
    x = images.to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1).contiguous() / 255.0
    mean, std = x.mean(dim=1), x.std(dim=1)
    if not (std > 1e-6).all():  # normalising by a zero std would turn every input into NaN
        raise KdistError(f"train images have a constant channel (std {std.tolist()}); the data file is broken")
    return mean.tolist(), std.tolist()


def class_weights(labels: torch.Tensor, num_classes: int, mode: str = "none") -> torch.Tensor | None:
    """Per-class weights for the label loss against class imbalance (nevus is 67% of DermaMNIST):
    `inverse` 1/frequency, `inverse_sqrt` 1/sqrt(frequency), scaled to average 1 over the samples
    (so the loss keeps its scale); `none` gives None (plain cross-entropy)."""
    if mode == "none":
        return None
    counts = torch.bincount(labels.flatten(), minlength=num_classes).double()
    present = counts.clamp(min=1)  # an absent class gets a finite weight; it never occurs in the loss
    weights = 1 / present if mode == "inverse" else present.rsqrt()
    weights = weights * len(labels) / (weights * counts).sum()
    return weights.float()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1], channels_last. Normalisation lives in the model."""
    return images.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """View 0..7 of the square's symmetry group: rotate by 90*(view % 4) degrees (as torch.rot90 on the
    last two dims), then mirror if view >= 4. Written with flip/transpose, which ONNX can export."""
    turns = view % 4
    if turns == 1:
        images = images.flip(3).transpose(2, 3)
    elif turns == 2:
        images = images.flip(2).flip(3)
    elif turns == 3:
        images = images.transpose(2, 3).flip(3)
    return images.flip(3) if view >= 4 else images


@functools.cache
def _view_pixels(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(8, H*W): for each dihedral view, the source pixel (flat index) of every output pixel."""
    flat = torch.arange(height * width, device=device).view(1, 1, height, width)
    return torch.stack([dihedral(flat, view).flatten() for view in range(8)])


def apply_views(images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Image i of the batch shown in dihedral view views[i]: one gather of pixels, the same values as
    dihedral(image, view), without a host sync (no data-dependent branch or boolean indexing)."""
    n, channels, height, width = images.shape
    sources = _view_pixels(height, width, images.device)[views]  # (N, H*W)
    moved = images.reshape(n, channels, height * width).gather(2, sources[:, None, :].expand(n, channels, -1))
    return moved.view(n, channels, height, width)


def apply_shifts(images: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Image i of the float batch moved by shifts[i] = (down, right) pixels (each within +-pad), the
    uncovered border filled by reflecting the image (a dermoscopy crop has skin beyond its edge, not black)."""
    if pad == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    # out[y, x] = image[y - down, x - right], i.e. padded[y - down + pad, x - right + pad]
    rows = (pad - shifts[:, 0])[:, None] + torch.arange(height, device=images.device)
    cols = (pad - shifts[:, 1])[:, None] + torch.arange(width, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C): NHWC memory
    return out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory, i.e. channels_last


def augment(raw: torch.Tensor, views: torch.Tensor, shifts: torch.Tensor, translate: int) -> torch.Tensor:
    """A train batch as the model sees it: each uint8 image in its dihedral view, float in [0, 1]
    (channels_last), then shifted by its (down, right) pixels when `translate` > 0. Runs on the device."""
    return apply_shifts(to_float(apply_views(raw, views)), shifts, translate)


AUGMENTS = ("dihedral", "photo")  # data.augment: the recipes a train batch may get
PHOTO_SCALE, PHOTO_RATIO, PHOTO_JITTER = (0.35, 1.0), (3 / 4, 4 / 3), 0.2


def photo_draws(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The `photo` recipe's draws of an epoch, one row per train position, from (seed, epoch) alone (the same on
    every process, like epoch_draws; a stream of their own, so the order, views and shifts stay as they were):
    a crop (top, left, height, width as fractions of the image; area PHOTO_SCALE, aspect PHOTO_RATIO, as
    torchvision's RandomResizedCrop) and brightness, contrast and saturation factors in 1 +- PHOTO_JITTER."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0, 0, 0))
    area = torch.empty(n).uniform_(*PHOTO_SCALE, generator=generator)
    ratio = torch.empty(n).uniform_(math.log(PHOTO_RATIO[0]), math.log(PHOTO_RATIO[1]), generator=generator).exp()
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    top = torch.rand(n, generator=generator) * (1 - height)
    left = torch.rand(n, generator=generator) * (1 - width)
    factors = torch.empty(n, 3).uniform_(1 - PHOTO_JITTER, 1 + PHOTO_JITTER, generator=generator)
    return torch.cat([torch.stack([top, left, height, width], 1), factors], 1)


def _axis(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) sampling coordinates in [-1, 1] (grid_sample, align_corners=False) that resize the pixels
    start..start + length of an axis to `size`, clamped to the crop's first and last pixel centres (resized_crop
    resizes the crop alone)."""
    out = (torch.arange(size, dtype=start.dtype, device=start.device) + 0.5) / size  # output pixel centres, [0, 1]
    pixels = start[:, None] + out * length[:, None] - 0.5  # the source pixel coordinate of each output pixel
    pixels = pixels.clamp(min=start[:, None], max=(start + length - 1)[:, None])
    return (2 * pixels + 1) / size - 1


@functools.cache
def _view_matrices(device: torch.device) -> torch.Tensor:
    """(8, 2, 2): for each dihedral view, M with (x, y) of the source = M @ (x, y) of the viewed image, in
    grid_sample's centred coordinates: read off `dihedral` itself on a 2x2 image of coordinates."""
    centres = torch.tensor([-0.5, 0.5])
    coords = torch.stack(torch.meshgrid(centres, centres, indexing="xy"))[None]  # (1, 2, 2, 2): x, y per pixel
    points = torch.tensor([[0.5, 0.5], [-0.5, 0.5]])  # columns: (x, y) of output pixels (row 0, col 1), (1, 1)
    matrices = []
    for view in range(8):
        viewed = dihedral(coords, view)[0]
        matrices.append(torch.stack([viewed[:, 0, 1], viewed[:, 1, 1]], 1) @ torch.linalg.inv(points))
    return torch.stack(matrices).round().to(device)  # entries are 0 and +-1


def photo_augment(raw: torch.Tensor, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The `photo` recipe on a uint8 batch, to float in [0, 1]: image i in dihedral view views[i], then with the draws
    params[i] (photo_draws) its crop resized back to the full size (bilinear: torchvision.transforms.v2.functional.
    resized_crop without antialiasing), then brightness, contrast and saturation (v2.functional.adjust_*, the same
    arithmetic, in that order). View and crop are one grid_sample; one batched pass on the device, no host sync."""
    images = raw.float()  # in 0..255: the division by 255 rides on the brightness factor
    n, _, rows, cols = images.shape
    # the crop in whole pixels of this image size, as RandomResizedCrop draws it
    top, left, height, width = params[:, :4].to(images.dtype).unbind(1)
    height, width = (height * rows).round().clamp(1, rows), (width * cols).round().clamp(1, cols)
    top, left = torch.minimum((top * rows).floor(), rows - height), torch.minimum((left * cols).floor(), cols - width)
    xs, ys = _axis(left, width, cols)[:, None, :, None], _axis(top, height, rows)[:, :, None, None]  # viewed image
    m = _view_matrices(images.device)[views].to(images.dtype)  # (N, 2, 2): source (x, y) = m @ viewed (x, y)
    grid = xs * m[:, None, None, :, 0] + ys * m[:, None, None, :, 1]  # (N, H, W, 2) in one pass
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # torchvision's _blend(image, other, factor) = (factor * image + (1 - factor) * other).clamp(0, 1), in place
    brightness, contrast, saturation = (factor.view(-1, 1, 1, 1) for factor in params[:, 4:].to(images.dtype).unbind(1))
    out.mul_(brightness / 255).clamp_(0, 1)
    mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
    out.mul_(contrast).add_((1 - contrast) * mean).clamp_(0, 1)
    gray = (1 - saturation) * _grayscale(out)
    out.mul_(saturation).add_(gray).clamp_(0, 1)
    return out.contiguous(memory_format=torch.channels_last)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale (ITU-R 601-2 luma), one channel."""
    return (0.2989 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]).clamp_(0, 1)


def mix_batch(
    images: torch.Tensor,
    rng: np.random.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    global_size: int | None = None,
    offset: int = 0,
    partners_at=None,
):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a float batch with a shuffled copy of itself:
    (mixed images, (lam, perm)), where image i is lam parts of images[i] and 1 - lam parts of images[perm[i]].
    With both alphas set, each batch is one or the other at even odds (as timm does). Drawn from `rng`, so
    a run (and a resumed run) repeats its mixing. Applied once per batch, before teacher and student.
    Under several processes `images` are rows offset..offset + len(images) of a global batch of `global_size`:
    perm is drawn over the global batch and `partners_at(positions)` gives those rows of it (as the model sees
    them), so the mixing does not depend on the process count."""
    global_size = global_size or len(images)
    partners_at = partners_at or (lambda positions: images[positions])
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(global_size)).to(images.device)
    partners = partners_at(perm[offset : offset + len(images)])
    if not use_cutmix:
        return lam * images + (1 - lam) * partners, (lam, perm)
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
    top, left = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    mixed = images.clone()
    mixed[..., top : top + cut_h, left : left + cut_w] = partners[..., top : top + cut_h, left : left + cut_w]
    return mixed, (1 - cut_h * cut_w / (height * width), perm)  # lam of the box actually pasted


class IndexedBatches(Dataset):
    """A dataset indexed by a whole batch at once, (indices, views, shifts): one tensor gather per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch):
        indices, views, shifts = batch
        return self.images[indices], self.labels[indices], indices, views, shifts


def derive_seed(seed: int, epoch: int, *parts: int) -> int:
    """The one seed derivation of training: every random draw of an epoch comes from a generator seeded with
    derive_seed(seed, epoch, ...). (seed, epoch) alone seeds the draws shared by every process: the sample order,
    views and shifts, the global RNG that dropout draws from, the shard layout of a streamed epoch. Further
    parts name a finer draw: (step,) a batch's mixup, (rank, worker) a streaming worker's shuffle buffer."""
    base = seed * 100_003 + epoch  # kept as first defined, so earlier runs repeat their sample order
    # SeedSequence ignores trailing zeros: the part count keeps (step 1,) apart from (rank 1, worker 0)
    return base if not parts else int(np.random.SeedSequence((base, len(parts), *parts)).generate_state(1)[0])


def epoch_draws(n: int, seed: int, epoch: int, translate: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of a training epoch, from (seed, epoch) alone, the same on every process: the sample
    order (a permutation of n), a dihedral view per position and a (down, right) shift per position within
    +-translate. A private generator: the global RNG (dropout's) has no say."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    order = torch.randperm(n, generator=generator)
    views = torch.randint(0, 8, (n,), generator=generator)
    shifts = torch.zeros(n, 2, dtype=torch.long)
    if translate:  # drawn last, so translate 0 keeps the order and views of earlier runs
        shifts = torch.randint(-translate, translate + 1, (n, 2), generator=generator)
    return order, views, shifts


class EpochBatchSampler(Sampler):
    """Batches of (indices, dihedral view ids, (N, 2) pixel shifts) for process `rank` of `world_size`.

    Shuffled (training), `batch_size` is the global batch of one optimizer step: the epoch's order
    (epoch_draws) is cut into global batches, the last partial one left out; each global batch into
    `accumulation` micro-batches; each micro-batch into `world_size` equal slices, and process `rank`
    takes slice `rank` of every micro-batch. So every global batch holds the same samples, views and shifts
    whatever the process count. Unshuffled (evaluation): every batch in order, in view 0, unshifted."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epoch: int = 0,
        translate: int = 0,
        accumulation: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.shuffle, self.epoch, self.translate, self.accumulation = shuffle, epoch, translate, accumulation
        if shuffle and batch_size % (world_size * accumulation):
            raise ValueError(f"global batch {batch_size} does not split into {world_size} x {accumulation}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def per_process(self) -> int:
        return self.batch_size // (self.world_size * self.accumulation) if self.shuffle else self.batch_size

    def __iter__(self):
        if not self.shuffle:
            order = torch.arange(self.n)
            zeros = torch.zeros(self.n, dtype=torch.long)
            return zip(
                order.split(self.batch_size),
                zeros.split(self.batch_size),
                torch.zeros(self.n, 2, dtype=torch.long).split(self.batch_size),
            )
        order, views, shifts = epoch_draws(self.n, self.seed, self.epoch, self.translate)
        used = self.n - self.n % self.batch_size
        # position p of the epoch belongs to slice (p // per_process) % world_size of its micro-batch
        mine = (torch.arange(used) // self.per_process) % self.world_size == self.rank
        return zip(*(t[:used][mine].split(self.per_process) for t in (order, views, shifts)))

    def __len__(self) -> int:
        if not self.shuffle:
            return math.ceil(self.n / self.batch_size)
        return self.n // self.batch_size * self.accumulation


def batch_loader(
    images,
    labels,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    translate: int = 0,
    accumulation: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """In-memory batches (uint8 images, labels, indices, views, shifts); see EpochBatchSampler. `pin_memory`: in
    page-locked memory, for asynchronous copies to a GPU."""
    sampler = EpochBatchSampler(
        len(labels), batch_size, seed, rank, world_size, shuffle, epoch, translate, accumulation
    )
    # batch_size=None: the sampler already yields whole batches. The loader's own generator keeps
    # iterator creation (which draws a base seed) off the global RNG that dropout uses.
    return DataLoader(
        IndexedBatches(images, labels),
        sampler=sampler,
        batch_size=None,
        num_workers=0,
        generator=torch.Generator(),
        pin_memory=pin_memory,
    )


class MemoryImages:
    """A train split held in memory, uint8 NCHW images and their labels: what splits["train"][0] holds unless
    the shards are streamed (shard_data.ShardImages, the same interface). Indexing by positions gives a subset
    (--quick); `load()` the images (for the teacher-logit cache); `loader()` one process's batches of an epoch
    (EpochBatchSampler)."""

    streamed = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple:
        return tuple(self.images.shape)

    def __getitem__(self, positions) -> "MemoryImages":
        return MemoryImages(self.images[positions], self.labels[positions])

    def load(self) -> torch.Tensor:
        return self.images

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
    ) -> DataLoader:
        return batch_loader(
            self.images, self.labels, batch_size, True, seed, rank, world, epoch, translate, accumulation, pin_memory
        )


def subset(splits, train: int | None, val: int | None, seed: int):
    """A seeded random subset of train/val (for --quick); test stays whole."""
    out = dict(splits)
    generator = torch.Generator().manual_seed(seed)
    for split, n in (("train", train), ("val", val)):
        images, labels = splits[split]
        if n and n < len(labels):
            keep = torch.randperm(len(labels), generator=generator)[:n].sort().values
            out[split] = (images[keep], labels[keep])
    return out


def audited(epoch_batches, folder: Path, name: str, rank: int):
    """`epoch_batches` that also write the dataset indices each epoch yielded to
    <folder>/<name>-epoch<E>-rank<R>.npy once the epoch's batches run out (KDIST_AUDIT_SAMPLES, for the tests
    of how samples are dealt out to processes)."""

    class Audited:
        def __init__(self, epoch):
            self.epoch, self.batches = epoch, epoch_batches(epoch)

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            indices = []
            for batch in self.batches:
                indices.append(batch[2])
                yield batch
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{name}-epoch{self.epoch}-rank{rank}.npy", torch.cat(indices).numpy())

    return Audited
