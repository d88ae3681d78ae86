"""Experiment tracking through Accelerate's trackers: W&B (`trainer.tracker: wandb`) or a JSON-lines file
(`jsonl`); the run folder's metrics.csv and results.json are written whatever the tracker.

Each stage of a study (teacher, student, distilled) is one tracker run: the runs of a study share a group
(the study folder's name) and carry job_type teacher | student | distilled and the resolved config, so the
W&B UI groups and filters them; a resumed stage continues its own run (the id is kept in
<stage>/wandb_run_id). Per epoch the engine logs train/val loss and accuracy, the learning rate, and for
distillation the KD and CE parts and the teacher-student agreement and KL on val; at the end of a stage
the test metrics become the run summary, with a confusion matrix and the qualitative panel: a table of the
same fixed test images for every model (image, true label, prediction, confidence, and the teacher's
prediction beside a distilled student's) and the grid figure.

Offline first, for cluster nodes without internet: with no API key (or WANDB_MODE=offline) runs are
written under the run folder (RUN/wandb/offline-run-*) and uploaded later with `wandb sync`; only the main
process initialises W&B while the others wait, so a slow `wandb.init` cannot trip a collective timeout.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from accelerate.tracking import GeneralTracker, on_main_process

from .ranks import patient_barrier


class JsonlTracker(GeneralTracker):
    """Every value the engine logs, as JSON lines in <stage>/tracker.jsonl (with the process that logged it):
    a W&B-free record of the same stream, readable by scripts and tests."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.path: Path | None = None  # set before each stage's init_trackers

    @property
    def tracker(self):
        return self.path

    def _write(self, record: dict) -> None:
        from accelerate import PartialState

        with open(self.path, "a") as handle:
            handle.write(json.dumps({**record, "process_index": PartialState().process_index}) + "\n")

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._write({"config": values})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, "values": values})

    def summary(self, values: dict) -> None:
        self._write({"summary": values})


def log_with(tracker: str):
    """What `Accelerator(log_with=...)` gets for `trainer.tracker`."""
    if tracker == "wandb":
        return "wandb"
    if tracker == "jsonl":
        return [JsonlTracker()]
    return None


def has_wandb_key() -> bool:
    """Whether wandb itself would find an API key: WANDB_API_KEY, its settings files, or a netrc entry for the
    host it talks to (WANDB_BASE_URL, else wandb's own default host, which `wandb login` writes)."""
    import wandb
    from wandb.sdk.lib.wbauth import read_netrc_auth

    settings = wandb.Settings()
    if os.environ.get("WANDB_API_KEY") or settings.api_key:
        return True
    try:
        return read_netrc_auth(host=settings.base_url) is not None
    except Exception:  # an unreadable netrc is no key
        return False


def choose_wandb_mode(out: Path) -> None:
    """Offline unless there is a key to go online with; say so once."""
    if os.environ.get("WANDB_MODE"):
        return
    if not has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
        print(
            "kdist: no W&B API key (WANDB_API_KEY, `wandb login`): W&B runs are written offline under "
            f"{out / 'wandb'}; "
            f"upload them later with `wandb sync {out / 'wandb'}/offline-run-*`",
            file=sys.stderr,
            flush=True,
        )


def group_of(out: Path, group: str | None = None) -> str:
    """The W&B group of a study: trainer.wandb_group when set (slurm/study.sh sets the study's name for all its
    jobs), else the run folder's name, or its parent's for seed<N>/ folders of `run --seeds`."""
    if group:
        return group
    return out.parent.name if out.name.startswith("seed") and out.name[4:].isdigit() else out.name


def project_of(trainer) -> str:
    """trainer.project when set (--set trainer.project=P), else $WANDB_PROJECT, else kdist."""
    return trainer.project or os.environ.get("WANDB_PROJECT") or "kdist"


def _run_id(folder: Path) -> str:
    path = folder / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    from wandb.sdk.lib.runid import generate_id

    run_id = generate_id()
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


