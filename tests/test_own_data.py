"""A lab's own data end to end: other MedMNIST sets (one channel and two classes; nine classes), an image folder
of odd-sized JPEGs and PNGs, and a CSV of class names. For each, a quick study trains on the data's own classes
and `predict` on the test split's image files gives the test accuracy the study recorded."""

import csv
import json
import re

import numpy as np
import pytest
from medmnist import INFO
from PIL import Image

from kdist.cli import main

pytestmark = pytest.mark.study

QUICK = ["--quick", "--no-progress", "--set", "teacher_model.arch=student"]  # a SqueezeNet teacher: fast


def medmnist_file(root, flag, counts=None, size=28, seed=0):
    """A MedMNIST-format npz of `flag` (its channels and classes) whose mean brightness follows the label."""
    info, rng = INFO[flag], np.random.default_rng(seed)
    classes, arrays = len(info["label"]), {}
    for split, n in (counts or info["n_samples"]).items():
        labels = rng.integers(0, classes, (n, 1), dtype=np.uint8)
        shape = (n, size, size, 3) if info["n_channels"] == 3 else (n, size, size)
        images = rng.integers(0, 60, shape, dtype=np.uint8)
        images += (labels[:, 0] * (190 // classes)).astype(np.uint8).reshape((n,) + (1,) * (len(shape) - 1))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(root / f"{flag}.npz", **arrays)
    return arrays


def predicted_accuracy(weights, folder, truth: dict, tmp_path) -> float:
    """`kdist predict` on image files; the share whose predicted class is the true one."""
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(weights), str(folder), "--out", str(out)]) == 0
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(truth)
    return float(np.mean([row["predicted"] == truth[row["file"]] for row in rows]))


def write_test_pngs(images, labels, classes, folder) -> dict:
    folder.mkdir()
    truth = {}
    for i, (image, label) in enumerate(zip(images, labels.ravel())):
        path = folder / f"{i:05d}.png"
        Image.fromarray(image).save(path)
        truth[str(path)] = classes[int(label)]
    return truth


