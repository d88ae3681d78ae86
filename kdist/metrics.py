"""Classification metrics from predicted probabilities, via scikit-learn, torchmetrics and medmnist.

AUC is medmnist's definition (mean of the one-vs-rest AUCs of the 7 classes), taken from
medmnist's own evaluator so numbers are comparable with the MedMNIST v2 benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
from medmnist.evaluator import getAUC
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, precision_recall_fscore_support, roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error

from .data import CLASS_NAMES, INFO, NUM_CLASSES

ECE_BINS = 15


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Headline and per-class metrics of a split. `probs` is (N, C) softmax output, `labels` (N,)."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax output sums to 1 only up to rounding
    labels = np.asarray(labels).reshape(-1)
    preds = probs.argmax(1)
    classes = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0
    )
    per_class = {}
    for c in classes:
        present = (labels == c).any() and not (labels == c).all()
        per_class[CLASS_NAMES[c]] = {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auc": float(roc_auc_score(labels == c, probs[:, c])) if present else None,
            "support": int(support[c]),
        }
    all_present = len(np.unique(labels)) == NUM_CLASSES
    return {
        "n": int(len(labels)),
        "loss": float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=classes)),
        "acc": float((preds == labels).mean()),
        "auc": float(getAUC(labels, probs, INFO["task"])) if all_present else None,
        "balanced_acc": float(balanced_accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "ece": float(
            multiclass_calibration_error(
                torch.from_numpy(probs).float(), torch.from_numpy(labels), NUM_CLASSES, n_bins=ECE_BINS, norm="l1"
            )
        ),
        "per_class": per_class,
    }


def sample_std(values) -> float:
    """Standard deviation over seeds with n - 1 in the denominator (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def majority_baseline(train_labels: np.ndarray, labels: np.ndarray) -> dict:
    """Always predict the train split's most common class, with the train class frequencies as
    probabilities (so the loss is the NLL of the class prior and the AUC is 0.5)."""
    prior = np.bincount(np.asarray(train_labels), minlength=NUM_CLASSES) / len(train_labels)
    probs = np.tile(prior, (len(labels), 1))
    return classification_metrics(probs, labels)
