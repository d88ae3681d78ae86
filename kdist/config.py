"""Configuration as plain dataclasses, read from YAML and `--set key=value` overrides.

Unknown keys and out-of-range values are errors (KdistError), never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

import yaml

from . import KdistError
from .datasets import DEFAULT_FLAG

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "none")
CLASS_WEIGHTS = ("none", "inverse_sqrt", "inverse")
TEACHER_MODES = ("auto", "cached", "online")
MIXED_PRECISIONS = (None, "no", "fp16", "bf16")
TRACKERS = ("none", "wandb", "jsonl")


@dataclass
class DataConfig:
    # The MedMNIST 2D set read from the data root (its npz, or the shards written from it): any flag of medmnist's
    # INFO with one label per image. A shard folder (data.shards) names its own dataset in its manifest.
    flag: str = DEFAULT_FLAG
    root: str | None = None  # None: $KDIST_DATA_ROOT, else medmnist's default root
    size: int = 28  # image side the models get: a MedMNIST size (28, 64, 128, 224), or any size from shards
    # The train batches' recipe: dihedral (the 8 flips/rotations of the square, and the stages' pixel shifts), or
    # photo (those, then a random resized crop and colour jitter: torchvision's ops, batched on the device), for
    # photographs. In distillation the online teacher sees the same view (photo needs kd.teacher_mode online/auto).
    augment: str = "dihedral"
    train_subset: int | None = None  # use a random subset of train/val (for --quick)
    val_subset: int | None = None
    download: bool = True
    # Where train/val/test are read from: `auto` (the default: the data.flag file's webdataset shards, written
    # once into $KDIST_SHARD_CACHE or ~/.cache/kdist/shards), a folder written by `kdist shards`, or null / none
    # (the npz in memory, as every run before shards became the data path).
    shards: str | None = "auto"
    shard_url: str | None = (
        None  # shards elsewhere: a URL template with {name}, e.g. "pipe:aws s3 cp s3://b/derma/{name} -"
    )
    # DataLoader workers decoding streamed train shards, per process; None: the CPUs this process may use
    # (os.sched_getaffinity, which Slurm sets) shared by the node's processes, less one for the process itself.
    num_workers: int | None = None
    # Train images decoded from shards are kept in memory after their first read when they fit in this many MB
    # (per process); later epochs then read no shard, in the same order. 0: stream every epoch.
    memory_mb: int = 1024


@dataclass
class StageConfig:
    """How one model is trained (teacher, student or distilled)."""

    epochs: int = 30
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.05
    batch_size: int = 128  # the global batch of one optimizer step: batch_size / (processes x accumulation) per process
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # EMA of weights (validation and kept weights use the average); None: off
    class_weights: str = "none"  # label-loss weight per class: none, inverse_sqrt or inverse train frequency
    gradient_clip: float | None = None  # clip the gradient norm (accelerator.clip_grad_norm_); None: off
    # Random shift of up to this many pixels (of the data file) on top of the flips/rotations; 0: off.
    # With a cached teacher the target is the teacher's output on the unshifted view (an approximation).
    translate: int = 0
    # Mixup / CutMix (Beta(alpha, alpha) mixing of each batch with a shuffled copy, after the views and shifts);
    # 0: off. In distillation the teacher sees the same mixed batch (needs kd.teacher_mode online or auto).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class ModelConfig:
    arch: str = ""  # teacher, student or any torchvision classifier name
    input_size: int | None = None  # upsample inside the model (e.g. 28 px shown at 64 px)
    weights: str | None = None  # local safetensors state dict to start from
    pretrained: str | None = None  # "imagenet": start from published ImageNet weights (see pretrained.py)


@dataclass
class KDConfig:
    method: str = "dist"  # chosen on val over hinton and dkd: results/archive/sweep/
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the distillation term; 1 - alpha goes to the label loss
    # online: the frozen teacher runs beside the student on every batch (exact for any augmentation);
    # cached: its logits computed once per dihedral view (cache.py), the fast path on CPUs;
    # auto: online on GPUs, cached on CPUs.
    teacher_mode: str = "auto"
    standardize: bool = False  # logit standardisation (Sun et al. 2024) before the KD term
    # same: the teacher sees the student's view of the image; mean: the teacher's logits averaged
    # over all 8 flips/rotations (a test-time-augmented teacher), the same target for every view.
    teacher_views: str = "same"
    options: dict = field(default_factory=dict)  # method-specific, e.g. {beta: 8.0} for dkd
    # With a mixed batch (mixup/cutmix) the loss is the KD term alone (false), or alpha * KD + (1 - alpha) *
    # the cross-entropy on the mixed labels (true).
    mixed_ce: bool = False
    # Online only: torch.compile the frozen teacher (inductor, weights frozen as constants): the same float32
    # logits to ~1e-5 after 10-50 s of compiling per batch shape. On 2 CPU cores it did not repay that: the
    # BatchNorm-folded eager teacher was faster (EfficientNet-B0 at batch 128: 147 vs 165 ms).
    compile_teacher: bool = False
    # Online only: the frozen teacher's precision. same: the student's (trainer.mixed_precision); bf16: bfloat16
    # autocast for the teacher alone (logits within ~0.1 of float32's), for hardware that computes bf16 (GPUs,
    # CPUs with AMX or AVX-512 BF16; kdist warns elsewhere). The student trains as configured either way.
    teacher_precision: str = "same"


@dataclass
class TrainerConfig:
    """How Accelerate runs the loops (processes.make_accelerator). Processes and machines come from the
    launcher (`accelerate launch`, launch/*.yaml), not from here."""

    cpu: bool = False  # run on the CPU even where CUDA is present (Accelerate's cpu=True)
    mixed_precision: str | None = None  # no, fp16 or bf16; None: the launcher's choice, else no
    gradient_accumulation_steps: int = (
        1  # micro-steps per optimizer step; a stage's batch_size is the global batch over all of them
    )
    sync_batchnorm: bool = (
        True  # SyncBatchNorm in trained models under several CUDA processes (CPUs: BN statistics per process)
    )
    timeout_s: int = 600  # collective timeout: a hung process fails in minutes
    progress: bool = True  # a line per epoch, and a progress bar within it on a terminal (main process)
    # wandb: W&B runs (offline without an API key); jsonl: <stage>/tracker.jsonl; none: no tracker beyond the run
    # folder's metrics.csv and results.json, which are always written (tracking.py)
    tracker: str = "none"
    project: str | None = None  # the W&B project; None: $WANDB_PROJECT, else kdist
    wandb_entity: str | None = None  # the W&B entity (team or user); None: $WANDB_ENTITY, else your default entity
    wandb_group: str | None = (
        None  # the W&B group of the study's runs; None: the run folder's name (slurm/study.sh sets one)
    )


@dataclass
class ReportConfig:
    # The class whose sensitivity and specificity the report, model card and W&B summary give; a set without a
    # class of that name: the positive class (label 1) of a two-class set, else none.
    positive_class: str = "melanoma"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    # The default recipe (measured on val, see results/EXPERIMENTS.md): both models see the 28 px images upsampled
    # to 64 px inside the model; epochs sized so `kdist run` fits in 30 minutes on 2 CPU cores.
    teacher_model: ModelConfig = field(default_factory=lambda: ModelConfig("teacher", input_size=64))
    student_model: ModelConfig = field(default_factory=lambda: ModelConfig("student", input_size=64))
    teacher: StageConfig = field(default_factory=lambda: StageConfig(epochs=22))
    # Gradient clipping keeps SqueezeNet (no BatchNorm) from collapsing to one class: without it a
    # default run's distillation died at the peak learning rate (the T^2-scaled KD gradient is larger).
    student: StageConfig = field(default_factory=lambda: StageConfig(epochs=25, gradient_clip=1.0))
    distill: StageConfig = field(default_factory=lambda: StageConfig(epochs=25, gradient_clip=1.0))
    kd: KDConfig = field(default_factory=KDConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "Config":
        from .data import AUGMENTS
        from .datasets import medmnist_info
        from .losses import KD_LOSSES
        from .models import resolve_arch

        def check(ok: bool, key: str, message: str):
            if not ok:
                raise KdistError(f"config: {key} {message}")

        for name in ("teacher", "student", "distill"):
            stage: StageConfig = getattr(self, name)
            check(stage.epochs >= 1, f"{name}.epochs", f"must be >= 1 (got {stage.epochs})")
            check(stage.lr > 0, f"{name}.lr", f"must be > 0 (got {stage.lr})")
            check(stage.weight_decay >= 0, f"{name}.weight_decay", "must be >= 0")
            check(stage.batch_size >= 1, f"{name}.batch_size", f"must be >= 1 (got {stage.batch_size})")
            check(stage.optimizer in OPTIMIZERS, f"{name}.optimizer", f"must be one of {OPTIMIZERS}")
            check(stage.schedule in SCHEDULES, f"{name}.schedule", f"must be one of {SCHEDULES}")
            check(0 <= stage.label_smoothing < 1, f"{name}.label_smoothing", "must be in [0, 1)")
            check(stage.ema_decay is None or 0 < stage.ema_decay < 1, f"{name}.ema_decay", "must be in (0, 1) or null")
            check(stage.class_weights in CLASS_WEIGHTS, f"{name}.class_weights", f"must be one of {CLASS_WEIGHTS}")
            check(
                stage.gradient_clip is None or stage.gradient_clip > 0, f"{name}.gradient_clip", "must be > 0 or null"
            )
            check(
                stage.mixup_alpha >= 0 and stage.cutmix_alpha >= 0,
                f"{name}.mixup_alpha/cutmix_alpha",
                "must be >= 0 (0: off)",
            )
            check(
                isinstance(stage.translate, int) and 0 <= stage.translate <= self.data.size // 4,
                f"{name}.translate",
                f"must be a whole number of pixels in 0..{self.data.size // 4} (got {stage.translate!r})",
            )
        check(self.kd.temperature > 0, "kd.temperature", f"must be > 0 (got {self.kd.temperature})")
        check(0 <= self.kd.alpha <= 1, "kd.alpha", f"must be in [0, 1] (got {self.kd.alpha})")
        check(isinstance(self.kd.options, dict), "kd.options", "must be a mapping, e.g. {beta: 8.0}")
        if self.kd.method in KD_LOSSES:
            import inspect

            accepted = list(inspect.signature(KD_LOSSES[self.kd.method]).parameters)[4:]
            unknown = sorted(set(self.kd.options) - set(accepted))
            check(not unknown, "kd.options", f"{unknown} not accepted by {self.kd.method} (accepts {accepted})")
        check(self.kd.teacher_mode in TEACHER_MODES, "kd.teacher_mode", f"must be one of {TEACHER_MODES}")
        check(
            self.trainer.mixed_precision in MIXED_PRECISIONS,
            "trainer.mixed_precision",
            f"must be one of no, fp16, bf16 or null (got {self.trainer.mixed_precision!r})",
        )
        check(
            isinstance(self.trainer.gradient_accumulation_steps, int) and self.trainer.gradient_accumulation_steps >= 1,
            "trainer.gradient_accumulation_steps",
            "must be a whole number >= 1",
        )
        check(
            self.trainer.tracker != "csv",
            "trainer.tracker",
            "csv is gone: metrics.csv and results.json are always written; use none (or wandb, jsonl)",
        )
        check(
            self.trainer.tracker in TRACKERS,
            "trainer.tracker",
            f"must be none, wandb or jsonl (got {self.trainer.tracker!r})",
        )
        check(self.trainer.timeout_s >= 10, "trainer.timeout_s", "must be >= 10 seconds")
        check(self.kd.teacher_views in ("same", "mean"), "kd.teacher_views", "must be same or mean")
        check(self.kd.teacher_precision in ("same", "bf16"), "kd.teacher_precision", "must be same or bf16")
        check(
            self.kd.method in KD_LOSSES,
            "kd.method",
            f"{self.kd.method!r} is unknown; choose one of {sorted(KD_LOSSES)}",
        )
        for name in ("teacher_model", "student_model"):
            model: ModelConfig = getattr(self, name)
            resolve_arch(model.arch)
            check(model.input_size is None or model.input_size >= 16, f"{name}.input_size", "must be >= 16 or null")
            check(
                model.pretrained in (None, "imagenet"),
                f"{name}.pretrained",
                f"must be imagenet or null (got {model.pretrained!r})",
            )
        medmnist_info(self.data.flag)
        check(self.data.augment in AUGMENTS, "data.augment", f"must be one of {AUGMENTS} (got {self.data.augment!r})")
        for name in ("teacher", "student", "distill"):
            check(
                self.data.augment != "photo" or getattr(self, name).translate == 0,
                f"{name}.translate",
                "must be 0 with data.augment photo (its random crops move the image already)",
            )
        check(
            not (self.data.augment == "photo" and self.kd.teacher_mode == "cached"),
            "data.augment",
            "photo needs kd.teacher_mode online or auto: the teacher must see the augmented view",
        )
        check(isinstance(self.data.size, int) and self.data.size >= 8, "data.size", "must be a whole number >= 8")
        check(
            self.data.num_workers is None or (isinstance(self.data.num_workers, int) and self.data.num_workers >= 0),
            "data.num_workers",
            "must be a whole number >= 0, or null (from the CPUs)",
        )
        check(
            isinstance(self.data.memory_mb, int) and self.data.memory_mb >= 0,
            "data.memory_mb",
            "must be a whole number >= 0",
        )
        check(
            self.data.shard_url is None or "{name}" in str(self.data.shard_url),
            "data.shard_url",
            "must contain {name}, where each shard's file name goes",
        )
        check(
            self.data.shard_url is None or self.data.shards not in (None, "auto"),
            "data.shard_url",
            "needs data.shards: the local folder holding the shards' manifest.json",
        )
        for key in ("train_subset", "val_subset"):
            value = getattr(self.data, key)
            check(value is None or value >= 1, f"data.{key}", "must be >= 1 or null")
        return self


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise KdistError(f"config: {prefix or 'top level'} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KdistError(f"config: unknown key {prefix}{unknown[0]}; known keys: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KdistError(f"config: {prefix}{name} must be a number (got {value!r})")
            kwargs[name] = value
        else:
            kwargs[name] = value
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict:
    """'distill.kd.temperature=2' -> nested dict; the value is parsed as YAML (numbers, null, true)."""
    if "=" not in text:
        raise KdistError(f"--set {text!r}: expected key=value, e.g. --set teacher.epochs=5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


# --quick: a smoke run (2 epochs on a subset, native 28 px) that finishes in about a minute on 2 CPU cores.
QUICK = {
    "data": {"train_subset": 1024, "val_subset": 512},
    "teacher_model": {"input_size": None},
    "student_model": {"input_size": None},
    "teacher": {"epochs": 2},
    "student": {"epochs": 2},
    "distill": {"epochs": 2},
}


def load_config(path=None, overrides: list[dict] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated."""
    values = Config().to_dict()
    if path:
        try:
            with open(path) as handle:
                loaded = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise KdistError(f"config file {path} not found") from None
        except yaml.YAMLError as exc:
            raise KdistError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise KdistError(f"config file {path} must hold a mapping of settings")
        _build(Config, loaded, "")  # reject unknown keys before merging
        values = merge(values, loaded)
    for update in overrides or []:
        _build(Config, update, "")
        values = merge(values, update)
    return config_from_dict(values)


def config_from_dict(values: dict) -> Config:
    """A validated Config from nested values; `data.shards: none` (the npz in memory) is read as null."""
    data = values.get("data")
    if isinstance(data, dict) and str(data.get("shards")).lower() in ("none", "null", ""):
        values = {**values, "data": {**data, "shards": None}}
    try:
        return _build(Config, values, "").validate()
    except TypeError as exc:  # e.g. a string where a number belongs
        raise KdistError(f"config: a setting has the wrong type ({exc})") from None
