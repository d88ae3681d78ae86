"""A model's entry in the study's results.json: its kept weights evaluated once on val and test (each process
its shard), the predictions saved, the entry written under a lock (separate jobs of one study share the file),
and the same sent to the stage's tracker."""

from __future__ import annotations

import json

import numpy as np
import torch

from .files import atomic_output, atomic_write_text, locked
from .inference import predict_probs
from .metrics import classification_metrics, majority_baseline
from .models import DermClassifier, count_params
from .scoring import split_probs
from .tracking import log_results

MODELS = ("teacher", "student", "distilled")


def record_model(
    study,
    name: str,
    model: DermClassifier,
    teacher: torch.nn.Module | None = None,
    train_time_s: float | None = None,
) -> dict:
    """Evaluate kept weights once on val and test (`study.eval_splits`; `study` is a pipeline.Study), save
    predictions, record them, and send them to the stage's tracker (with `teacher`'s predictions on the fixed
    test samples beside a distilled student's). Every process scores its shard; the main process writes."""
    model = model.to(study.device)
    entry = {"arch": model.arch, "params": count_params(model), "input_size": model.input_size}
    if train_time_s is not None:
        entry["train_time_s"] = round(train_time_s, 1)
    size = study.size_for(model)  # a teacher of another file is evaluated on that file
    if size != study.cfg.data.size:
        entry["data_size"] = size
    arrays, probs, labels = {}, {}, {}
    for split in study.eval_splits:
        images, split_labels = study.split_at(split, size)
        probs[split], labels[split] = (
            split_probs(study.accelerator, model, images, split_labels),
            split_labels.numpy(),
        )
        arrays[f"{split}_probs"], arrays[f"{split}_labels"] = probs[split].astype(np.float32), labels[split]
        entry[split] = classification_metrics(probs[split], labels[split], study.dataset.classes)
    model.cpu()
    if study.is_main:
        (study.out / "predictions").mkdir(exist_ok=True)
        with atomic_output(study.out / "predictions" / f"{name}.npz") as tmp:
            np.savez(tmp, **arrays)
        record_result(study, name, entry)
        teacher_sample_probs = None
        if teacher is not None and (study.out / "predictions" / "test_samples.npz").exists() and "test" in probs:
            indices = np.load(study.out / "predictions" / "test_samples.npz")["indices"]
            samples = study.split_at("test", study.size_for(teacher))[0][indices]
            teacher_sample_probs = predict_probs(teacher, samples)
        log_results(study, name, entry, probs, labels, teacher_sample_probs)
    study.accelerator.wait_for_everyone()
    return entry


def recorded(study, name: str) -> bool:
    """Whether results.json already holds an entry for `name`."""
    results = study.out / "results.json"
    return results.exists() and name in json.loads(results.read_text()).get("models", {})


def record_result(study, name: str, entry: dict) -> None:
    """Add `name`'s entry to results.json. Locked: separate jobs of one study (slurm/study.sh runs the student
    and the distilled student side by side) write into the same file."""
    path = study.out / "results.json"
    with locked(study.out / ".results.lock"):
        results = json.loads(path.read_text()) if path.exists() else {}
        train_labels = study.splits["train"][1].numpy()
        dataset = study.dataset
        positive = dataset.positive_index(study.cfg.report.positive_class)
        results.update(
            {
                "dataset": dataset.name,
                "classes": list(dataset.classes),
                "positive_class": None if positive is None else dataset.classes[positive],
                "size": study.cfg.data.size,
                "seed": study.cfg.seed,
            }
        )
        results["baselines"] = {
            "majority": {
                split: majority_baseline(train_labels, study.splits[split][1].numpy(), dataset.classes)
                for split in study.eval_splits
            }
        }
        results.setdefault("models", {})[name] = entry
        results["models"] = {key: results["models"][key] for key in sorted(results["models"], key=_model_order)}
        atomic_write_text(path, json.dumps(results, indent=2))


def _model_order(name: str) -> tuple:
    return (MODELS.index(name) if name in MODELS else len(MODELS), name)
