"""A training stage's state on disk, and stopping on request.

<stage>/checkpoints/last/ is Accelerate's `save_state` (model, optimizer, scheduler, RNG of every process)
plus kdist's progress.json (epoch, step within it, best epoch, curves) and the EMA weights; it is written
whole into last.new and swapped in, so a kill at any moment leaves one complete checkpoint.
<stage>/checkpoints/best.safetensors holds the best-on-val weights; <stage>/metrics.csv the curves.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file

from .files import atomic_write_text
from .models import save_weights
from .ranks import broadcast_choice

# --- stopping early on request (preemption, time limits) ------------------------------------------------

STOP_EXIT_CODE = 75  # "try again later": the state is saved; rerun with --resume


class StopRequested(Exception):
    """Raised once a stop was requested and the state saved: the command exits with STOP_EXIT_CODE."""


class StopWatch:
    """Notices a request to stop: SIGUSR1 or SIGTERM to this process, or the file named by $KDIST_STOP_FILE
    appearing (Slurm's batch script touches it when its preemption signal arrives: a signal sent to the
    launcher would not reach the training processes). Every process checks after every step and they agree
    (all-reduce of max), so all of them stop after the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signalled, self.previous = False, {}
        self.file = Path(os.environ["KDIST_STOP_FILE"]) if os.environ.get("KDIST_STOP_FILE") else None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self, accelerator: Accelerator) -> bool:
        local = self.signalled or bool(self.file and self.file.exists())
        if accelerator.num_processes == 1:
            return local
        return accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "max").item() > 0

    def __enter__(self) -> "StopWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# --- the training state, checkpointed with the model ---------------------------------------------------


@dataclass
class TrainState:
    """What a resumed stage needs besides weights and optimizer: where it is, its best epoch, its curves."""

    epoch: int = 0  # the epoch to run next (or to finish, when step_in_epoch > 0)
    step_in_epoch: int = 0  # batches of `epoch` already trained: a stop request saved mid-epoch
    epoch_sums: dict = field(default_factory=dict)  # that epoch's running train sums, and "seen"
    skipped_steps: int = 0  # fp16: optimizer steps skipped for non-finite gradients
    best_acc: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)  # one dict of metrics per finished epoch

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


# --- files ----------------------------------------------------------------------------------------


def save_last(accelerator: Accelerator, folder: Path, state: TrainState, ema=None) -> None:
    """save_state (model, optimizer, scheduler, RNG) plus progress.json and the EMA weights into last.new,
    then swap it for last: a kill at any moment leaves one whole checkpoint. Nothing of kdist's goes through
    register_for_checkpointing, whose load_state unpickles; Accelerate reads its own files weights_only."""
    new, last, old = folder / "last.new", folder / "last", folder / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(new, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(new), safe_serialization=True)
    accelerator.wait_for_everyone()  # save_state has no barrier of its own
    if accelerator.is_main_process:
        if ema is not None:
            save_weights(ema, new / "ema.safetensors")  # with n_averaged, so a resume averages on
        (new / "progress.json").write_text(state.to_json())
        if last.exists():
            last.rename(old)
        new.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def last_checkpoint(folder: Path) -> Path | None:
    """The newest whole checkpoint of a stage (`last.old` if a kill fell between the two renames)."""
    for name in ("last", "last.old"):
        if (folder / name / "progress.json").exists():
            return folder / name
    return None


def write_history(path: Path, history: list[dict]) -> None:
    """metrics.csv: one row per epoch, every metric a column (the report draws its curves from it)."""
    keys = ["epoch"] + sorted({key for row in history for key in row} - {"epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def chosen_checkpoint(accelerator: Accelerator, folder: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from, its progress.json text), as rank 0 sees them, on every rank: a filesystem's
    cache never splits the ranks between checkpoints."""
    chosen = None
    if accelerator.is_main_process:
        last = last_checkpoint(folder)
        chosen = (last, (last / "progress.json").read_text()) if last is not None else None
    return broadcast_choice(chosen) or (None, None)


def load_kept_weights(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> None:
    """The kept weights as rank 0 wrote them to `path`, sent to every rank (no rank reads a file another node
    wrote), in one memory layout (a channels_last weight would otherwise be read as NCHW bytes)."""
    own = model.state_dict()  # the same keys, in the same order, on every rank
    best = load_file(str(path)) if accelerator.is_main_process else {}
    kept = {}
    for key, value in own.items():
        tensor = best[key] if key in best else torch.empty_like(value, memory_format=torch.contiguous_format)
        kept[key] = broadcast(tensor.contiguous().to(accelerator.device)).cpu()
    model.load_state_dict(kept)


def restore_random_state(accelerator: Accelerator, checkpoint: Path) -> None:
    """A checkpoint saved by fewer processes has no random state for the new ranks (Accelerate then keeps theirs,
    silently): they take rank 0's, which is every rank's (each draws the global batch's dropout masks from the
    same seed), and the main process says so in one line."""
    saved = len(list(checkpoint.glob("random_states_*.pkl")))
    if saved != accelerator.num_processes:
        accelerator.print(
            f"kdist: {checkpoint} was saved by {saved} process(es), resumed on {accelerator.num_processes}: "
            + (
                "ranks without a random state of their own take rank 0's"
                if saved < accelerator.num_processes
                else "the random states of ranks that no longer exist are not needed"
            )
        )
    if accelerator.process_index < saved or saved == 0:
        return
    states = accelerate_load(checkpoint / "random_states_0.pkl")  # weights_only: no arbitrary unpickling
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if accelerator.device.type == "cuda" and states.get("torch_cuda_manual_seed"):
        torch.cuda.set_rng_state(states["torch_cuda_manual_seed"][0])
