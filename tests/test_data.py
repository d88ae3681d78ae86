"""Loading, validation and batched augmentation of DermaMNIST."""

import numpy as np
import pytest
import torch

from kdist import KdistError
from kdist.data import (
    apply_views,
    augment,
    batch_loader,
    channel_stats,
    dihedral,
    to_float,
)
from kdist.datasets import load_medmnist, medmnist_info, read_medmnist_npz, resolve_root


def write(tmp_path, arrays, name="dermamnist.npz"):
    np.savez(tmp_path / name, **arrays)
    return tmp_path


def test_loads_synthetic_file(synthetic_root):
    splits = load_medmnist(synthetic_root, "dermamnist")
    images, labels = splits["train"]
    assert images.shape == (7007, 3, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (7007,) and labels.dtype == torch.int64
    assert [len(splits[s][1]) for s in ("train", "val", "test")] == [7007, 1003, 2005]


def test_real_data_matches_medmnist_facts(real_root):
    splits = load_medmnist(real_root, "dermamnist")
    counts = torch.bincount(splits["test"][1], minlength=7).tolist()
    assert counts == [66, 103, 220, 23, 223, 1341, 29]
    mean, _ = channel_stats(splits["train"][0])
    assert mean == pytest.approx([0.7631, 0.5380, 0.5615], abs=1e-3)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KDIST_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("KDIST_DATA_ROOT")
    assert resolve_root(None).name == ".medmnist"


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(KdistError, match=r"dermamnist\.npz not found.*--data-root"):
        load_medmnist(tmp_path, "dermamnist")


def test_unsupported_size():
    with pytest.raises(KdistError, match="size 30"):
        load_medmnist(None, "dermamnist", size=30)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("val_labels"), "lacks val_images/val_labels"),
        (lambda a: a.update(train_images=a["train_images"][:, :20]), r"expected uint8 \(N, 28, 28, 3\)"),
        (lambda a: a.update(test_images=a["test_images"].astype(np.float32)), "float32"),
        (lambda a: a.update(val_labels=a["val_labels"] + 7), r"labels range 7\.\.13"),
        (lambda a: a.update(test_labels=a["test_labels"].astype(np.float32)), "expected integers"),
        (lambda a: a.update(train_images=a["train_images"][:100], train_labels=a["train_labels"][:100]), "has 7007"),
    ],
    ids=["missing-key", "shape", "dtype", "label-range", "label-dtype", "split-size"],
)
def test_validation_errors(tmp_path, base_arrays, change, message):
    arrays = dict(base_arrays)
    change(arrays)
    with pytest.raises(KdistError, match=message):
        read_medmnist_npz(write(tmp_path, arrays) / "dermamnist.npz", 28, medmnist_info("dermamnist"))


