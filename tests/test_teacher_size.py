"""A teacher trained on another data file (e.g. 64 px) distils a student on its own file (e.g. 28 px):
the teacher's logits come from the train images at the teacher's size, the student sees only its own."""

import json

import numpy as np
import pytest
import yaml
from conftest import synthetic_arrays

from kdist.cache import cache_key
from kdist.cli import main
from kdist.data import subset
from kdist.datasets import load_medmnist
from kdist.inference import predict_probs
from kdist.metrics import classification_metrics
from kdist.models import DermClassifier, load_model, read_metadata, save_weights

pytestmark = pytest.mark.study

QUICK_DISTILL = [
    "--quick",
    "--no-progress",
    "--set",
    "teacher_model.arch=squeezenet1_1",
    "--set",
    "student_model.input_size=null",
]


@pytest.fixture(scope="module")
def two_size_root(tmp_path_factory, base_arrays):
    """The synthetic 28 px file and a 64 px file of the same samples (the same labels, in the same order)."""
    root = tmp_path_factory.mktemp("two-sizes")
    arrays64 = synthetic_arrays(64, seed=1)
    for key in arrays64:
        if key.endswith("_labels"):
            arrays64[key] = base_arrays[key]
    np.savez(root / "dermamnist.npz", **base_arrays)
    np.savez(root / "dermamnist_64.npz", **arrays64)
    return root


def teacher_file(path, data_size):
    save_weights(DermClassifier("squeezenet1_1", [0.5] * 3, [0.25] * 3), path, {"data_size": data_size})
    return path


def test_a_64px_teacher_is_cached_on_the_64px_images(tmp_path, two_size_root):
    teacher_path = teacher_file(tmp_path / "teacher64.safetensors", 64)
    out = tmp_path / "distilled"
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher_path),
                "--data-root",
                str(two_size_root),
                "--out",
                str(out),
                *QUICK_DISTILL,
            ]
        )
        == 0
    )
    # the cache's key hashes the images it was computed on: the 64 px train split, not the 28 px one
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    sizes = {
        size: subset(load_medmnist(two_size_root, "dermamnist", size), data["train_subset"], data["val_subset"], 0)
        for size in (28, 64)
    }
    train64, train28 = sizes[64]["train"], sizes[28]["train"]
    teacher = load_model(teacher_path)
    (cache,) = (out / "cache").glob("teacher_logits-*.safetensors")
    assert cache.name == f"teacher_logits-{cache_key(teacher, *train64)}.safetensors"
    assert cache.name != f"teacher_logits-{cache_key(teacher, *train28)}.safetensors"
    meta = read_metadata(out / "distilled.safetensors")
    assert meta["data_size"] == 28 and meta["teacher_data_size"] == 64
    # the teacher is evaluated beside its student on its own file's images, the student on its own
    models = json.loads((out / "results.json").read_text())["models"]
    assert models["teacher"]["data_size"] == 64 and "data_size" not in models["distilled"]
    for split in ("val", "test"):
        images64, labels = sizes[64][split]
        expected = classification_metrics(predict_probs(teacher, images64), labels.numpy())
        assert models["teacher"][split]["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_online_teaching_across_sizes_is_refused(tmp_path, two_size_root, capsys):
    teacher_path = teacher_file(tmp_path / "teacher64.safetensors", 64)
    out = tmp_path / "o"
    args = [
        "distill",
        "--teacher",
        str(teacher_path),
        "--data-root",
        str(two_size_root),
        "--out",
        str(out),
        "--teacher-mode",
        "online",
    ]
    assert main(args + QUICK_DISTILL) == 2
    err = capsys.readouterr().err
    assert "trained on 64 px images" in err and "kd.teacher_mode: cached" in err and err.count("\n") == 1
    assert not (out / "distilled.safetensors").exists()


def test_files_of_other_samples_are_refused(tmp_path, synthetic_root, capsys):
    root = tmp_path / "mismatched"
    root.mkdir()
    (root / "dermamnist.npz").symlink_to(synthetic_root / "dermamnist.npz")
    np.savez(root / "dermamnist_64.npz", **synthetic_arrays(64, seed=3))  # other labels: other samples
    teacher_path = teacher_file(tmp_path / "teacher64.safetensors", 64)
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher_path),
                "--data-root",
                str(root),
                "--out",
                str(tmp_path / "o"),
                *QUICK_DISTILL,
            ]
        )
        == 2
    )
    assert "do not hold the same train images in the same order" in capsys.readouterr().err


def test_an_ensemble_of_teachers_of_two_sizes_is_refused(tmp_path, two_size_root, capsys):
    paths = [teacher_file(tmp_path / "t28.safetensors", 28), teacher_file(tmp_path / "t64.safetensors", 64)]
    args = [
        "distill",
        "--teacher",
        str(paths[0]),
        "--teacher",
        str(paths[1]),
        "--data-root",
        str(two_size_root),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args + QUICK_DISTILL) == 2
    assert "trained on different image sizes [28, 64]" in capsys.readouterr().err
