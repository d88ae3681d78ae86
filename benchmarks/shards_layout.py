"""The same cached-distillation epoch in one process (kdist.bench.epoch_seconds) on the train split read from the
npz, from the shards (decoded into memory, NCHW memory), and from the shards in channels_last memory as the npz's:
whether the data the shards path holds costs anything inside the loop (issue 51).

    KDIST_DATA_ROOT=../shared/data .venv/bin/python benchmarks/shards_layout.py
"""

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from kdist.bench import epoch_seconds
from kdist.cache import teacher_cache
from kdist.config import Config, TrainerConfig
from kdist.data import MemoryImages
from kdist.models import create_model
from kdist.objectives import Distillation
from kdist.processes import make_accelerator
from kdist.study_data import open_data

ROOT = os.environ.get("KDIST_DATA_ROOT", "../shared/data")
cfg = Config()
acc = make_accelerator(TrainerConfig(progress=False))
npz = open_data(replace(cfg.data, root=ROOT, shards="none"), acc)
sh = open_data(replace(cfg.data, root=ROOT, shards="auto"), acc)
imgs, labels = sh.splits["train"][0].load(), sh.splits["train"][1]
print(
    "npz layout cl:",
    npz.splits["train"][0].images.is_contiguous(memory_format=torch.channels_last),
    "shards cl:",
    imgs.is_contiguous(memory_format=torch.channels_last),
)
variants = {
    "npz": npz.splits,
    "shards": sh.splits,
    "shards_cl": {
        **sh.splits,
        "train": (MemoryImages(imgs.contiguous(memory_format=torch.channels_last), labels), labels),
    },
}
teacher = create_model(cfg.teacher_model.arch, npz.mean, npz.std, 64).eval()
with tempfile.TemporaryDirectory() as d:
    cache = teacher_cache(teacher, npz.splits["train"][0].load(), labels, Path(d))
for r in range(2):
    for name, splits in variants.items():
        torch.manual_seed(0)
        s = create_model(cfg.student_model.arch, npz.mean, npz.std, 64)
        print(
            r,
            name,
            round(
                epoch_seconds(s, Distillation(cfg.distill, cfg.kd, teacher_logits_cache=cache), cfg.distill, splits), 2
            ),
            flush=True,
        )
