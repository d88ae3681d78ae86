"""`kdist bench`'s process figures: one cached distillation epoch under `accelerate launch` with 1 and with 2
CPU processes, and the cost of the loss on the gathered global batch against each process's own slice.

process_scaling launches this module (`python -m kdist.bench_processes RESULT_FILE CONFIG_JSON`) under
launch/cpu.yaml; _process_worker is what every launched process runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import subset
from .engine import fit
from .models import create_model
from .objectives import Distillation
from .processes import make_accelerator
from .study_data import open_data, planned_dataset


def endless_batches(make_loader):
    """Train batches without end: a new epoch (seed 0, epochs 0, 1, ...) whenever one runs out."""
    epoch = 0
    while True:
        yield from make_loader(epoch)
        epoch += 1


def process_scaling(cfg: Config, out: Path) -> dict:
    """Images/s of one cached distillation epoch under `accelerate launch` with 1 and with 2 CPU processes
    (launch/cpu.yaml), each timed inside the job (startup excluded), and their ratio."""
    repo = Path(__file__).resolve().parents[1]
    figures = {}
    for processes in (1, 2):
        result_file = out / f"processes{processes}.json"
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(repo / "launch" / "cpu.yaml"),
            "--num_processes",
            str(processes),
            "-m",
            "kdist.bench_processes",
            str(result_file),
            json.dumps(cfg.to_dict()),
        ]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"bench under {processes} processes failed:\n{done.stderr[-2000:]}")
        figures[processes] = json.loads(result_file.read_text())
    one, two = figures[1]["img_s"], figures[2]["img_s"]
    return {
        "processes1_img_s": one,
        "processes2_img_s": two,
        "processes2_over_1": round(two / one, 3),
        "processes1_threads": figures[1]["threads"],
        "processes2_threads": figures[2]["threads"],
        **{key: figures[2][key] for key in ("gather_step_ms", "local_step_ms", "gather_over_local")},
    }


def gather_cost(accelerator, student, objective, stage, splits, steps: int = 30) -> dict:
    """Milliseconds per distillation step (forward, loss, backward, optimizer) with the loss on the batch
    gathered from every process (objectives.gather_batch, as training runs) and on each process's own slice, the
    two interleaved step by step on the same batches; and their ratio."""
    from .data import augment
    from .engine import make_optimizer
    from .objectives import gather_batch

    model = accelerator.prepare(student)
    optimizer = make_optimizer(model, stage)
    objective.to(accelerator.device)
    loader = endless_batches(
        lambda epoch: splits["train"][0].loader(
            stage.batch_size, 0, accelerator.process_index, accelerator.num_processes, epoch
        )
    )
    times = {"gathered": [], "local": []}
    for step in range(steps + 2):
        raw, labels, indices, views, shifts = next(loader)
        images = augment(raw, views, shifts, 0)
        for mode in ("gathered", "local"):
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            logits = model(images)
            targets = objective.targets(images, indices, views)
            batch = (
                gather_batch(accelerator, logits, labels, targets) if mode == "gathered" else (logits, labels, targets)
            )
            loss, _ = objective.loss(*batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                times[mode].append(time.perf_counter() - start)
    gathered, local = (1000 * float(np.median(times[mode])) for mode in ("gathered", "local"))
    return {
        "gather_step_ms": round(gathered, 2),
        "local_step_ms": round(local, 2),
        "gather_over_local": round(gathered / local, 3),
    }


def _process_worker(result_file: str, cfg_json: str) -> None:
    """Run by process_scaling under the launcher: time one cached distillation epoch, write img/s from rank 0."""
    from .config import config_from_dict

    cfg = config_from_dict(json.loads(cfg_json))
    accelerator = make_accelerator(replace(cfg.trainer, progress=False))
    data = open_data(replace(cfg.data, shards="none"), accelerator)
    mean, std = data.mean, data.std
    splits = subset(data.splits, cfg.data.train_subset, cfg.data.val_subset, cfg.seed)
    splits["val"] = tuple(t[:128] for t in splits["val"])
    cache = torch.randn(
        len(splits["train"][1]), 8, planned_dataset(cfg.data).num_classes
    )  # the cache's cost is a lookup, whatever its values
    torch.manual_seed(0)
    student = create_model(
        cfg.student_model.arch, mean, std, cfg.student_model.input_size, dataset=planned_dataset(cfg.data)
    )
    objective = Distillation(cfg.distill, cfg.kd, teacher_logits_cache=cache)
    folder = Path(result_file).with_suffix("")  # one folder for every process: they share its checkpoints
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    fit(accelerator, student, objective, replace(cfg.distill, epochs=1), splits, folder, seed=0, progress=False)
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()  # every process has read the kept weights back
    torch.manual_seed(0)
    costs = gather_cost(
        accelerator,
        create_model(
            cfg.student_model.arch, mean, std, cfg.student_model.input_size, dataset=planned_dataset(cfg.data)
        ),
        Distillation(cfg.distill, cfg.kd, teacher_logits_cache=cache),
        cfg.distill,
        splits,
    )
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        Path(result_file).write_text(
            json.dumps(
                {
                    "img_s": round(len(splits["train"][1]) / seconds, 1),
                    "epoch_s": round(seconds, 2),
                    "processes": accelerator.num_processes,
                    "threads": torch.get_num_threads(),
                    **costs,
                }
            )
        )


if __name__ == "__main__":
    _process_worker(*sys.argv[1:3])
