"""Metrics agree with scikit-learn / medmnist on fixed inputs."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from kdist.datasets import medmnist_spec
from kdist.metrics import classification_metrics, majority_baseline

DERMA = medmnist_spec("dermamnist").classes


@pytest.fixture
def fixed():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 20)
    logits = rng.normal(size=(140, 7)) + 2 * np.eye(7)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_headline_metrics_match_sklearn(fixed):
    probs, labels = fixed
    m = classification_metrics(probs, labels, DERMA)
    assert m["acc"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    ovr = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(7)])
    assert m["auc"] == pytest.approx(ovr)
    assert m["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(140), labels])))
    assert m["balanced_acc"] == pytest.approx(m["acc"])  # balanced classes
    assert 0 <= m["ece"] <= 1
    assert set(m["per_class"]) == {
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    }


def test_specificity_per_class_and_two_classes():
    """Specificity of class c: the share of the other classes' images not predicted c. Two classes: the AUC is
    that of the positive class, as medmnist's binary-class AUC; the class names default to "0", "1"."""
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.7, 0.3]])
    m = classification_metrics(probs, labels)
    assert set(m["per_class"]) == {"0", "1"}
    assert m["per_class"]["1"]["recall"] == pytest.approx(1 / 2)  # sensitivity
    assert m["per_class"]["1"]["specificity"] == pytest.approx(2 / 3)
    assert m["per_class"]["0"]["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))


def test_majority_baseline_on_real_test_split(real_root):
    from kdist.datasets import load_medmnist

    splits = load_medmnist(real_root, "dermamnist")
    m = majority_baseline(splits["train"][1].numpy(), splits["test"][1].numpy(), DERMA)
    assert m["acc"] == pytest.approx(0.6688, abs=1e-4) and m["auc"] == pytest.approx(0.5)


def test_expected_calibration_error_by_hand_and_as_torchmetrics_computed_it():
    """Four samples, 15 bins: confidences 0.9 (right), 0.9 (wrong), 0.5 (right), 1.0 (right). Bins: {0.9, 0.9}
    accuracy 0.5, confidence 0.9 -> 0.4 x 2/4; {0.5}: 0.5 x 1/4; {1.0} (its own bin, above the last edge): 0.
    ECE = 0.2 + 0.125 = 0.325."""
    from kdist.metrics import expected_calibration_error

    probs = np.array(
        [[0.9, 0.1, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0, 0], [0.5, 0.3, 0.2, 0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0, 0]]
    )
    labels = np.array([0, 1, 0, 3])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.325, abs=1e-6)
    assert expected_calibration_error(np.eye(7)[labels], labels) == 0.0  # certain and right: calibrated
