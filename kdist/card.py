"""MODEL_CARD.md for the distilled student of a run (Mitchell et al., "Model Cards for Model Reporting", 2019)."""

from __future__ import annotations

from .metrics import mean_std_text

# What a card says about a dataset's source, licence and known limits, where kdist knows it.
DATA_NOTES = {
    "dermamnist": {
        "source": "DermaMNIST (MedMNIST v2), built from HAM10000: train 7007 / val 1003 / test 2005 images, 7 "
        "classes. HAM10000 is CC BY-NC-SA 4.0 and DermaMNIST CC BY-NC 4.0: non-commercial use with attribution "
        "(Tschandl et al., Sci. Data 2018; Codella et al. 2019; Yang et al., Sci. Data 2023). The weights inherit "
        "the non-commercial terms.",
        "limits": [
            "28 px (or 64 px) images discard most dermoscopic detail; real clinical images are far larger.",
            "Dataset bias: about 67% of images are melanocytic nevi; rare classes (dermatofibroma, vascular lesions) "
            "have few examples and the least reliable metrics.",
            "HAM10000 comes from two centres and mostly fair-skinned patients; performance on other populations, "
            "devices or non-dermoscopic photos is unknown.",
            "Multiple images of the same lesion can occur in HAM10000; the official split may not separate them.",
        ],
    },
}


def _pm(stat, pct=True) -> str:
    """mean ± std as the report writes it, and over how many seeds."""
    seeds = len(stat[2])
    if stat[0] is None:
        return "n/a"
    return mean_std_text(stat, pct) + (f" (std over {seeds} seeds)" if seeds > 1 else " (one seed)")


def model_card(summary: dict, first: dict, n_seeds: int) -> str:
    distilled, student, teacher = summary["distilled"], summary.get("student"), summary.get("teacher")
    test = distilled["test"]
    per_class = first["models"]["distilled"]["test"]["per_class"]
    weakest = sorted(per_class.items(), key=lambda kv: kv[1]["recall"])[:3]
    weak_lines = "\n".join(
        f"- {name}: recall {m['recall']:.2f}, precision {m['precision']:.2f} ({m['support']} test images)"
        for name, m in weakest
    )
    compare = []
    for label, entry in (("teacher", teacher), ("student trained alone", student)):
        if entry:
            compare.append(
                f"- {label} ({entry['arch']}, {entry['params'] / 1e6:.2f}M params): test accuracy "
                f"{_pm(entry['test']['acc'])}"
            )
    compare = "\n".join(compare)
    teacher_name = f"a `{teacher['arch']}` teacher" if teacher else "its teacher"  # the one the study really used
    classes = list(per_class)
    notes = DATA_NOTES.get(first["dataset"], {})
    source = notes.get("source") or (
        f"{first['dataset']}: {len(classes)} classes, {first['models']['distilled']['test']['n']} "
        "test images. The weights inherit the data's licence terms."
    )
    generic_limits = ["Performance outside the data it was trained on (populations, devices, sites) is unknown."]
    limits = "\n".join(
        f"- {line}"
        for line in notes.get("limits", generic_limits)
        + [f"{n_seeds} seed(s) evaluated; single-seed differences under one point are noise."]
    )
    positive = first.get("positive_class")
    screening = ""
    if positive:
        screening = f"- {positive} sensitivity: {_pm(test['sensitivity'])}, specificity: {_pm(test['specificity'])}\n"
    return f"""# Model card: kdist distilled student ({distilled["arch"]})

## Intended use
Research and teaching on knowledge distillation for skin-lesion classification. **Not a medical
device**: it must not be used to diagnose, triage or reassure patients. Outputs are probabilities
over {len(classes)} classes ({", ".join(classes)}), not a clinical finding.

## Model
- Architecture: torchvision `{distilled["arch"]}`, {distilled["params"] / 1e6:.2f}M parameters, {len(classes)} outputs.
- Trained by distillation from {teacher_name} (see `config.yaml` for the method, T and alpha).
- Input: RGB images centre-cropped to a square and resized to {first["size"]} px, normalised with
  train-split statistics stored in the weights file (`distilled.safetensors`, with metadata).

## Data and licence
{source}

## Metrics (test split, checkpoint chosen on val)
- Accuracy: {_pm(test["acc"])}
- AUC (mean one-vs-rest): {_pm(test["auc"], pct=False)}
- Balanced accuracy: {_pm(test["balanced_acc"])}
- Macro F1: {_pm(test["macro_f1"], pct=False)}
{screening}- Always answering the most common train class: {100 * summary["majority"]["test"]["acc"][0]:.2f}% accuracy.
{compare}

## Per-class weaknesses (seed {first["seed"]})
{weak_lines}

## Calibration
Expected calibration error (15 bins) on test: {_pm(test["ece"], pct=False)}. See `figures/reliability.png`.
Probabilities are not calibrated for clinical decision thresholds.

## Known limits
{limits}
"""
