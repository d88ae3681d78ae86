"""The report builds from saved runs alone: every figure, the HTML, the model card, multi-seed stats."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from kdist.cli import main
from kdist.datasets import medmnist_spec
from kdist.metrics import classification_metrics, majority_baseline
from kdist.report import write_report

DERMA = medmnist_spec("dermamnist").classes
MODELS = {
    "teacher": ("efficientnet_b0", 4_016_515),
    "student": ("squeezenet1_1", 726_087),
    "distilled": ("squeezenet1_1", 726_087),
}
FIGURES = ["compare_val_acc.png", "compare_val_loss.png", "reliability.png"] + [
    f"{m}_{kind}.png" for m in MODELS for kind in ("loss", "acc", "test_grid", "confusion")
]


def fake_run(folder, seed, skill):
    """A tiny run folder as `kdist run` writes it, with predictions of chosen quality."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions").mkdir()
    labels = {"val": rng.integers(0, 7, 60), "test": rng.integers(0, 7, 80)}
    results = {
        "dataset": "dermamnist",
        "classes": list(DERMA),
        "positive_class": "melanoma",
        "size": 28,
        "seed": seed,
        "models": {},
        "baselines": {"majority": {s: majority_baseline(labels["val"], labels[s], DERMA) for s in labels}},
    }
    for offset, (name, (arch, params)) in enumerate(MODELS.items()):
        arrays, entry = {}, {"arch": arch, "params": params}
        for split, y in labels.items():
            logits = rng.normal(size=(len(y), 7)) + (skill + offset) * np.eye(7)[y]
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            arrays[f"{split}_probs"], arrays[f"{split}_labels"] = probs, y
            entry[split] = classification_metrics(probs, y, DERMA)
        np.savez(folder / "predictions" / f"{name}.npz", **arrays)
        results["models"][name] = entry
        (folder / name).mkdir()
        lines = ["epoch,step,train/acc,train/loss,val/acc,val/loss"]
        for epoch in range(4):
            lines += [
                f"{epoch},{epoch},,,{0.5 + 0.05 * epoch},{1.2 - 0.1 * epoch}",
                f"{epoch},{epoch},{0.4 + 0.1 * epoch},{1.5 - 0.2 * epoch},,",
            ]
        (folder / name / "metrics.csv").write_text("\n".join(lines) + "\n")
    np.savez(
        folder / "predictions" / "test_samples.npz",
        indices=np.arange(9),
        images=rng.integers(0, 255, (9, 28, 28, 3), dtype=np.uint8),
    )
    results["wall_time_s"] = 60.0
    (folder / "results.json").write_text(json.dumps(results))
    return results


def test_single_run_report_has_every_figure(tmp_path):
    fake_run(tmp_path, 0, 1.0)
    assert main(["report", str(tmp_path)]) == 0
    for name in FIGURES:
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
    md = (tmp_path / "report.md").read_text()
    assert (
        "| Model | Arch | Params | Loss | Accuracy | AUC | Balanced acc | Macro F1 | ECE | melanoma sensitivity | melanoma specificity |"
        in md
    )
    assert "Majority class" in md and "[published]" in md and "73.50%" in md
    html = (tmp_path / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(FIGURES) and all((tmp_path / s).exists() for s in sources)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "Not a medical" in card and "CC BY-NC" in card and "melanoma sensitivity" in card


def test_multi_seed_report_shows_mean_and_std(tmp_path):
    runs = [fake_run(tmp_path / f"seed{s}", s, 1.0 + s) for s in (0, 1, 2)]
    write_report(tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    accs = [r["models"]["distilled"]["test"]["acc"] for r in runs]
    stat = record["models"]["distilled"]["test"]["acc"]
    assert stat["mean"] == pytest.approx(np.mean(accs)) and stat["std"] == pytest.approx(np.std(accs, ddof=1))
    assert record["seeds"] == [0, 1, 2]
    md = (tmp_path / "report.md").read_text()
    assert f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}%" in md
    assert "Appendix: per-seed test results" in md and md.count("| Student (distilled) |") >= 3 + 2


def test_report_of_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM, reason="Debian chromium not installed (make setup installs it where apt is usable)")
def test_html_renders_in_headless_chromium(tmp_path):
    fake_run(tmp_path, 0, 1.0)
    write_report(tmp_path)
    # Count images that loaded (naturalWidth > 0) after the page is rendered, via the DOM dump.
    probe = tmp_path / "probe.html"
    page = (
        (tmp_path / "report.html")
        .read_text()
        .replace(
            "</body>",
            "<script>window.onload=()=>{const b=[...document.images].filter(i=>!i.naturalWidth).length;"
            "document.body.setAttribute('data-broken', b);document.body.setAttribute('data-images', "
            "document.images.length)}</script></body>",
        )
    )
    probe.write_text(page)
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f'data-images="{len(FIGURES)}"' in result.stdout, result.stderr[-2000:]
    assert 'data-broken="0"' in result.stdout


def test_epoch_bar_draws_on_a_terminal_only():
    """Within an epoch a progress bar on a terminal (main process, --no-progress off); the batches pass through
    unchanged and nothing is drawn in a log file or when disabled."""
    import io

    from rich.console import Console

    from kdist.tracking import epoch_bar

    terminal, log = io.StringIO(), io.StringIO()
    assert list(epoch_bar(True, 3, "student 0", Console(file=terminal, force_terminal=True))(range(3))) == [0, 1, 2]
    assert "student 0" in terminal.getvalue()
    assert list(epoch_bar(True, 3, "student 0", Console(file=log, force_terminal=False))(range(3))) == [0, 1, 2]
    assert list(epoch_bar(False, 3, "student 0", Console(file=terminal, force_terminal=True))(range(3))) == [0, 1, 2]
    assert log.getvalue() == ""
