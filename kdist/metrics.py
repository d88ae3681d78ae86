"""Classification metrics from predicted probabilities, via scikit-learn and medmnist.

AUC is medmnist's definition (the mean of the one-vs-rest AUCs of the classes; for two classes the AUC of the
positive one, the same number), taken from medmnist's own evaluator so numbers are comparable with the
MedMNIST v2 benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
from medmnist.evaluator import getAUC
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, precision_recall_fscore_support, roc_auc_score

ECE_BINS = 15


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names=None) -> dict:
    """Headline and per-class metrics of a split. `probs` is (N, C) softmax output, `labels` (N,); `class_names`
    name the per-class entries (default "0".."C-1"). Per class: precision, recall (sensitivity), specificity, F1,
    one-vs-rest AUC and support."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax output sums to 1 only up to rounding
    labels = np.asarray(labels).reshape(-1)
    preds = probs.argmax(1)
    classes = list(range(probs.shape[1]))
    class_names = list(class_names) if class_names is not None else [str(c) for c in classes]
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    per_class = {}
    for c in classes:
        present = (labels == c).any() and not (labels == c).all()
        negatives = labels != c
        per_class[class_names[c]] = {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "specificity": float((preds[negatives] != c).mean()) if negatives.any() else None,
            "f1": float(f1[c]),
            "auc": float(roc_auc_score(labels == c, probs[:, c])) if present else None,
            "support": int(support[c]),
        }
    all_present = len(np.unique(labels)) == len(classes)
    task = "binary-class" if len(classes) == 2 else "multi-class"
    return {
        "n": int(len(labels)),
        "loss": float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=classes)),
        "acc": float((preds == labels).mean()),
        "auc": float(getAUC(labels, probs, task)) if all_present else None,
        "balanced_acc": float(balanced_accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, labels),
        "per_class": per_class,
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al. 2017): sum over equal-width confidence bins of |accuracy - mean confidence|
    weighted by the bin's share of samples; computed in float32 as torchmetrics' multiclass_calibration_error
    (norm l1), which kdist used before: a confidence equal to a bin edge goes to the bin above it."""
    probs = torch.from_numpy(probs).float()
    confidences, predictions = probs.max(dim=1)
    correct = predictions.eq(torch.from_numpy(labels)).float()
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidences, edges, right=True) - 1
    count = torch.zeros(bins + 1).scatter_add_(0, index, torch.ones_like(confidences))
    mean_confidence = torch.nan_to_num(torch.zeros(bins + 1).scatter_add_(0, index, confidences) / count)
    accuracy = torch.nan_to_num(torch.zeros(bins + 1).scatter_add_(0, index, correct) / count)
    return float(torch.sum(torch.abs(accuracy - mean_confidence) * (count / count.sum())))


def sample_std(values) -> float:
    """Standard deviation over seeds with n - 1 in the denominator (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def majority_baseline(train_labels: np.ndarray, labels: np.ndarray, class_names) -> dict:
    """Always predict the train split's most common class, with the train class frequencies as
    probabilities (so the loss is the NLL of the class prior and the AUC is 0.5)."""
    prior = np.bincount(np.asarray(train_labels), minlength=len(class_names)) / len(train_labels)
    probs = np.tile(prior, (len(labels), 1))
    return classification_metrics(probs, labels, class_names)


def mean_std_text(stat, pct: bool) -> str:
    """(mean, std, values) as text: percentages with 2 decimals, fractions with 4; no ± for one value."""
    mean, std, values = stat
    if mean is None:
        return "n/a"
    scale, unit = (100, "%") if pct else (1, "")
    digits = 2 if pct else 4
    text = f"{mean * scale:.{digits}f}"
    if len(values) > 1:
        text += f" ± {std * scale:.{digits}f}"
    return text + unit