def test_grayscale_two_class_medmnist_set_end_to_end(tmp_path, capsys):
    """BreastMNIST (1 channel, 2 classes, medmnist's counts): trained on its classes, sensitivity and specificity
    of its positive class reported, evaluate and predict give the recorded test accuracy."""
    arrays = medmnist_file(tmp_path, "breastmnist")
    out = tmp_path / "run"
    args = ["run", "--flag", "breastmnist", "--data-root", str(tmp_path), "--out", str(out), *QUICK]
    assert main(args + ["--set", "report.positive_class=malignant"]) == 0
    results = json.loads((out / "results.json").read_text())
    classes = [INFO["breastmnist"]["label"][str(i)] for i in range(2)]
    assert results["dataset"] == "breastmnist" and results["classes"] == classes
    assert results["positive_class"] == "malignant"
    test = results["models"]["distilled"]["test"]
    assert set(test["per_class"]) == set(classes) and test["n"] == 156
    assert "malignant sensitivity" in (out / "report.md").read_text()
    from kdist.models import load_model

    model = load_model(out / "distilled.safetensors")
    assert model.dataset.channels == 1 and model.dataset.classes == tuple(classes) and model.num_classes == 2
    truth = write_test_pngs(arrays["test_images"], arrays["test_labels"], classes, tmp_path / "test")
    assert predicted_accuracy(out / "distilled.safetensors", tmp_path / "test", truth, tmp_path) == pytest.approx(
        test["acc"]
    )
    capsys.readouterr()
    assert main(["evaluate", str(out / "distilled.safetensors"), "--data-root", str(tmp_path), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["acc"] == pytest.approx(test["acc"])


def test_nine_class_set_and_a_teacher_of_other_classes_is_refused(tmp_path, monkeypatch, capsys):
    """PathMNIST's 9 classes (its counts made small here: the file check compares them with medmnist's INFO)."""
    counts = {"train": 600, "val": 150, "test": 120}
    monkeypatch.setitem(INFO["pathmnist"], "n_samples", counts)
    arrays = medmnist_file(tmp_path, "pathmnist", counts)
    out = tmp_path / "run"
    assert main(["run", "--flag", "pathmnist", "--data-root", str(tmp_path), "--out", str(out), *QUICK]) == 0
    results = json.loads((out / "results.json").read_text())
    classes = [INFO["pathmnist"]["label"][str(i)] for i in range(9)]
    assert results["classes"] == classes and results["positive_class"] is None
    test = results["models"]["student"]["test"]
    truth = write_test_pngs(arrays["test_images"], arrays["test_labels"], classes, tmp_path / "test")
    assert predicted_accuracy(out / "student.safetensors", tmp_path / "test", truth, tmp_path) == pytest.approx(
        test["acc"]
    )
    # A DermaMNIST-shaped teacher cannot teach a PathMNIST student: one line, exit 2, no distilled weights.
    from kdist.models import create_model, save_weights

    save_weights(create_model("student"), tmp_path / "derma_teacher.safetensors")
    capsys.readouterr()
    args = ["distill", "--teacher", str(tmp_path / "derma_teacher.safetensors"), "--flag", "pathmnist"]
    code = main(args + ["--data-root", str(tmp_path), "--out", str(tmp_path / "d"), *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "classes" in err and err.count("\n") == 0
    assert not (tmp_path / "d" / "distilled.safetensors").exists()


@pytest.mark.parametrize("flag", ["chestmnist", "organmnist3d", "nosuchmnist"])
def test_multilabel_3d_and_unknown_sets_are_refused_in_one_line(tmp_path, capsys, flag):
    code = main(["run", "--flag", flag, "--data-root", str(tmp_path), "--out", str(tmp_path / "r"), *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and flag in err and not (tmp_path / "r").exists()


def photo_folder(root, classes=("akiec", "mel", "nv"), per_split=None, seed=0) -> dict:
    """root/<split>/<class>/*.jpg|png: odd-sized photographs whose colour follows the class. {file: class} of test."""
    rng, truth = np.random.default_rng(seed), {}
    for split, n in (per_split or {"train": 60, "val": 24, "test": 24}).items():
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n // len(classes)):
                height, width = rng.integers(30, 90), rng.integers(30, 90)
                pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
                pixels[..., label] += 150
                path = root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}"
                Image.fromarray(pixels).save(path)
                if split == "test":
                    truth[str(path)] = name
    return truth


def test_image_folder_of_odd_sized_jpegs_and_pngs_end_to_end(tmp_path, capsys):
    """Classes from the folder names; trained with the photo recipe (so the teacher runs online)."""
    truth = photo_folder(tmp_path / "photos")
    shards = tmp_path / "S"
    for split in ("train", "val", "test"):
        assert (
            main(["shards", "--images", str(tmp_path / "photos" / split), "--split", split, "--out", str(shards)]) == 0
        )
    out = tmp_path / "run"
    args = ["run", "--shards", str(shards), "--size", "32", *QUICK, "--set", "data.augment=photo"]
    args += ["--set", "teacher.batch_size=20", "--set", "student.batch_size=20", "--set", "distill.batch_size=20"]
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "cached"), "--teacher-mode", "cached"]) == 2
    assert "data.augment photo needs kd.teacher_mode online" in capsys.readouterr().err
    assert not (tmp_path / "cached").exists()  # refused before any work
    assert main(args + ["--out", str(out)]) == 0
    assert "kd.teacher_mode auto: online (the teacher must see the photo recipe" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["akiec", "mel", "nv"] and results["dataset"] == "S"
    test = results["models"]["distilled"]["test"]
    assert test["n"] == 24
    weights = out / "distilled.safetensors"
    assert predicted_accuracy(weights, tmp_path / "photos" / "test", truth, tmp_path) == pytest.approx(test["acc"])
    capsys.readouterr()
    assert main(["evaluate", str(weights), "--shards", str(shards), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["acc"] == pytest.approx(test["acc"])
    assert main(["evaluate", str(weights), "--split", "test"]) == 2  # not a MedMNIST set: its shards are needed
    assert "pass --shards FOLDER" in capsys.readouterr().err
    assert main(["export", str(weights), "--onnx", str(tmp_path / "d.onnx"), "--shards", str(shards)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["classes"] == ["akiec", "mel", "nv"] and exported["checked_images"] == 24
    # A teacher trained at another size on the same shards teaches the 32 px student from its own size.
    small = ["--quick", "--no-progress", "--set", "teacher_model.arch=student", "--shards", str(shards)]
    small += ["--set", "teacher.batch_size=20", "--set", "distill.batch_size=20"]
    assert main(["train", "teacher", "--size", "48", "--out", str(tmp_path / "t48"), *small]) == 0
    teacher48 = str(tmp_path / "t48" / "teacher.safetensors")
    assert main(["distill", "--teacher", teacher48, "--size", "32", "--out", str(tmp_path / "d32"), *small]) == 0
    taught = json.loads((tmp_path / "d32" / "results.json").read_text())["models"]
    assert taught["teacher"]["data_size"] == 48 and "data_size" not in taught["distilled"]
    # The photo loader bench on these shards and their source files, beside torchvision's ImageFolder.
    capsys.readouterr()
    assert main(["bench", "--photos", str(shards), "--size", "48", "--photo-images", "40"]) == 0
    printed = capsys.readouterr().out
    for line in ("kdist loader worker", "torchvision ImageFolder worker", "batched photo recipe", "training step"):
        assert re.search(line + r".*\s\d+\.\d", printed), printed


def test_csv_of_class_names_and_its_errors(tmp_path, capsys):
    """A CSV names classes by strings (kept, in alphabetical order); a label the first split lacks, a missing
    file, a class folder without images and grayscale mixed with colour are each one line, exit 2, and leave the
    shard folder as it was."""
    photo_folder(tmp_path / "photos", classes=("mel", "other"), per_split={"train": 8, "val": 4})
    for split in ("train", "val"):
        with open(tmp_path / f"{split}.csv", "w") as handle:
            handle.write("path,label\n")
            for path in sorted((tmp_path / "photos" / split).rglob("*.*")):
                handle.write(f"photos/{split}/{path.parent.name}/{path.name},{path.parent.name}\n")
    shards = tmp_path / "S"
    assert main(["shards", "--images", str(tmp_path / "train.csv"), "--out", str(shards), "--resize", "24"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == ["mel", "other"] and manifest["image_size"] == 24
    before = sorted(p.name for p in shards.iterdir())

    def refused(source, split, words):
        capsys.readouterr()
        code = main(["shards", "--images", str(source), "--split", split, "--out", str(shards)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and all(word in err for word in words), err
        assert sorted(p.name for p in shards.iterdir()) == before

    with open(tmp_path / "one_class.csv", "w") as handle:
        handle.write("photos/val/mel/0.jpg,mel\n")
    capsys.readouterr()
    assert main(["shards", "--images", str(tmp_path / "one_class.csv"), "--out", str(tmp_path / "one")]) == 2
    assert "names one class (mel)" in capsys.readouterr().err and not (tmp_path / "one").exists()
    with open(tmp_path / "bad_label.csv", "w") as handle:
        handle.write("photos/val/mel/0.jpg,nv\n")
    refused(tmp_path / "bad_label.csv", "val", ["nv", "not among the classes"])
    with open(tmp_path / "missing.csv", "w") as handle:
        handle.write("photos/val/mel/nothing.jpg,mel\n")
    refused(tmp_path / "missing.csv", "val", ["nothing.jpg", "cannot read"])
    (tmp_path / "photos" / "val" / "empty").mkdir()
    refused(tmp_path / "photos" / "val", "val", ["empty", "holds no images"])
    (tmp_path / "photos" / "val" / "empty").rmdir()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "photos" / "val" / "mel" / "gray.png")
    refused(tmp_path / "photos" / "val", "val", ["grayscale", "colour"])
    assert main(["shards", "--images", str(tmp_path / "val.csv"), "--split", "val", "--out", str(shards)]) == 0
