"""The report of a run folder: report.md, report.html (figures beside it) and MODEL_CARD.md.

Everything is rebuilt from what runs saved (results.json, metrics.csv, predictions/*.npz), never by
retraining. A multi-seed folder (seed0/, seed1/, ...) is reported as mean ± std over its seeds
(the sample standard deviation, n - 1 in the denominator: with 2 or 3 seeds the population one
would understate the spread).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from . import KdistError, plots
from .files import atomic_write_text
from .metrics import mean_std_text, sample_std
from .plots import LABELS

# Published numbers per dataset and size (MedMNIST v2: Yang et al., Sci. Data 2023, Table 3), shown beside a
# study of that dataset.
PUBLISHED = {
    ("dermamnist", 28): [
        ("ResNet-18 (28), MedMNIST v2 [published]", 0.735, 0.917),
        ("Google AutoML Vision, MedMNIST v2 [published]", 0.768, 0.914),
    ],
}
COLUMNS = [
    ("loss", "Loss", False),
    ("acc", "Accuracy", True),
    ("auc", "AUC", False),
    ("balanced_acc", "Balanced acc", True),
    ("macro_f1", "Macro F1", False),
    ("ece", "ECE", False),
    ("sensitivity", "Sensitivity", True),  # of the positive class (report.positive_class)
    ("specificity", "Specificity", True),
]


def seed_runs(run_dir: Path) -> list[Path]:
    """The single-seed run folders inside `run_dir` (itself, or its seed*/ subfolders)."""
    if (run_dir / "results.json").exists() and not list(run_dir.glob("seed*/results.json")):
        return [run_dir]
    # A multi-seed folder: its own results.json is the aggregate, rebuilt from the seeds.
    runs = sorted(
        run_dir.glob("seed*/results.json"), key=lambda p: int(p.parent.name[4:]) if p.parent.name[4:].isdigit() else 0
    )
    if not runs:
        raise KdistError(f"no results.json in {run_dir}; pass a run folder written by `kdist run`")
    return [p.parent for p in runs]


def positive_class(result: dict) -> str | None:
    """The class whose sensitivity and specificity are reported (results written before it was recorded: melanoma,
    where the classes hold it)."""
    if "positive_class" in result:
        return result["positive_class"]
    entry = next(iter(result["models"].values()))
    return "melanoma" if "melanoma" in (entry.get("test") or entry["val"])["per_class"] else None


def headline(metrics: dict, positive: str | None) -> dict:
    out = {key: metrics.get(key) for key, _, _ in COLUMNS[:-2]}
    chosen = metrics["per_class"][positive] if positive else {}
    out["sensitivity"], out["specificity"] = chosen.get("recall"), chosen.get("specificity")
    return out


def aggregate(results: list[dict]) -> dict:
    """{model: {split: {metric: (mean, std, [values])}}} over seeds, plus params/arch."""
    out = {}
    positive = positive_class(results[0])
    names = [n for n in results[0]["models"] if all(n in r["models"] for r in results)]
    for name in names + ["majority"]:
        entry = {}
        for split in ("val", "test"):
            rows = [
                headline(
                    r["baselines"]["majority"][split] if name == "majority" else r["models"][name][split], positive
                )
                for r in results
            ]
            entry[split] = {}
            for key in rows[0]:
                values = [row[key] for row in rows if row[key] is not None]
                entry[split][key] = (float(np.mean(values)), sample_std(values), values) if values else (None, None, [])
        if name != "majority":
            entry.update(arch=results[0]["models"][name]["arch"], params=results[0]["models"][name]["params"])
        out[name] = entry
    return out


def main_table(summary: dict, split: str, result: dict) -> tuple[list[str], list[list[str]]]:
    """The models' headline metrics on `split`, the published rows of the dataset (on test) below them."""
    positive = positive_class(result)
    header = ["Model", "Arch", "Params"] + [
        f"{positive} {label.lower()}" if key in ("sensitivity", "specificity") and positive else label
        for key, label, _ in COLUMNS
    ]
    rows = []
    for name, entry in summary.items():
        label = "Majority class (train prior)" if name == "majority" else LABELS.get(name, name)
        arch, params = ("-", "-") if name == "majority" else (entry["arch"], f"{entry['params'] / 1e6:.2f}M")
        rows.append([label, arch, params] + [mean_std_text(entry[split][key], pct) for key, _, pct in COLUMNS])
    if split == "test":
        for label, acc, auc in PUBLISHED.get((result.get("dataset"), result.get("size")), []):
            rows.append([label, "-", "-", "-", f"{100 * acc:.2f}%", f"{auc:.4f}"] + ["-"] * (len(COLUMNS) - 3))
    return header, rows


