"""Using trained weights: batched probabilities, `predict` on image files, ONNX export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from . import KdistError
from .cache import logits_for_all_views
from .data import to_float
from .files import atomic_output
from .models import data_size_of, dataset_of, load_model, read_metadata
from .preprocess import collect_images, load_image, to_batch

VIEWS = ("one", "mean")


def check_views(views: str) -> None:
    if views not in VIEWS:
        raise KdistError(f"views must be one of {', '.join(VIEWS)}, not {views!r}")


def view_logits(model: torch.nn.Module, images: torch.Tensor, views: str) -> torch.Tensor:
    """The model's logits for float images: as they are ("one"), or averaged over the 8 flips/rotations ("mean")."""
    return logits_for_all_views(model, images).mean(dim=1) if views == "mean" else model(images)


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024, views: str = "one"
) -> np.ndarray:
    """Softmax probabilities for uint8 NCHW images, in large batches. views="mean" is test-time
    augmentation: the softmax of the logits averaged over the 8 flips/rotations that training shows
    (the teachers' `kd.teacher_views: mean`), which makes the prediction invariant to them."""
    check_views(views)
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_float(images[start : start + batch_size].to(device))
        chunks.append(torch.softmax(view_logits(model, batch, views).float(), dim=1).cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, model.dataset.num_classes), dtype=np.float32)


def data_size(weights: Path) -> int:
    """The image size the weights were trained on (their input before any in-model upsampling)."""
    return data_size_of(read_metadata(weights))


def predict_files(
    weights: Path,
    paths: list[Path],
    teacher: Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
    views: str = "one",
) -> tuple[list[dict], list[str]]:
    """Rows of {file, predicted, prob_<class>...} (and teacher_* columns); plus one error line per unreadable file.
    `views` as in predict_probs, for every model."""
    models = {"": load_model(weights)}
    classes = models[""].dataset.classes
    if teacher:
        models["teacher_"] = load_model(teacher, expect_dataset=models[""].dataset)
    size = data_size(weights)
    if teacher and data_size(teacher) != size:
        raise KdistError(f"{teacher} was trained on {data_size(teacher)} px images, {weights} on {size} px")
    files = collect_images(paths)
    if not files:
        raise KdistError(f"no image files found in {', '.join(map(str, paths))}")
    rows, errors = [], []
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    if progress and any(Path(path).is_dir() for path in paths):  # a progress bar for folders
        from rich.progress import track

        chunks = track(chunks, description=f"predicting {len(files)} images")
    for chunk in chunks:
        arrays, good = [], []
        for path in chunk:
            try:
                arrays.append(load_image(path, size))
                good.append(path)
            except KdistError as exc:
                errors.append(str(exc))
        if not arrays:
            continue
        batch = to_batch(arrays)
        chunk_rows = [{"file": str(path)} for path in good]
        for prefix, model in models.items():
            for row, probs in zip(chunk_rows, predict_probs(model, batch, views=views)):
                row[f"{prefix}predicted"] = classes[int(probs.argmax())]
                row.update({f"{prefix}prob_{name}": round(float(p), 6) for name, p in zip(classes, probs)})
        rows += chunk_rows
    return rows, errors


def write_predictions(rows: list[dict], out: Path) -> None:
    out = Path(out)
    with atomic_output(out) as tmp:
        if out.suffix.lower() == ".json":
            tmp.write_text(json.dumps(rows, indent=2))
        else:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file"])
                writer.writeheader()
                writer.writerows(rows)


class WithSoftmax(torch.nn.Module):
    """The exported graph returns probabilities, so every runtime gets the same output as predict
    (views="mean": of the logits averaged over the 8 flips/rotations, as predict --views mean)."""

    def __init__(self, model, views: str = "one"):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, images):
        return torch.softmax(view_logits(self.model, images, self.views), dim=1)


def write_onnx(model: torch.nn.Module, size: int, out: Path) -> None:
    """The legacy (TorchScript) exporter: it needs no onnxscript and handles these CNNs exactly."""
    with atomic_output(out) as tmp:
        torch.onnx.export(
            model,
            (torch.rand(2, 3, size, size),),
            str(tmp),
            dynamo=False,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=17,
        )


def export_onnx(weights: Path, out: Path, check_images: torch.Tensor | None = None, views: str = "one") -> dict:
    """ONNX with a dynamic batch axis; input float RGB [0, 1] NCHW, output one probability per class.
    When `check_images` (uint8 NCHW) are given, compares ONNX Runtime with PyTorch on them."""
    check_views(views)
    classifier = load_model(weights)
    model = WithSoftmax(classifier.to(memory_format=torch.contiguous_format), views).eval()
    size = data_size(weights)
    out = Path(out)
    write_onnx(model, size, out)
    report = {
        "onnx": str(out),
        "input": f"float32 [batch, 3, {size}, {size}] RGB in [0, 1]",
        "classes": list(classifier.dataset.classes),
        "views": views,
    }
    if check_images is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        expected = predict_probs(model.model, check_images, views=views)
        got = session.run(None, {"images": to_float(check_images).contiguous().numpy()})[0]
        report["checked_images"] = len(check_images)
        report["max_abs_diff_probabilities"] = float(np.abs(got - expected).max())
    return report


def test_images(weights: Path, data_root=None, shards=None, count: int = 512) -> torch.Tensor:
    """The first `count` test images of the data the weights were trained on (uint8 NCHW): from `shards` (a
    folder from `kdist shards`) when given, else from the weights' MedMNIST file in the data root."""
    from .datasets import load_medmnist, medmnist_info
    from .shard_data import read_manifest, read_split

    size = data_size(weights)
    if shards:
        images = read_split(Path(shards), "test", size, manifest=read_manifest(Path(shards)))[0]
    else:
        name = dataset_of(read_metadata(weights)).name  # the header alone, no weights loaded
        try:
            medmnist_info(name)
        except KdistError:
            raise KdistError(
                f"{weights} was trained on {name}, not a MedMNIST set; pass --shards FOLDER (its shards) for the test "
                "images, or --check-images 0"
            ) from None
        images = load_medmnist(data_root, name, size, download=False)["test"][0]
    return images[:count]