def test_truncated_npz(tmp_path, synthetic_root):
    data = (synthetic_root / "dermamnist.npz").read_bytes()
    (tmp_path / "dermamnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdistError, match="not a readable npz"):
        load_medmnist(tmp_path, "dermamnist")


def test_not_a_zip(tmp_path):
    (tmp_path / "dermamnist.npz").write_bytes(b"this is not an npz")
    with pytest.raises(KdistError, match="not a readable npz"):
        load_medmnist(tmp_path, "dermamnist")


def test_dihedral_views_are_the_eight_symmetries():
    image = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    views = [dihedral(image, v) for v in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for view in range(4):  # bit for bit torch.rot90, which the teacher caches were once built with
        assert torch.equal(dihedral(image, view), torch.rot90(image, view, (2, 3)))
    torch.testing.assert_close(dihedral(image, 4), image.flip(3))


def test_apply_views_turns_each_image_to_its_view():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    views = torch.arange(64) % 8
    out = apply_views(images, views)
    for i in range(64):
        torch.testing.assert_close(out[i : i + 1], dihedral(images[i : i + 1], int(views[i])))


def test_loader_yields_whole_batches(synthetic_root):
    splits = load_medmnist(synthetic_root, "dermamnist")
    images, labels, indices, views, shifts = next(iter(batch_loader(*splits["train"], 100, shuffle=True)))
    assert images.shape == (100, 3, 28, 28) and labels.shape == (100,) and views.shape == (100,)
    assert shifts.shape == (100, 2) and not shifts.any()  # translate is off by default
    torch.testing.assert_close(images, splits["train"][0][indices])
    assert set(views.tolist()) == set(range(8))
    assert sum(len(b[1]) for b in batch_loader(*splits["val"], 1024, shuffle=False)) == 1003


def test_memory_images_subset_and_batch_as_the_tensors_do(synthetic_root):
    """data.MemoryImages, the in-memory train split: indexing subsets images and labels together, and its
    loader is batch_loader's (the interface shard_data.ShardImages shares)."""
    from kdist.data import MemoryImages, subset

    splits = load_medmnist(synthetic_root, "dermamnist")
    train = MemoryImages(*splits["train"])
    assert len(train) == 7007 and train.shape == (7007, 3, 28, 28) and not train.streamed
    kept = subset({**splits, "train": (train, splits["train"][1])}, 500, None, seed=3)["train"][0]
    plain = subset(splits, 500, None, seed=3)["train"]
    assert torch.equal(kept.load(), plain[0]) and torch.equal(kept.labels, plain[1])
    ours = list(kept.loader(64, seed=2, rank=1, world=2, epoch=4, translate=1))
    theirs = list(batch_loader(*plain, 64, True, 2, 1, 2, 4, 1))
    assert len(ours) == len(theirs) == 7
    assert all(torch.equal(x, y) for a, b in zip(ours, theirs) for x, y in zip(a, b))


def test_one_seed_derivation_keeps_the_epoch_order_and_separates_finer_draws():
    from kdist.data import derive_seed

    assert derive_seed(3, 5) == 3 * 100_003 + 5  # the epoch seed every earlier run used
    finer = {derive_seed(3, 5, step) for step in range(100)} | {derive_seed(3, 5, 0, worker) for worker in range(8)}
    assert len(finer) == 108 and derive_seed(3, 5, 7) == derive_seed(3, 5, 7) != derive_seed(3, 6, 7)


def test_epoch_batch_sampler_depends_only_on_seed_and_epoch():
    from kdist.data import EpochBatchSampler

    def listed(sampler):
        return [(indices.tolist(), views.tolist()) for indices, views, _ in sampler]

    sampler = EpochBatchSampler(10, 3, seed=1)
    sampler.set_epoch(2)
    first = listed(sampler)
    assert listed(EpochBatchSampler(10, 3, seed=1, epoch=2)) == first and len(first) == len(sampler) == 3
    used = sum((indices for indices, _ in first), [])
    assert len(set(used)) == 9 and set(used) <= set(range(10))  # the last partial global batch (1 sample) is left out
    torch.manual_seed(123)  # the global RNG has no say
    assert listed(EpochBatchSampler(10, 3, seed=1, epoch=2)) == first
    sampler.set_epoch(3)
    assert listed(sampler) != first
    shards = [EpochBatchSampler(10, 4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    batches = [[b.tolist() for b, _, _ in s] for s in shards]
    assert len(batches[0]) == len(batches[1]) == len(shards[0]) == 2
    assert not set(sum(batches[0], [])) & set(sum(batches[1], []))


@pytest.mark.parametrize("world, accumulation", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 4)])
def test_every_process_count_deals_out_the_same_global_batches(world, accumulation):
    """The configured batch is global: N processes x K micro-steps together hold exactly the 1-process global
    batches, with the same views and shifts per sample, in micro-batch order."""
    from kdist.data import EpochBatchSampler

    def global_order(world, accumulation):
        ranks = [
            list(
                EpochBatchSampler(
                    1000, 64, seed=5, rank=r, world_size=world, epoch=3, translate=2, accumulation=accumulation
                )
            )
            for r in range(world)
        ]
        assert len({len(batches) for batches in ranks}) == 1 and len(ranks[0]) == 1000 // 64 * accumulation
        columns = [
            torch.stack([indices, views, *shifts.T])
            for step in range(len(ranks[0]))
            for indices, views, shifts in (ranks[r][step] for r in range(world))
        ]
        return torch.cat(
            columns, 1
        )  # rows: index, view, shift down, shift right; columns: the epoch's samples in order

    assert torch.equal(global_order(world, accumulation), global_order(1, 1))
    assert (
        len(set(global_order(world, accumulation)[0].tolist())) == 1000 - 1000 % 64
    )  # each sample once, the rest left out


def test_a_batch_that_does_not_divide_names_the_process_counts_that_work():
    from kdist.processes import per_process_batch

    assert per_process_batch(128, 4, 1) == 32 and per_process_batch(128, 4, 2) == 16
    with pytest.raises(
        KdistError, match=r"global batch 128 does not divide into 3 processes x 1.*1, 2, 4, 8, 16, 32, 64, 128"
    ):
        per_process_batch(128, 3, 1)
    with pytest.raises(KdistError, match="divisible by trainer.gradient_accumulation_steps"):
        per_process_batch(100, 1, 3)


def test_constant_images_are_refused_before_they_make_nan():
    with pytest.raises(KdistError, match="constant channel"):
        channel_stats(torch.full((10, 3, 4, 4), 7, dtype=torch.uint8))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    key=st.sampled_from(["train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"]),
    array=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.int8, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=6),
    ),
)
def test_fuzz_npz_validator(tmp_path_factory, base_arrays, key, array):
    """Any array in place of any key either loads or raises KdistError, never anything else."""
    arrays = dict(base_arrays, **{key: array})
    path = tmp_path_factory.mktemp("fuzz") / "dermamnist.npz"
    np.savez(path, **arrays)
    try:
        read_medmnist_npz(path, 28, medmnist_info("dermamnist"))
    except KdistError:
        pass


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_npz_random_bytes(data):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dermamnist.npz"
        path.write_bytes(data)
        with pytest.raises(KdistError):
            read_medmnist_npz(path, 28, medmnist_info("dermamnist"))


