"""The stages of a study: train teacher, train student, distill, evaluate; and `run`, all of them.

A run folder holds everything a stage produced:
    config.yaml, run_info.json          resolved config; seed, versions, git commit
    <model>/metrics.csv                 per-epoch train/val loss and accuracy (Lightning CSVLogger)
    <model>/checkpoints/                best-on-val and last Lightning checkpoints
    <model>.safetensors                 the kept (best-on-val) weights, with metadata
    predictions/<model>.npz             val and test probabilities of the kept weights
    results.json, report.md             the comparison
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from . import DermkdError, __version__
from .cache import teacher_cache
from .config import Config, StageConfig
from .data import DermaDataModule, channel_stats, class_weights, load_dermamnist, subset
from .files import atomic_output, atomic_write_text
from .inference import predict_probs
from .lit import DistillModule, SupervisedModule
from .metrics import classification_metrics, majority_baseline
from .models import DermClassifier, count_params, create_model, load_model, load_state, save_weights

MODELS = ("teacher", "student", "distilled")


@dataclass
class Study:
    """What every stage needs: the config, the run folder and the data (loaded once)."""

    cfg: Config
    out: Path
    splits: dict
    mean: list[float]
    std: list[float]
    resume: bool = False
    eval_splits: tuple = ("val", "test")  # a sweep evaluates on val only; test is for the chosen config
    cache_dir: Path | None = None  # teacher-logit caches; default <out>/cache (a sweep shares one)
    other_sizes: dict = field(default_factory=dict)  # {size: splits} of other data files, for teachers of those files

    @classmethod
    def open(cls, cfg: Config, out: Path, resume: bool = False, eval_splits: tuple = ("val", "test")) -> "Study":
        full = load_dermamnist(cfg.data.root, cfg.data.size, cfg.data.download)
        mean, std = channel_stats(full["train"][0])  # normalisation comes from the whole train split
        splits = subset(full, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        study = cls(cfg, out, splits, mean, std, resume, eval_splits)
        if is_rank_zero() and not (out / "config.yaml").exists():  # the first command into a folder describes the run
            study.write_run_info()
        if is_rank_zero() and not (out / "predictions" / "test_samples.npz").exists():
            study.save_test_samples()
        return study

    def size_for(self, model) -> int:
        """The data file size `model` reads: the one it was trained on when loaded from a file, else the study's."""
        return getattr(model, "data_size", None) or self.cfg.data.size

    def split_at(self, split: str, size: int) -> tuple:
        """`split` (the same images, subset and order) from the `size` px data file: for a teacher of that file."""
        cfg = self.cfg
        if size == cfg.data.size:
            return self.splits[split]
        if size not in self.other_sizes:  # read each other file once
            self.other_sizes[size] = subset(load_dermamnist(cfg.data.root, size, cfg.data.download), cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
        images, labels = self.other_sizes[size][split]
        if not torch.equal(labels, self.splits[split][1]):
            raise DermkdError(f"the {size} px and {cfg.data.size} px data files do not hold the same {split} images in the same order; use files of one DermaMNIST release")
        return images, labels

    def finished(self, name: str) -> bool:
        """A stage is done when its weights and its results entry are both written."""
        return (self.out / f"{name}.safetensors").exists() and recorded(self, name)

    def claim(self, name: str) -> None:
        """Refuse to overwrite a finished stage unless resuming (where it is skipped instead)."""
        if (self.out / f"{name}.safetensors").exists() and not self.resume:
            raise DermkdError(f"{self.out} already holds {name}.safetensors; choose another --out, or --resume {self.out} to continue that run")

    def save_test_samples(self, count: int = 25) -> None:
        """A fixed random set of test images for the report's qualitative grids (same for every model)."""
        images = self.splits["test"][0]
        indices = np.sort(np.random.default_rng(0).choice(len(images), size=min(count, len(images)), replace=False))
        folder = self.out / "predictions"
        folder.mkdir(exist_ok=True)
        with atomic_output(folder / "test_samples.npz") as tmp:
            np.savez(tmp, indices=indices, images=images[indices].permute(0, 2, 3, 1).numpy())

    def write_run_info(self) -> None:
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        packages = ["torch", "torchvision", "lightning", "torchmetrics", "medmnist", "numpy", "scikit-learn"]
        info = {
            "seed": self.cfg.seed,
            "dermkd": __version__,
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "packages": {name: version(name) for name in packages},
        }
        atomic_write_text(self.out / "run_info.json", json.dumps(info, indent=2))

    @property
    def device(self) -> str:
        """Where dermkd's own inference (evaluation, teacher cache) runs."""
        return "cuda" if torch.cuda.is_available() and self.cfg.trainer.accelerator != "cpu" else "cpu"

    def seed(self) -> None:
        """Every stage starts from the same seed, so a stage run alone equals the same stage inside `run`."""
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)

    def new_model(self, role: str) -> DermClassifier:
        spec = self.cfg.teacher_model if role == "teacher" else self.cfg.student_model
        model = create_model(spec.arch, self.mean, self.std, spec.input_size, spec.pretrained)
        if spec.weights:
            load_state(model, Path(spec.weights))
        return model


