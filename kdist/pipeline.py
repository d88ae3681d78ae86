"""The stages of a study: train teacher, train student, distill, evaluate; and `run`, all of them.

A run folder holds everything a stage produced:
    config.yaml, run_info.json          resolved config; seed, versions, git commit, process count
    <model>/metrics.csv                 per-epoch train/val loss and accuracy, learning rate, KD/CE parts
    <model>/checkpoints/                last/ (Accelerate's save_state, every epoch) and best.safetensors
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
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from . import KdistError, __version__
from .cache import teacher_cache
from .config import Config
from .data import class_weights, subset
from .datasets import DatasetSpec, default_spec
from .engine import fit
from .files import atomic_output, atomic_write_text
from .models import DermClassifier, create_model, load_model, load_state, save_weights
from .objectives import Distillation, Objective, Supervised
from .processes import describe_batch, make_accelerator, per_process_batch
from .ranks import check_shared_folder, main_first
from .results import MODELS, record_model, recorded
from .scoring import gathered_logits
from .study_data import open_data
from .tracking import stage_run


@dataclass
class Study:
    """What every stage needs: the config, the run folder and the data (loaded once)."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    splits: dict
    mean: list[float]
    std: list[float]
    resume: bool = False
    eval_splits: tuple = ("val", "test")  # a sweep evaluates on val only; test is for the chosen config
    cache_dir: Path | None = None  # teacher-logit caches; default <out>/cache (a sweep shares one)
    other_sizes: dict = field(default_factory=dict)  # {size: splits} of other data files, for teachers of those files
    shard_folder: Path | None = None  # where the data is read from, when from shards
    dataset: DatasetSpec = field(default_factory=default_spec)  # its classes, which every model predicts

    @classmethod
    def open(
        cls,
        cfg: Config,
        out: Path,
        resume: bool = False,
        eval_splits: tuple = ("val", "test"),
        accelerator: Accelerator | None = None,
    ) -> "Study":
        accelerator = accelerator or make_accelerator(cfg.trainer)
        for stage in (cfg.teacher, cfg.student, cfg.distill):  # a batch that does not divide fails before any work
            per_process_batch(stage.batch_size, accelerator.num_processes, accelerator.gradient_accumulation_steps)
        accelerator.print(f"kdist: {describe_batch(accelerator, cfg.distill.batch_size)}")
        data = open_data(cfg.data, accelerator)  # normalisation from the whole train split, before any subset
        splits = subset(data.splits, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        check_shared_folder(out, accelerator.is_main_process)  # before any stage's work is spent
        study = cls(
            cfg,
            out,
            accelerator,
            splits,
            data.mean,
            data.std,
            resume,
            eval_splits,
            shard_folder=data.shard_folder,
            dataset=data.spec,
        )
        if (
            accelerator.is_main_process and not (out / "config.yaml").exists()
        ):  # the first command into a folder describes the run
            study.write_run_info()
        if accelerator.is_main_process and not (out / "predictions" / "test_samples.npz").exists():
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
        if size not in self.other_sizes:  # read each other size once: the MedMNIST file of it, or the same shards
            medmnist = cfg.data.shards in (None, "auto")
            other = open_data(
                replace(cfg.data, size=size, shards="none" if medmnist else cfg.data.shards), self.accelerator
            )
            self.other_sizes[size] = subset(
                other.splits,
                cfg.data.train_subset,
                cfg.data.val_subset,
                cfg.seed,
            )
        images, labels = self.other_sizes[size][split]
        if not torch.equal(labels, self.splits[split][1]):
            raise KdistError(
                f"the {size} px and {cfg.data.size} px data files do not hold the same {split} images in the same "
                "order; use files of one release"
            )
        return images, labels

    def finished(self, name: str) -> bool:
        """A stage is done when its weights and its results entry are both written."""
        return (self.out / f"{name}.safetensors").exists() and recorded(self, name)

    def claim(self, name: str) -> None:
        """Refuse to overwrite a finished stage unless resuming (where it is skipped instead)."""
        if (self.out / f"{name}.safetensors").exists() and not self.resume:
            raise KdistError(
                f"{self.out} already holds {name}.safetensors; choose another --out, or --resume {self.out} to "
                "continue that run"
            )

    def save_test_samples(self, count: int = 25) -> None:
        """A fixed random set of test images for the report's qualitative grids (same for every model)."""
        images = self.splits["test"][0]
        indices = np.sort(np.random.default_rng(0).choice(len(images), size=min(count, len(images)), replace=False))
        folder = self.out / "predictions"
        folder.mkdir(exist_ok=True)
        with atomic_output(folder / "test_samples.npz") as tmp:
            np.savez(tmp, indices=indices, images=images[indices].permute(0, 2, 3, 1).numpy())

    def write_run_info(self) -> None:
        processes, accumulation = self.accelerator.num_processes, self.accelerator.gradient_accumulation_steps
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        packages = ["torch", "torchvision", "accelerate", "medmnist", "numpy", "scikit-learn"]
        info = {
            "seed": self.cfg.seed,
            "kdist": __version__,
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "num_processes": self.accelerator.num_processes,
            "device": {
                "type": self.device.type,
                "count": self.accelerator.num_processes if self.device.type == "cuda" else 0,
            },
            "batch": {
                name: {
                    "global": stage.batch_size,
                    "per_process": stage.batch_size // (processes * accumulation),
                    "accumulation_steps": accumulation,
                }
                for name, stage in (
                    ("teacher", self.cfg.teacher),
                    ("student", self.cfg.student),
                    ("distill", self.cfg.distill),
                )
            },
            "mixed_precision": self.accelerator.mixed_precision,
            "data": str(self.shard_folder) if self.shard_folder else "npz in memory",
            "packages": {name: version(name) for name in packages},
        }
        atomic_write_text(self.out / "run_info.json", json.dumps(info, indent=2))

    @property
    def device(self) -> torch.device:
        """Where this process computes: its GPU, or the CPU."""
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        """Under DDP every process runs the same command; only the main process writes files."""
        return self.accelerator.is_main_process

    def teacher_mode(self, teacher_size: int) -> str:
        """online or cached. `auto` takes the path that works and is fast: online on GPUs and for mixed batches
        (the teacher must see them), the exact cache on CPUs and for a teacher trained on another data size
        (online, it would see the student's images)."""
        mode, distill = self.cfg.kd.teacher_mode, self.cfg.distill
        if mode != "auto":
            return mode
        if teacher_size != self.cfg.data.size:
            chosen = "cached"
            why = f"the teacher was trained on {teacher_size} px images, the data is {self.cfg.data.size} px"
        elif distill.mixup_alpha or distill.cutmix_alpha:
            chosen, why = "online", "the teacher must see the mixed batches"
        elif self.cfg.data.augment == "photo":
            chosen, why = "online", "the teacher must see the photo recipe's crops and colours"
        elif self.device.type == "cuda":
            chosen, why = "online", "on GPUs"
        else:
            chosen, why = "cached", "on CPUs"
        self.accelerator.print(f"kdist: kd.teacher_mode auto: {chosen} ({why})")
        return chosen

    def seed(self) -> None:
        """Every stage starts from the same seed, so a stage run alone equals the same stage inside `run`."""
        set_seed(self.cfg.seed)

    def new_model(self, role: str) -> DermClassifier:
        spec = self.cfg.teacher_model if role == "teacher" else self.cfg.student_model
        model = create_model(spec.arch, self.mean, self.std, spec.input_size, spec.pretrained, self.dataset)
        if spec.weights:
            load_state(model, Path(spec.weights))
        return model


def is_rank_zero() -> bool:
    """Whether this is the main process of the job (the one that writes results and reports)."""
    return PartialState().is_main_process


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fit_stage(
    study: Study, name: str, model: DermClassifier, objective: Objective, stage, val_teacher_logits=None
) -> tuple[DermClassifier, float]:
    """Train `model` with the engine into <out>/<name>/; record the config it ran with. Returns the kept model and
    the training loop's seconds."""
    model, seconds = fit(
        study.accelerator,
        model,
        objective,
        stage,
        study.splits,
        study.out / name,
        study.cfg.seed,
        resume=study.resume,
        progress=study.cfg.trainer.progress,
        sync_batchnorm=study.cfg.trainer.sync_batchnorm,
        val_teacher_logits=val_teacher_logits,
        augment=study.cfg.data.augment,
    )
    if study.is_main:
        atomic_write_text(study.out / name / "config.yaml", yaml.safe_dump(study.cfg.to_dict(), sort_keys=False))
    return model, seconds


def train_stage(study: Study, role: str) -> DermClassifier:
    """Train the teacher or the student on labels alone; save and evaluate its best-on-val weights."""
    stage = study.cfg.teacher if role == "teacher" else study.cfg.student
    study.claim(role)
    study.seed()
    weights = class_weights(study.splits["train"][1], study.dataset.num_classes, stage.class_weights)
    with stage_run(study, role):
        model, seconds = fit_stage(study, role, study.new_model(role), Supervised(stage, weights), stage)
        if study.is_main:
            save_weights(model, study.out / f"{role}.safetensors", {"data_size": study.cfg.data.size})
        record_model(study, role, model, train_time_s=seconds)
    return model


def teacher_stage(study: Study) -> DermClassifier:
    """The study's teacher: loaded when a resumed study already finished it, else trained."""
    if study.finished("teacher"):
        return load_model(study.out / "teacher.safetensors", expect_dataset=study.dataset)
    return train_stage(study, "teacher")


def distill_stage(study: Study, teacher: torch.nn.Module) -> DermClassifier:
    """Distill a fresh student from a frozen teacher; save and evaluate its best-on-val weights."""
    # A teacher loaded from a file sees the train images at the size it was trained on (e.g. the 64 px file
    # teaching a 28 px student); the student only ever sees its own data.
    if teacher.dataset.classes != study.dataset.classes:
        raise KdistError(
            f"the teacher predicts the classes of {teacher.dataset.name} ({', '.join(teacher.dataset.classes)}), the "
            f"data is {study.dataset.name} ({', '.join(study.dataset.classes)}); distill from a teacher of this data"
        )
    teacher_size = study.size_for(teacher)
    kd, mode = study.cfg.kd, study.teacher_mode(teacher_size)
    if mode == "cached" and (study.cfg.distill.mixup_alpha or study.cfg.distill.cutmix_alpha):
        raise KdistError(
            "distill.mixup_alpha/cutmix_alpha need kd.teacher_mode online (or auto): the teacher must see the mixed "
            "batch"
        )
    if mode == "cached" and study.cfg.data.augment == "photo":
        raise KdistError(
            "data.augment photo needs kd.teacher_mode online (or auto): the teacher must see the augmented view"
        )
    if teacher_size != study.cfg.data.size and mode != "cached":
        raise KdistError(
            f"the teacher was trained on {teacher_size} px images and the student's data is {study.cfg.data.size} px; "
            "a teacher of another size needs kd.teacher_mode: cached"
        )
    study.claim("distilled")
    weights = class_weights(study.splits["train"][1], study.dataset.num_classes, study.cfg.distill.class_weights)
    images, labels = study.split_at("train", teacher_size)  # a teacher of another file: the same samples, checked
    teacher.to(study.device)
    val_teacher_logits, _ = gathered_logits(study.accelerator, teacher, *study.split_at("val", teacher_size))
    if mode == "cached":
        # The main process computes and writes the cache; the others then read the same file.
        with main_first("teacher cache", study.is_main):
            # every train image once, in order (read whole from streamed shards)
            logits = teacher_cache(teacher, images.load(), labels, study.cache_dir or study.out / "cache")
        teacher.cpu()
        objective = Distillation(study.cfg.distill, kd, teacher_logits_cache=logits, class_weights=weights)
    else:  # the frozen teacher beside the student on every process, fed the same augmented batch
        objective = Distillation(
            study.cfg.distill,
            kd,
            teacher=teacher,
            class_weights=weights,
            mixed_precision=study.accelerator.mixed_precision,
        )
    study.seed()
    with stage_run(study, "distilled"):
        model, seconds = fit_stage(
            study, "distilled", study.new_model("student"), objective, study.cfg.distill, val_teacher_logits
        )
        teacher.cpu()
        if study.is_main:
            save_weights(
                model,
                study.out / "distilled.safetensors",
                {
                    "data_size": study.cfg.data.size,
                    "kd": study.cfg.kd.__dict__,
                    "teacher_mode": mode,
                    "teacher": teacher.arch,
                    "teacher_data_size": teacher_size,
                },
            )
        record_model(study, "distilled", model, teacher=teacher, train_time_s=seconds)
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
    if not study.is_main:
        return {}
    path = study.out / "results.json"
    results = json.loads(path.read_text())
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    atomic_write_text(path, json.dumps(results, indent=2))
    write_report(study.out)
    return results
