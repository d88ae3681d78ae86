"""report.md from a run folder's results.json (no retraining)."""

from __future__ import annotations

import json
from pathlib import Path

from . import DermkdError

LABELS = {"teacher": "Teacher", "student": "Student (alone)", "distilled": "Student (distilled)"}


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def results_table(results: dict, split: str = "test") -> str:
    rows = [
        "| Model | Arch | Params | Loss | Accuracy | AUC | Balanced acc | Macro F1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in results.get("models", {}).items():
        m = entry[split]
        rows.append(
            f"| {LABELS.get(name, name)} | {entry['arch']} | {entry['params'] / 1e6:.2f}M | {_fmt(m['loss'])} "
            f"| {_fmt(m['acc'], True)} | {_fmt(m['auc'])} | {_fmt(m['balanced_acc'], True)} | {_fmt(m['macro_f1'])} |"
        )
    majority = results.get("baselines", {}).get("majority", {}).get(split)
    if majority:
        rows.append(
            f"| Majority class (always nevus) | - | - | {_fmt(majority['loss'])} | {_fmt(majority['acc'], True)} "
            f"| {_fmt(majority['auc'])} | {_fmt(majority['balanced_acc'], True)} | {_fmt(majority['macro_f1'])} |"
        )
    return "\n".join(rows)


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise DermkdError(f"{path} not found; pass a run folder written by `dermkd run`")
    results = json.loads(path.read_text())
    lines = [
        f"# dermkd results: DermaMNIST {results['size']} px, seed {results['seed']}",
        "",
        "Checkpoints chosen on val accuracy; test evaluated once on the chosen checkpoint.",
        "Loss is the test negative log-likelihood; AUC is medmnist's mean one-vs-rest AUC.",
        "The majority row predicts the train class frequencies (argmax: nevus).",
        "",
        "## Test",
        "",
        results_table(results, "test"),
        "",
        "## Val",
        "",
        results_table(results, "val"),
        "",
    ]
    if "wall_time_s" in results:
        lines.append(f"Wall time of the whole run: {results['wall_time_s'] / 60:.1f} min.\n")
    out = run_dir / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out
