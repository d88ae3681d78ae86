"""Shared fixtures: a synthetic DermaMNIST file (official split sizes, random pixels), the real data root and an
untrained teacher file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdist.datasets import medmnist_info

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
REAL_ROOT = Path(os.environ.get("KDIST_DATA_ROOT") or REPO.parent / "shared" / "data")


def synthetic_arrays(size: int = 28, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images whose mean colour depends on the label, so a model can learn something."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in medmnist_info("dermamnist")["n_samples"].items():
        labels = rng.integers(0, 7, size=(n, 1), dtype=np.uint8)
        images = rng.integers(0, 128, size=(n, size, size, 3), dtype=np.uint8)
        images[..., 0] += (labels[:, 0] * 18).astype(np.uint8)[:, None, None]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


@pytest.fixture(scope="session")
def base_arrays():
    return synthetic_arrays()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, base_arrays) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    np.savez(root / "dermamnist.npz", **base_arrays)
    # Its shards are written here, once, into the cache the tests use (_no_downloads): then no test's stderr
    # depends on whether it happened to be the first to train from them (writing them prints a line).
    from kdist.study_data import auto_shards

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDIST_SHARD_CACHE", str(tmp_path_factory.getbasetemp() / "shard-cache"))
        auto_shards(root, "dermamnist", 28)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not (REAL_ROOT / "dermamnist.npz").exists():
        pytest.skip(f"real DermaMNIST not found in {REAL_ROOT}; set KDIST_DATA_ROOT")
    return REAL_ROOT


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_test(request, monkeypatch):
    """On a machine with GPUs the suite's exact (bit-for-bit, 1-vs-N process) tests still run on the CPU, on
    purpose: every GPU is hidden from kdist and its subprocesses (CUDA_VISIBLE_DEVICES=-1, launch/cpu.yaml's
    way), except in tests marked `gpu`, which run on the GPU and skip elsewhere."""
    if request.node.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (a `gpu` test)")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path_factory):
    # Tests never reach the network: a missing file fails at once with kdist's message.
    monkeypatch.setenv("KDIST_NO_DOWNLOAD", "1")
    # ... and `--shards auto` writes its shards under the test session's temporary folder, not in ~/.cache.
    monkeypatch.setenv("KDIST_SHARD_CACHE", str(tmp_path_factory.getbasetemp() / "shard-cache"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained EfficientNet-B0 as a teacher file (28 px data): distillation tests need only its logits."""
    from kdist.models import create_model, save_weights

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_weights(create_model("teacher", input_size=None), path, {"data_size": 28})
    return path