def per_seed_table(results: list[dict], runs: list[Path]) -> tuple[list[str], list[list[str]]]:
    header = ["Seed", "Model", "Test ACC", "Test AUC", "Balanced ACC", "Macro F1", "ECE"]
    rows = []
    for run, result in zip(runs, results):
        for name, entry in result["models"].items():
            m = entry["test"]
            rows.append(
                [
                    str(result["seed"]),
                    LABELS.get(name, name),
                    f"{100 * m['acc']:.2f}%",
                    f"{m['auc']:.4f}" if m["auc"] else "n/a",
                    f"{100 * m['balanced_acc']:.2f}%",
                    f"{m['macro_f1']:.4f}",
                    f"{m['ece']:.4f}",
                ]
            )
    return header, rows


def per_class_table(result: dict, name: str) -> tuple[list[str], list[list[str]]]:
    header = ["Class", "Support", "Precision", "Recall", "Specificity", "F1", "AUC (one-vs-rest)"]
    rows = []
    for cls, m in result["models"][name]["test"]["per_class"].items():
        rows.append(
            [
                cls,
                str(m["support"]),
                f"{m['precision']:.3f}",
                f"{m['recall']:.3f}",
                f"{m['specificity']:.3f}" if m.get("specificity") is not None else "n/a",
                f"{m['f1']:.3f}",
                f"{m['auc']:.3f}" if m["auc"] is not None else "n/a",
            ]
        )
    return header, rows


def make_figures(run: Path, result: dict, figures: Path) -> list[tuple[str, str]]:
    """Draw every figure that the saved logs and predictions allow; returns (file, caption) pairs."""
    figures.mkdir(exist_ok=True)
    names = list(result["models"])
    classes = result.get("classes") or list(next(iter(result["models"].values()))["test"]["per_class"])
    drawn = []
    histories = {n: plots.read_history(run / n) for n in names if (run / n / "metrics.csv").exists()}
    for name, history in histories.items():
        for path in plots.curves(history, name, figures):
            drawn.append((path, f"{LABELS.get(name, name)}: train/val {path.stem.split('_')[-1]} per epoch"))
    for path in plots.comparison(histories, figures):
        drawn.append((path, f"All models: val {path.stem.split('_')[-1]} per epoch"))
    predictions = {}
    for name in names:
        path = run / "predictions" / f"{name}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as saved:
                predictions[name] = (saved["test_labels"], saved["test_probs"])
    samples = run / "predictions" / "test_samples.npz"
    if samples.exists():
        with np.load(samples, allow_pickle=False) as saved:
            indices, images = saved["indices"], saved["images"]
        for name, (labels, probs) in predictions.items():
            path = plots.prediction_grid(images, labels[indices], probs[indices], name, figures, classes)
            drawn.append(
                (path, f"{LABELS.get(name, name)}: the same {len(indices)} random test images for every model")
            )
    for name, (labels, probs) in predictions.items():
        drawn.append(
            (
                plots.confusion(labels, probs, name, figures, classes),
                f"{LABELS.get(name, name)}: confusion matrix on test",
            )
        )
    if predictions:
        eces = {name: result["models"][name]["test"]["ece"] for name in predictions}
        drawn.append((plots.reliability(predictions, eces, figures), "Reliability diagram on test, ECE in the legend"))
    return [(str(path.relative_to(figures.parent)), caption) for path, caption in drawn]


# --- rendering: one list of blocks, written as Markdown and as HTML -------------------------------