@contextmanager
def stage_run(study, name: str):
    """A tracker run around one stage: started on the main process (the others wait), finished at the end."""
    accelerator, tracker = study.accelerator, study.cfg.trainer.tracker
    if tracker not in ("wandb", "jsonl"):
        yield
        return
    folder = study.out / name
    config = {**study.cfg.to_dict(), "stage": name, "run_folder": str(study.out)}
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        init_kwargs = {}
        if tracker == "wandb":
            import wandb

            choose_wandb_mode(study.out)
            trainer = study.cfg.trainer
            group = group_of(study.out, trainer.wandb_group)
            run_name = f"{group}/{name}" if study.out.name == group else f"{group}/{study.out.name}/{name}"
            # One bounded try to reach the server (WANDB_INIT_TIMEOUT, else 30 s); after a failure the rest of
            # the study logs offline (WANDB_MODE below), so a study never hangs on an unreachable server.
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", 30))
            init_kwargs = {
                "wandb": {
                    "dir": str(study.out),
                    "group": group,
                    "job_type": name,
                    "name": run_name,
                    "id": _run_id(folder),
                    "resume": "allow",
                    "reinit": "finish_previous",
                    "settings": wandb.Settings(init_timeout=timeout),
                    **({"entity": trainer.wandb_entity} if trainer.wandb_entity else {}),
                }
            }
        else:
            accelerator.log_with[0].path = folder / "tracker.jsonl"
        try:
            accelerator.init_trackers(project_of(study.cfg.trainer), config=config, init_kwargs=init_kwargs)
        except Exception as exc:  # e.g. a key but no network: never lose the training to the tracker
            if tracker != "wandb" or os.environ.get("WANDB_MODE") == "offline":
                raise
            os.environ["WANDB_MODE"] = "offline"
            import wandb

            wandb.teardown()  # the failed attempt keeps the run id in use in wandb's service; start a fresh one
            print(
                f"kdist: W&B could not start online ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); this "
                "study logs "
                f"offline under {study.out / 'wandb'}: upload with `wandb sync`",
                file=sys.stderr,
                flush=True,
            )
            accelerator.trackers = []
            accelerator.init_trackers(project_of(study.cfg.trainer), config=config, init_kwargs=init_kwargs)
    accelerator.wait_for_everyone()
    try:
        yield
    finally:
        if accelerator.is_main_process:
            for run in accelerator.trackers:
                run.finish()  # the upload: as long as the network takes, so the others wait patiently
        accelerator.trackers = []
    patient_barrier("tracker finished")  # (not after an error: that rank ends the launch instead)


def log_results(study, name: str, entry: dict, probs: dict, labels: dict, teacher_sample_probs=None) -> None:
    """The end of a stage, on the main process: metrics as the run summary, the confusion matrix, the
    qualitative table and the grid figure (from the fixed test samples of predictions/test_samples.npz)."""
    accelerator = study.accelerator
    if (
        study.cfg.trainer.tracker not in ("wandb", "jsonl")
        or not accelerator.is_main_process
        or not accelerator.trackers
    ):
        return
    classes = study.dataset.classes
    positive = study.dataset.positive_index(study.cfg.report.positive_class)
    summary = {}
    for split in ("val", "test"):
        if split in entry:
            for key in ("acc", "auc", "balanced_acc", "macro_f1", "ece", "loss"):
                summary[f"{split}/{key}"] = entry[split][key]
            if positive is not None:  # of the positive class (report.positive_class)
                summary[f"{split}/sensitivity"] = entry[split]["per_class"][classes[positive]]["recall"]
                summary[f"{split}/specificity"] = entry[split]["per_class"][classes[positive]]["specificity"]
    if study.cfg.trainer.tracker == "jsonl":
        accelerator.log_with[0].summary(summary)
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    run.summary.update(summary)
    split = "test" if "test" in probs else "val"
    run.log(
        {
            f"{split}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels[split].tolist(),
                preds=probs[split].argmax(1).tolist(),
                class_names=list(classes),
                title=f"{name}: {split} confusion",
            )
        }
    )
    samples_path = study.out / "predictions" / "test_samples.npz"
    if split == "test" and samples_path.exists():
        samples = np.load(samples_path)
        indices, images = samples["indices"], samples["images"]
        sample_probs = probs["test"][indices]
        columns = ["index", "image", "true", "predicted", "confidence"] + (
            ["teacher predicted", "teacher confidence"] if teacher_sample_probs is not None else []
        )
        table = wandb.Table(columns=columns)
        for row, index in enumerate(indices):
            prob = sample_probs[row]
            cells = [
                int(index),
                wandb.Image(images[row]),
                classes[labels["test"][index]],
                classes[int(prob.argmax())],
                float(prob.max()),
            ]
            if teacher_sample_probs is not None:
                cells += [classes[int(teacher_sample_probs[row].argmax())], float(teacher_sample_probs[row].max())]
            table.add_data(*cells)
        from .plots import prediction_grid

        grid = prediction_grid(images, labels["test"][indices], sample_probs, name, study.out / "predictions", classes)
        run.log({"qualitative/test_samples": table, "qualitative/test_grid": wandb.Image(str(grid))})


def epoch_bar(enabled: bool, total: int, description: str, console=None):
    """`bar(batches)`: the batches, drawn as a progress bar on a terminal (rich, on stderr, cleared at the end of
    the epoch, whose line stays); as they are when not `enabled` (--no-progress, other processes) or not a
    terminal (logs, Slurm output files)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not enabled or not console.is_terminal:
        return lambda batches: batches

    def bar(batches):
        from rich.progress import track

        yield from track(batches, description=description, total=total, console=console, transient=True)

    return bar