def test_class_weights_golden_values():
    from kdist.data import class_weights

    labels = torch.tensor([0, 0, 0, 1])
    assert class_weights(labels, 7, "none") is None
    # inverse: 1/3 and 1, scaled so the average weight over the samples is 1: 2/3 and 2
    torch.testing.assert_close(class_weights(labels, 7, "inverse")[:2], torch.tensor([2 / 3, 2.0]))
    # inverse_sqrt: 1/sqrt(3) and 1, scaled by 4 / (sqrt(3) + 1)
    torch.testing.assert_close(class_weights(labels, 7, "inverse_sqrt")[:2], torch.tensor([0.845299, 1.464102]))
    for mode in ("inverse", "inverse_sqrt"):
        weights = class_weights(labels, 7, mode)
        assert weights.shape == (7,) and torch.isfinite(weights).all()
        assert abs(float(weights[labels].mean()) - 1) < 1e-6


def test_apply_shifts_moves_each_image_and_reflects_the_border():
    from kdist.data import apply_shifts

    images = (
        torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    )
    shifts = torch.tensor([[1, -2], [0, 0]])
    out = apply_shifts(images, shifts, pad=2)
    assert out.shape == images.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[1], images[1])  # a zero shift leaves the image as it was
    # moved down 1 and left 2: out[y, x] = image[y - 1, x + 2] inside, reflected at the border
    torch.testing.assert_close(out[0, :, 1:, :4], images[0, :, :5, 2:])
    torch.testing.assert_close(out[0, :, 0, :4], images[0, :, 1, 2:])  # row -1 reflects to row 1
    torch.testing.assert_close(out[0, :, 1:, 4], images[0, :, :5, 4])  # column 6 reflects to column 4
    torch.testing.assert_close(apply_shifts(images, torch.zeros(2, 2, dtype=torch.long), pad=2), images)