def render_markdown(blocks) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}\n")
        elif kind == "h2":
            out.append(f"## {rest[0]}\n")
        elif kind == "p":
            out.append(f"{rest[0]}\n")
        elif kind == "table":
            header, rows = rest
            out.append("| " + " | ".join(header) + " |")
            out.append("| " + " | ".join("---" for _ in header) + " |")
            out += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("")
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})\n")
    return "\n".join(out)


def render_html(blocks, title: str) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{lines}</tbody></table>")
        elif kind == "img":
            body.append(
                f'<figure><img src="{html.escape(rest[0])}" '
                f'alt="{html.escape(rest[1])}"><figcaption>{html.escape(rest[1])}</figcaption></figure>'
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        "figure{display:inline-block;margin:0.5em}img{max-width:520px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    runs = seed_runs(run_dir)
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    for run, result in zip(runs, results):
        if any("test" not in entry for entry in result.get("models", {}).values()):
            raise KdistError(
                f"{run} holds val-only results (a --val-only run); test its chosen model with `kdist evaluate "
                "--split test`"
            )
    summary = aggregate(results)
    first = results[0]
    seeds = [r["seed"] for r in results]
    title = f"kdist: {first['dataset']} {first['size']} px, " + (
        f"seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    )
    published = PUBLISHED.get((first.get("dataset"), first.get("size")))
    blocks = [
        ("h1", title),
        (
            "p",
            "Checkpoints are chosen on val accuracy; test is evaluated once per final model. Loss is the test "
            "negative log-likelihood, AUC medmnist's mean one-vs-rest AUC, ECE the expected calibration error "
            "with 15 bins; sensitivity and specificity are those of the positive class (report.positive_class). The "
            "majority row predicts the train class frequencies."
            + (
                f" Cells are mean ± std over {len(seeds)} seeds; differences under one point are noise, not gains."
                if len(seeds) > 1
                else " Single seed: differences under one point are noise, not gains."
            ),
        ),
        ("h2", "Test"),
        ("table", *main_table(summary, "test", first)),
    ]
    if published:
        blocks.append(
            (
                "p",
                "Published rows are the MedMNIST v2 benchmark on the official file (Yang et al., Sci. Data 2023); "
                "kdist reads a file rebuilt from HAM10000 with the official split: comparable, not identical.",
            )
        )
    blocks += [("h2", "Val"), ("table", *main_table(summary, "val", first))]
    if "wall_time_s" in first:
        blocks.append(
            (
                "p",
                "Wall time of `kdist run`: "
                + ", ".join(f"{r['wall_time_s'] / 60:.1f} min" for r in results if "wall_time_s" in r)
                + ".",
            )
        )
    if "distilled" in first["models"]:
        blocks += [
            ("h2", f"Per class: distilled student, test (seed {first['seed']})"),
            ("table", *per_class_table(first, "distilled")),
        ]
    figures = make_figures(runs[0], first, run_dir / "figures")
    if figures:
        blocks.append(("h2", f"Figures (seed {first['seed']})"))
        blocks += [("img", path, caption) for path, caption in figures]
    if len(runs) > 1:
        blocks += [("h2", "Appendix: per-seed test results"), ("table", *per_seed_table(results, runs))]
    if len(runs) > 1:  # the multi-seed record: every headline metric as mean, std and per-seed values
        record = {
            "dataset": first["dataset"],
            "classes": first.get("classes"),
            "positive_class": positive_class(first),
            "size": first["size"],
            "seeds": seeds,
            "runs": [r.name for r in runs],
            "models": {
                name: {
                    key: (
                        {m: dict(zip(("mean", "std", "values"), stat)) for m, stat in value.items()}
                        if key in ("val", "test")
                        else value
                    )
                    for key, value in entry.items()
                }
                for name, entry in summary.items()
            },
        }
        atomic_write_text(run_dir / "results.json", json.dumps(record, indent=2))
    atomic_write_text(run_dir / "report.md", render_markdown(blocks))
    atomic_write_text(run_dir / "report.html", render_html(blocks, title))
    if "distilled" in summary:
        from .card import model_card

        atomic_write_text(run_dir / "MODEL_CARD.md", model_card(summary, first, len(seeds)))
    return run_dir / "report.md"
