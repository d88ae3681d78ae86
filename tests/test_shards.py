"""Webdataset shards: written from a MedMNIST file and from an image folder, checked against the manifest,
streamed as disjoint equal shares per process, and every corruption ends in one KdistError naming the shard."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kdist import KdistError
from kdist.cli import main
from kdist.datasets import load_medmnist
from kdist.shard_data import ShardImages, read_manifest, read_split, stream, verify
from kdist.shard_writer import write_images


@pytest.fixture(scope="module")
def shards(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("shards") / "S"
    assert (
        main(
            [
                "shards",
                "--data-root",
                str(synthetic_root),
                "--flag",
                "dermamnist",
                "--size",
                "28",
                "--out",
                str(out),
                "--maxcount",
                "1000",
            ]
        )
        == 0
    )
    return out


def test_manifest_counts_histograms_and_checksums(shards, synthetic_root):
    manifest = verify(shards)
    npz = load_medmnist(synthetic_root, "dermamnist")
    for split, n in (("train", 7007), ("val", 1003), ("test", 2005)):
        entry = manifest["splits"][split]
        assert entry["count"] == n == sum(shard["count"] for shard in entry["shards"])
        histogram = np.bincount(npz[split][1].numpy(), minlength=7)
        assert entry["class_histogram"] == {str(k): int(v) for k, v in enumerate(histogram) if v}
    assert len(manifest["splits"]["train"]["shards"]) == 8 and manifest["image_size"] == 28
    np.testing.assert_allclose(
        manifest["channel_mean"], (npz["train"][0].double() / 255).mean(dim=(0, 2, 3)).numpy(), atol=1e-9
    )
    # One definition of the normalisation: the manifest's is the in-memory path's, to the last bit.
    from kdist.data import channel_stats

    assert (manifest["channel_mean"], manifest["channel_std"]) == channel_stats(npz["train"][0])


def test_shards_are_plain_ustar_and_rewritten_byte_for_byte(shards, synthetic_root, tmp_path):
    """No pax header per member (they doubled the readers' tar parsing) and the same bytes on every write."""
    import tarfile

    with tarfile.open(shards / "val-000000.tar") as tar:
        assert not any(member.pax_headers for member in tar.getmembers())
    assert (
        main(["shards", "--data-root", str(synthetic_root), "--out", str(tmp_path / "again"), "--maxcount", "1000"])
        == 0
    )
    assert (
        read_manifest(tmp_path / "again")["splits"] == read_manifest(shards)["splits"]
    )  # sha256 of every shard included


def test_evaluation_reads_every_sample_once_losslessly(shards, synthetic_root):
    images, labels = read_split(shards, "test", 28)
    npz = load_medmnist(synthetic_root, "dermamnist")["test"]
    assert torch.equal(images, npz[0].contiguous()) and torch.equal(labels, npz[1])


def indices_of(batches) -> list[int]:
    return [index for _, _, indices in batches for index in indices.tolist()]


def test_stream_gives_disjoint_equal_shares_repeatable_per_epoch(shards):
    seen = {}
    for rank in (0, 1):
        batches = stream(shards, "train", 28, 100, seed=3, epoch=0, rank=rank, world=2)
        got = list(batches)
        assert batches.num_workers == 0  # num_workers=0: read in the calling process
        assert len(got) == len(batches) == 7007 // 100  # global batch 100: 50 per process, the same count on both ranks
        assert got[0][0].shape == (50, 3, 28, 28) and got[0][0].dtype == torch.uint8
        seen[rank] = indices_of(got)
    assert not set(seen[0]) & set(seen[1])
    again = indices_of(stream(shards, "train", 28, 100, seed=3, epoch=0, rank=0, world=2))
    other = indices_of(stream(shards, "train", 28, 100, seed=3, epoch=1, rank=0, world=2))
    assert again == seen[0] and other != seen[0]


@pytest.mark.parametrize("world, accumulation", [(1, 1), (3, 1), (8, 1), (4, 2)])
def test_streaming_uses_each_sample_once_for_any_process_and_worker_count(shards, world, accumulation):
    """8 shards of up to 1000, up to 8 processes x 2 workers: ranges split inside shards where needed; every
    process yields the same number of batches, each sample at most once, all but the last partial global batch."""
    keep = np.sort(np.concatenate([np.arange(1000), np.arange(1000, 7007, 5)]))  # shard 0 whole, a fifth of the rest
    batch = 96 * accumulation
    per_rank = []
    for rank in range(world):
        batches = stream(
            shards,
            "train",
            28,
            batch,
            seed=0,
            epoch=0,
            rank=rank,
            world=world,
            accumulation=accumulation,
            num_workers=2,
            keep=keep,
        )
        got = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=batches.num_workers))
        assert len(got) == len(batches) and all(len(labels) == batch // (world * accumulation) for _, labels, _ in got)
        per_rank.append(indices_of(got))
    assert len({len(indices) for indices in per_rank}) == 1
    used = sum(per_rank, [])
    assert len(used) == len(set(used)) == len(keep) - len(keep) % batch and set(used) <= set(keep.tolist())


def test_streamed_epochs_share_persistent_workers_and_keep_each_epochs_order(shards):
    """ShardImages.loader serves every epoch from one DataLoader whose workers persist (told the epoch through
    shared memory): the same worker processes each epoch, and each epoch's samples in the order a fresh
    per-epoch stream gives."""
    manifest = read_manifest(shards)
    images = ShardImages(shards, manifest, "train", 28, keep=np.arange(0, 7007, 7), num_workers=2)
    workers, loaders = [], set()
    for epoch in (0, 1, 2):
        draws = images.loader(100, seed=4, rank=1, world=2, epoch=epoch)
        loaders.add(id(draws.loader))
        got = [int(i) for batch in draws for i in images.keep[batch[2].numpy()]]
        workers.append(sorted(w.pid for w in draws.loader._iterator._workers))
        fresh = stream(shards, "train", 28, 100, 4, epoch, rank=1, world=2, num_workers=2, keep=images.keep)
        loader = torch.utils.data.DataLoader(fresh, batch_size=None, num_workers=2)
        assert got == indices_of(loader)
    assert len(loaders) == 1 and workers[0] == workers[1] == workers[2]


def test_fewer_samples_than_a_global_batch_are_named(shards):
    keep = np.arange(0, 7007, 7007 // 100)[:100]
    assert len(stream(shards, "train", 28, 100, seed=0, epoch=0, world=2, num_workers=2, keep=keep)) == 1
    with pytest.raises(KdistError, match="fewer than one global batch of 128"):
        stream(shards, "train", 28, 128, seed=0, epoch=0, world=2, num_workers=2, keep=keep)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_named_by_verify_and_the_command(shards, tmp_path, capsys):
    broken = tmp_path / "S"
    shutil.copytree(shards, broken)
    shard = broken / "train-000003.tar"
    flip_byte(shard, shard.stat().st_size // 2)
    with pytest.raises(KdistError, match="train-000003.tar does not match its checksum"):
        verify(broken)
    assert main(["shards", "--verify", "--out", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-000003.tar" in err


def test_training_from_a_flipped_shard_exits_2_naming_it_and_writes_nothing(shards, tmp_path, capsys):
    broken = tmp_path / "S"
    shutil.copytree(shards, broken)
    flip_byte(broken / "train-000005.tar", (broken / "train-000005.tar").stat().st_size // 2)
    assert main(["train", "student", "--shards", str(broken), "--quick", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-000005.tar" in err and "checksum" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("memory_mb", [0, 64])
def test_an_undecodable_image_in_training_ends_in_one_line_naming_shard_and_sample(shards, tmp_path, capsys, memory_mb):
    """A shard whose checksum agrees but whose images do not decode (written so): the error, from a DataLoader
    worker (streamed) or from the first read (kept in memory), is one line naming the shard and the sample."""
    import webdataset as wds

    from kdist.shard_data import sha256

    broken = tmp_path / "S"
    shutil.copytree(shards, broken)
    shard = broken / "train-000002.tar"
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    with wds.TarWriter(str(shard)) as writer:
        for sample in samples:
            writer.write(
                {"__key__": sample["__key__"], "png": b"not a png", "cls": sample["cls"], "idx.cls": sample["idx.cls"]}
            )
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][2].update(bytes=shard.stat().st_size, sha256=sha256(shard))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert (
        main(
            [
                "train",
                "student",
                "--shards",
                str(broken),
                "--quick",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
                "--set",
                f"data.memory_mb={memory_mb}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-000002.tar: sample train-" in err, err


def test_the_train_loader_repeats_itself_and_reads_the_stored_pixels(shards, synthetic_root):
    """Two DataLoader workers, a --quick-like subset: the same (seed, epoch) gives the same batches, views and
    shifts; another epoch another order; every image is the stored one at its position; equal batch counts."""
    train = ShardImages(shards, read_manifest(shards), "train", 28, num_workers=2)[torch.arange(0, 7007, 3)]
    npz_images = load_medmnist(synthetic_root, "dermamnist")["train"][0][::3]
    first = list(train.loader(64, seed=1, epoch=0, translate=2))
    again = list(train.loader(64, seed=1, epoch=0, translate=2))
    assert len(first) == len(train.loader(64, seed=1)) == len(train) // 64
    assert all(torch.equal(a, b) for one, two in zip(first, again) for a, b in zip(one, two))
    later = list(train.loader(64, seed=1, epoch=1, translate=2))
    assert not torch.equal(first[0][2], later[0][2])
    for images, labels, positions, views, shifts in first:
        assert torch.equal(images, npz_images[positions]) and views.max() < 8 and shifts.abs().max() <= 2
    ranks = [torch.cat([batch[2] for batch in train.loader(64, seed=1, rank=rank, world=2)]) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0].tolist()) & set(ranks[1].tolist())


def test_shards_that_fit_in_memory_are_the_npz_in_memory(shards, synthetic_root):
    """data.memory_mb: the train split decoded once is trained on as the npz is: the same images in the same
    order and the same normalisation, so a study from shards equals one from the npz (test_cli checks the run)."""
    from kdist.config import DataConfig, TrainerConfig
    from kdist.data import channel_stats
    from kdist.processes import make_accelerator
    from kdist.study_data import open_shard_splits

    accelerator = make_accelerator(TrainerConfig(cpu=True))
    npz = load_medmnist(synthetic_root, "dermamnist")
    splits, mean, std, _, _ = open_shard_splits(DataConfig(root=str(synthetic_root), shards=str(shards)), accelerator)
    assert all(
        torch.equal(splits[split][0], npz[split][0].contiguous()) and torch.equal(splits[split][1], npz[split][1])
        for split in ("val", "test")
    )
    assert torch.equal(splits["train"][0].load(), npz["train"][0]) and torch.equal(splits["train"][1], npz["train"][1])
    assert not splits["train"][0].streamed
    assert (mean, std) == channel_stats(npz["train"][0])
    streamed, _, _, _, _ = open_shard_splits(
        DataConfig(root=str(synthetic_root), shards=str(shards), memory_mb=1), accelerator
    )
    assert isinstance(streamed["train"][0], ShardImages) and torch.equal(streamed["train"][1], npz["train"][1])
    assert streamed["train"][0].streamed


def test_pipe_urls_read_the_same_samples_as_local_paths(shards):
    local = read_split(shards, "val", 28)
    piped = read_split(shards, "val", 28, url_template=f"pipe:cat {shards}/{{name}}")
    assert torch.equal(local[0], piped[0]) and torch.equal(local[1], piped[1])


def test_missing_shard_and_bad_manifest_are_named(shards, tmp_path):
    broken = tmp_path / "S"
    shutil.copytree(shards, broken)
    (broken / "val-000001.tar").unlink()
    with pytest.raises(KdistError, match="val-000001.tar is missing"):
        verify(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(KdistError, match="manifest.json is not valid JSON"):
        read_manifest(broken)


def rewrite_val_shard(folder: Path, change) -> None:
    """Rewrites val-000000.tar with `change` applied to each sample (None: left out), and the manifest's size
    and sha256 to match: a shard that passes the checksum check but holds bad content."""
    import webdataset as wds

    from kdist.shard_data import sha256

    shard = folder / "val-000000.tar"
    samples = [dict(sample) for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())]
    with wds.TarWriter(str(shard)) as writer:
        for sample in samples:
            changed = change({key: value for key, value in sample.items() if key not in ("__url__", "__local_path__")})
            if changed is not None:
                writer.write(changed)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256(shard))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_label_out_of_range_or_a_lost_sample_is_named(shards, tmp_path):
    broken = tmp_path / "labels"
    shutil.copytree(shards, broken)
    rewrite_val_shard(broken, lambda sample: {**sample, "cls": b"9"} if sample["__key__"] == "val-0000005" else sample)
    verify(broken)  # the checksums agree: only decoding can tell
    with pytest.raises(KdistError, match=r"val-000000.tar: sample val-0000005: label 9 outside 0..6"):
        read_split(broken, "val", 28)
    short = tmp_path / "short"
    shutil.copytree(shards, short)
    rewrite_val_shard(short, lambda sample: None if sample["__key__"] == "val-0000005" else sample)
    with pytest.raises(KdistError, match=r"val-000000.tar holds 999 samples, manifest.json says 1000"):
        read_split(short, "val", 28)


def test_writing_over_existing_shards_is_refused(shards, synthetic_root):
    before = {path.name: path.stat().st_mtime_ns for path in shards.iterdir()}
    assert main(["shards", "--data-root", str(synthetic_root), "--out", str(shards)]) == 2
    assert {path.name: path.stat().st_mtime_ns for path in shards.iterdir()} == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(min_value=0, max_value=10**7),
    length=st.integers(min_value=1, max_value=4096),
    truncate=st.booleans(),
)
def test_corrupted_shards_end_in_one_named_error_or_valid_samples(shards, tmp_path_factory, offset, length, truncate):
    """Reading a damaged shard without the manifest check: every outcome is valid samples or a KdistError,
    never another exception (the checksum check in verify catches all of these first)."""
    folder = tmp_path_factory.mktemp("corrupt")
    shutil.copytree(shards, folder / "S")
    shard = folder / "S" / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    start = offset % len(data)
    if truncate:
        data = data[:start]
    else:
        data[start : start + length] = bytes(255 - b for b in data[start : start + length])
    shard.write_bytes(bytes(data))
    with pytest.raises(KdistError, match="val-000000.tar"):
        verify(folder / "S")
    manifest = json.loads((folder / "S" / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0].update(
        bytes=len(data), sha256=__import__("kdist.shard_data", fromlist=["sha256"]).sha256(shard)
    )
    (folder / "S" / "manifest.json").write_text(json.dumps(manifest))  # the manifest now agrees: only reading can tell
    try:
        images, labels = read_split(folder / "S", "val", 28)
    except KdistError as exc:
        assert "val" in str(exc) or "shard" in str(exc) or "sample" in str(exc)
    else:
        assert len(labels) == 1003 and int(labels.max()) < 7 and images.dtype == torch.uint8


def test_any_medmnist_flag_is_written_with_its_classes_and_counts(tmp_path):
    """A grayscale flag medmnist's INFO knows (PneumoniaMNIST, 2 classes, 1 channel): its counts, class
    names and histograms in the manifest; the pixels read back lossless (gray in all three channels)."""
    from medmnist import INFO

    info, rng = INFO["pneumoniamnist"], np.random.default_rng(0)
    arrays = {}
    for split, n in info["n_samples"].items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    assert main(["shards", "--data-root", str(tmp_path), "--flag", "pneumoniamnist", "--out", str(tmp_path / "P")]) == 0
    manifest = verify(tmp_path / "P")
    assert manifest["classes"] == [info["label"]["0"], info["label"]["1"]]
    for split, n in info["n_samples"].items():
        labels = arrays[f"{split}_labels"].ravel()
        assert manifest["splits"][split]["count"] == n
        assert manifest["splits"][split]["class_histogram"] == {str(c): int((labels == c).sum()) for c in (0, 1)}
    images, labels = read_split(tmp_path / "P", "val", 28)
    assert torch.equal(images, torch.from_numpy(arrays["val_images"])[:, None].expand(-1, 3, -1, -1))
    assert labels.tolist() == arrays["val_labels"].ravel().tolist()
    assert main(["shards", "--data-root", str(tmp_path), "--flag", "nosuchmnist", "--out", str(tmp_path / "Q")]) == 2


def test_image_folder_shards_keep_the_original_bytes_and_resize_on_read(tmp_path):
    for label, name in enumerate(["benign", "malignant"]):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            buffer = io.BytesIO()
            Image.fromarray(np.full((45, 60, 3), 40 * i + 100 * label, dtype=np.uint8)).save(buffer, format="JPEG")
            (tmp_path / "photos" / name / f"{i}.jpg").write_bytes(buffer.getvalue())
    manifest = write_images(tmp_path / "photos", tmp_path / "S", split="train", maxcount=4)
    assert manifest["classes"] == ["benign", "malignant"] and manifest["splits"]["train"]["count"] == 6
    assert len(manifest["splits"]["train"]["shards"]) == 2
    images, labels = read_split(tmp_path / "S", "train", 16)
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "photos" / "benign" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(KdistError, match="bad.jpg"):
        write_images(tmp_path / "photos", tmp_path / "S2", split="train")
    assert not (tmp_path / "S2" / "manifest.json").exists() and not list(
        (tmp_path / "S2").glob("*.tar")
    )  # nothing half-written


def test_loader_workers_default_from_the_cpus_a_process_may_use(monkeypatch):
    import os

    from kdist.study_data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))  # what Slurm's --cpus-per-task=32 gives
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None) == 3 and loader_workers(5) == 5  # 32 CPUs / 8 processes, less the process itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(None) == 8  # capped
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert loader_workers(None) == 0  # one CPU: read in the training process