def is_rank_zero() -> bool:
    """Under DDP every process runs the same command; only global rank 0 writes results and reports."""
    return rank_zero_only.rank == 0


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX-512 BF16), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_bf16_is_emulated(precision: str) -> None:
    """Warn about bf16 on a CPU that emulates it: measured 35x slower than float32 on an AVX2-only EPYC."""
    if precision.startswith("bf16") and not cpu_has_bf16():  # the probe runs only when bf16 is asked for
        warnings.warn(f"trainer.precision={precision} on a CPU without bf16 hardware (no AMX or AVX-512 BF16) trains "
                      "far slower than float32 (35x measured); use --set trainer.precision=32-true", stacklevel=3)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints to a temp file and renames it: a kill never leaves a half-written .ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_output(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def fit(study: Study, name: str, module: SupervisedModule, stage: StageConfig) -> DermClassifier:
    """Train with Lightning; keep the checkpoint that is best on val accuracy; return its model."""
    cfg = study.cfg.trainer
    last = study.out / name / "checkpoints" / "last.ckpt"
    resume_from = last if study.resume and last.exists() else None
    # Lightning's CSVLogger deletes an existing metrics.csv: a resumed stage logs into resume-<n>/
    # beside it, and the report merges them by epoch.
    log_version = f"resume-{len(list((study.out / name).glob('resume-*'))) + 1}" if resume_from else ""
    folder = study.out / name / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor="val/acc", mode="max")
    # Lightning's save_last writes last.ckpt only when the top-k file is saved (val improved), so a
    # resume could repeat many epochs; this one writes it every epoch. It must come after `checkpoint`
    # (Lightning keeps their order) so that last.ckpt holds this epoch's best score and path.
    every_epoch = ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False)
    callbacks = [checkpoint, every_epoch]
    if stage.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=stage.ema_decay))
    if cfg.progress:
        callbacks.append(RichProgressBar())
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu:
        warn_if_bf16_is_emulated(cfg.precision)
    trainer = L.Trainer(
        max_epochs=stage.epochs,
        gradient_clip_val=stage.gradient_clip,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        logger=CSVLogger(study.out, name=name, version=log_version),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        deterministic=True if on_cpu else "warn",  # some CUDA kernels have no deterministic version
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # EpochBatchSampler shards batches itself
        # A fresh loader per epoch is built for that epoch (cheap: data are in memory). Without it, a
        # resumed fit would run its first epoch on an iterator Lightning made before the restore.
        reload_dataloaders_every_n_epochs=1,
        log_every_n_steps=1,
    )
    start = time.perf_counter()
    # weights_only: resuming never unpickles arbitrary objects from a checkpoint.
    trainer.fit(module, datamodule=DermaDataModule(study.splits, stage.batch_size, study.cfg.seed, translate=stage.translate), ckpt_path=resume_from, weights_only=True)
    train_time = time.perf_counter() - start
    atomic_write_text(study.out / name / "config.yaml", yaml.safe_dump(study.cfg.to_dict(), sort_keys=False))
    # weights_only: a checkpoint is never unpickled into arbitrary objects.
    state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    model = module.model.cpu()
    model.load_state_dict({key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")})
    model.train_time_s = train_time
    return model.eval()


def evaluate(study: Study, name: str, model: DermClassifier) -> dict:
    """Evaluate kept weights once on val and test (`study.eval_splits`), save predictions, record them."""
    model = model.to(study.device)
    entry = {"arch": model.arch, "params": count_params(model), "input_size": model.input_size}
    if hasattr(model, "train_time_s"):
        entry["train_time_s"] = round(model.train_time_s, 1)
    size = study.size_for(model)  # a teacher of another file is evaluated on that file
    if size != study.cfg.data.size:
        entry["data_size"] = size
    arrays = {}
    for split in study.eval_splits:
        images, labels = study.split_at(split, size)
        probs = predict_probs(model, images)
        arrays[f"{split}_probs"], arrays[f"{split}_labels"] = probs.astype(np.float32), labels.numpy()
        entry[split] = classification_metrics(probs, labels.numpy())
    with atomic_output(study.out / "predictions" / f"{name}.npz") as tmp:
        np.savez(tmp, **arrays)
    record_result(study, name, entry)
    model.cpu()
    return entry


def recorded(study: Study, name: str) -> bool:
    """Whether results.json already holds an entry for `name`."""
    results = study.out / "results.json"
    return results.exists() and name in json.loads(results.read_text()).get("models", {})


def record_result(study: Study, name: str, entry: dict) -> None:
    path = study.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    train_labels = study.splits["train"][1].numpy()
    results.update({"dataset": "dermamnist", "size": study.cfg.data.size, "seed": study.cfg.seed})
    results["baselines"] = {
        "majority": {split: majority_baseline(train_labels, study.splits[split][1].numpy()) for split in study.eval_splits}
    }
    results.setdefault("models", {})[name] = entry
    results["models"] = {key: results["models"][key] for key in sorted(results["models"], key=_model_order)}
    atomic_write_text(path, json.dumps(results, indent=2))


def _model_order(name: str) -> tuple:
    return (MODELS.index(name) if name in MODELS else len(MODELS), name)


def train_stage(study: Study, role: str) -> DermClassifier:
    """Train the teacher or the student on labels alone; save and evaluate its best-on-val weights."""
    stage = study.cfg.teacher if role == "teacher" else study.cfg.student
    study.claim(role)
    study.seed()
    weights = class_weights(study.splits["train"][1], stage.class_weights)
    model = fit(study, role, SupervisedModule(study.new_model(role), stage, study.cfg.seed, weights), stage)
    if not is_rank_zero():
        return model
    save_weights(model, study.out / f"{role}.safetensors", {"data_size": study.cfg.data.size})
    evaluate(study, role, model)
    return model


def teacher_stage(study: Study) -> DermClassifier:
    """The study's teacher: loaded when a resumed study already finished it, else trained."""
    if study.finished("teacher"):
        return load_model(study.out / "teacher.safetensors")
    return train_stage(study, "teacher")


def distill_stage(study: Study, teacher: DermClassifier) -> DermClassifier:
    """Distill a fresh student from a frozen teacher; save and evaluate its best-on-val weights."""
    kd = study.cfg.kd
    # A teacher loaded from a file sees the train images at the size it was trained on (e.g. the 64 px file
    # teaching a 28 px student); the student only ever sees its own data.
    teacher_size = study.size_for(teacher)
    if teacher_size != study.cfg.data.size and kd.teacher_mode != "cached":
        raise DermkdError(f"the teacher was trained on {teacher_size} px images and the student's data is {study.cfg.data.size} px; "
                          "a teacher of another size needs kd.teacher_mode: cached")
    study.claim("distilled")
    weights = class_weights(study.splits["train"][1], study.cfg.distill.class_weights)
    if kd.teacher_mode == "cached":
        images, labels = study.split_at("train", teacher_size)
        logits = teacher_cache(teacher.to(study.device), images, labels, study.cache_dir or study.out / "cache")
        teacher.cpu()
        study.seed()
        module = DistillModule(study.new_model("student"), study.cfg.distill, kd, teacher_logits_cache=logits, seed=study.cfg.seed, class_weights=weights)
    else:
        study.seed()
        module = DistillModule(study.new_model("student"), study.cfg.distill, kd, teacher=teacher, seed=study.cfg.seed, class_weights=weights)
    model = fit(study, "distilled", module, study.cfg.distill)
    if not is_rank_zero():
        return model
    save_weights(model, study.out / "distilled.safetensors", {"data_size": study.cfg.data.size, "kd": study.cfg.kd.__dict__,
                                                               "teacher": teacher.arch, "teacher_data_size": teacher_size})
    evaluate(study, "distilled", model)
    return model


def run(study: Study) -> dict:
    """The whole study: teacher, student, distilled student, then the report."""
    from .report import write_report

    start = time.perf_counter()
    for name in MODELS:
        study.claim(name)  # a fresh run refuses a used folder before doing any work
    teacher = teacher_stage(study)
    if not study.finished("student"):
        train_stage(study, "student")
    if not study.finished("distilled"):
        distill_stage(study, teacher)
    if not is_rank_zero():
        return {}
    path = study.out / "results.json"
    results = json.loads(path.read_text())
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    atomic_write_text(path, json.dumps(results, indent=2))
    write_report(study.out)
    return results