def test_translate_draws_shifts_within_range_without_changing_order_or_views(synthetic_root):
    from kdist.data import EpochBatchSampler

    plain = list(EpochBatchSampler(50, 16, seed=3, epoch=1))
    shifted = list(EpochBatchSampler(50, 16, seed=3, epoch=1, translate=2))
    for (i0, v0, s0), (i1, v1, s1) in zip(plain, shifted):
        assert i0.tolist() == i1.tolist() and v0.tolist() == v1.tolist()  # translate 0 runs stay as they were
        assert not s0.any() and s1.abs().max() <= 2
    assert torch.cat([s for _, _, s in shifted]).abs().sum() > 0
    assert [s.tolist() for _, _, s in EpochBatchSampler(50, 16, seed=3, epoch=1, translate=2)] == [
        s.tolist() for _, _, s in shifted
    ]
    splits = load_medmnist(synthetic_root, "dermamnist")
    raw, labels, indices, views, shifts = next(iter(batch_loader(*splits["train"], 64, shuffle=True, translate=2)))
    images = augment(raw, views, shifts, 2)
    assert images.shape == (64, 3, 28, 28) and not torch.equal(images, to_float(apply_views(raw, views)))
    _, _, _, val_views, val_shifts = next(iter(batch_loader(*splits["val"], 64, shuffle=False, translate=2)))
    assert not val_views.any() and not val_shifts.any()  # evaluation is never turned or shifted


def test_translate_is_validated():
    from kdist.config import load_config

    assert load_config(None, [{"distill": {"translate": 2}}]).distill.translate == 2
    for bad in (-1, 8, 1.5):
        with pytest.raises(KdistError, match="distill.translate"):
            load_config(None, [{"distill": {"translate": bad}}])


def test_photo_recipe_is_torchvisions_resized_crop_and_colour_jitter_per_image():
    """Each image of the batched photo recipe equals its dihedral view (data.dihedral) through torchvision.
    transforms.v2.functional's resized_crop (bilinear, no antialiasing) and adjust_brightness/contrast/saturation
    with its own draws; the draws come from (seed, epoch) alone and stay inside the image and the jitter range."""
    from torchvision.transforms.v2 import functional as TF

    from kdist.data import PHOTO_JITTER, photo_augment, photo_draws

    raw, views = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8), torch.arange(16) % 8
    draws = photo_draws(16, seed=3, epoch=2)
    assert torch.equal(draws, photo_draws(16, seed=3, epoch=2)) and not torch.equal(draws, photo_draws(16, 3, 1))
    got = photo_augment(raw, views, draws)
    for image, view, out, row in zip(to_float(raw), views, got, draws.tolist()):
        top, left, height, width, brightness, contrast, saturation = row
        h, w = max(1, round(height * 40)), max(1, round(width * 40))
        t, l = min(int(top * 40), 40 - h), min(int(left * 40), 40 - w)  # noqa: E741
        expected = TF.resized_crop(dihedral(image[None], int(view))[0], t, l, h, w, [40, 40], antialias=False)
        expected = TF.adjust_brightness(expected, brightness)
        expected = TF.adjust_contrast(expected, contrast)
        expected = TF.adjust_saturation(expected, saturation)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    many = photo_draws(5000, seed=0, epoch=0)
    assert (many[:, 0] + many[:, 2] <= 1).all() and (many[:, 1] + many[:, 3] <= 1).all()
    assert many[:, 4:].min() >= 1 - PHOTO_JITTER and many[:, 4:].max() <= 1 + PHOTO_JITTER
