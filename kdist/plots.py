"""Figures of a distillation study (matplotlib, PNG), drawn from what a run folder saved."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from .metrics import ECE_BINS  # noqa: E402

# HAM10000's abbreviations of DermaMNIST's class names, for axes and titles; other names are cut to 10 letters
ABBREVIATIONS = {
    "actinic keratoses and intraepithelial carcinoma": "akiec",
    "basal cell carcinoma": "bcc",
    "benign keratosis-like lesions": "bkl",
    "dermatofibroma": "df",
    "melanoma": "mel",
    "melanocytic nevi": "nv",
    "vascular lesions": "vasc",
}
COLORS = {"teacher": "tab:blue", "student": "tab:orange", "distilled": "tab:green"}
LABELS = {"teacher": "Teacher", "student": "Student (alone)", "distilled": "Student (distilled)"}


def read_history(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A stage's metrics.csv (written by engine.fit; old runs also have resume-<n>/metrics.csv of resumed runs, later
    ones winning for the same epoch -> {metric: [(epoch, value), ...]}."""
    history: dict[str, dict[int, float]] = {}
    resumed = sorted(stage_dir.glob("resume-*/metrics.csv"), key=lambda p: int(p.parent.name.split("-")[1]))
    for path in [stage_dir / "metrics.csv", *resumed]:
        if not path.exists():
            continue
        with open(path) as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key not in ("epoch", "step") and value not in ("", None):
                        history.setdefault(key, {})[int(row["epoch"])] = float(value)
    return {key: sorted(values.items()) for key, values in history.items()}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(history: dict, name: str, out: Path) -> list[Path]:
    """Train/val loss and train/val accuracy against epoch for one model."""
    paths = []
    for metric, ylabel in (("loss", "loss (cross-entropy)"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for split, style in (("train", "--"), ("val", "-")):
            points = history.get(f"{split}/{metric}", [])
            if points:
                ax.plot(*zip(*[(e + 1, v) for e, v in points]), style, marker="o", ms=3, label=split)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{LABELS.get(name, name)}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / f"{name}_{metric}.png"))
    return paths


def comparison(histories: dict[str, dict], out: Path) -> list[Path]:
    """Val loss and val accuracy of all models on one plot each."""
    paths = []
    for metric, ylabel in (("loss", "val loss"), ("acc", "val accuracy")):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, history in histories.items():
            points = history.get(f"val/{metric}", [])
            if points:
                ax.plot(
                    *zip(*[(e + 1, v) for e, v in points]),
                    marker="o",
                    ms=3,
                    color=COLORS.get(name),
                    label=LABELS.get(name, name),
                )
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"All models: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / f"compare_val_{metric}.png"))
    return paths


def short_names(classes) -> list[str]:
    return [ABBREVIATIONS.get(name, name[:10]) for name in classes]


def prediction_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, name: str, out: Path, classes) -> Path:
    """Test images (NHWC uint8, upscaled by imshow) titled predicted/true; green right, red wrong."""
    short = short_names(classes)
    side = int(np.ceil(np.sqrt(len(images))))
    fig, axes = plt.subplots(side, side, figsize=(1.7 * side, 1.85 * side))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, label, prob in zip(np.ravel(axes), images, labels, probs):
        pred = int(prob.argmax())
        ax.imshow(image, interpolation="nearest")
        ax.set_title(
            f"pred {short[pred]} {prob[pred]:.2f}\ntrue {short[label]}",
            fontsize=8,
            color="green" if pred == label else "red",
        )
    fig.suptitle(f"{LABELS.get(name, name)}: test images (pred / true)", fontsize=10)
    return _save(fig, out / f"{name}_test_grid.png")


def confusion(labels: np.ndarray, probs: np.ndarray, name: str, out: Path, classes) -> Path:
    """Row-normalised confusion matrix (rows: true class; each row sums to 1 = recall)."""
    matrix = confusion_matrix(labels, probs.argmax(1), labels=range(len(classes)), normalize="true")
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            ax.text(
                j,
                i,
                f"{matrix[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] > 0.5 else "black",
            )
    ticks = range(len(classes))
    ax.set_xticks(ticks, short_names(classes))
    ax.set_yticks(ticks, short_names(classes))
    ax.set(xlabel="predicted", ylabel="true", title=f"{LABELS.get(name, name)}: test confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out / f"{name}_confusion.png")


def reliability(predictions: dict[str, tuple[np.ndarray, np.ndarray]], eces: dict[str, float], out: Path) -> Path:
    """Reliability diagram: accuracy against confidence in 15 equal-width bins, per model."""
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for name, (labels, probs) in predictions.items():
        confidence, correct = probs.max(1), probs.argmax(1) == labels
        bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, ECE_BINS - 1)
        accuracy = [correct[bins == b].mean() if (bins == b).any() else np.nan for b in range(ECE_BINS)]
        ax.plot(
            centres,
            accuracy,
            marker="o",
            ms=4,
            color=COLORS.get(name),
            label=f"{LABELS.get(name, name)} (ECE {eces[name]:.3f})",
        )
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability on test (15 bins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "reliability.png")
