"""How the processes of a launch stay in step outside the training collectives, through the process group's
key-value store (torch.distributed's TCPStore, which every launch already has):

- an error on any rank is printed once, with its rank, and ends every rank within seconds (`report_error`
  and the watchdog thread that `watch_for_errors` starts), instead of the others waiting in a collective
  until trainer.timeout_s;
- waits for one rank's slow work (a download, shard writing, a W&B upload) are not collectives, so no
  collective timeout can cut them short (`patient_barrier`, `main_first`);
- what rank 0 chose (the checkpoint to resume from) is what every rank uses (`broadcast_choice`), and every
  node proves at the start that it sees the run folder (`check_shared_folder`).
With one process each of these does nothing, or the plain thing.
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import KdistError

ERROR_KEY = "kdist/error"


def _store():
    """The launch's store, or None when this process is not part of a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.distributed_c10d._get_default_store()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report_error(message: str) -> None:
    """Print `kdist: error: ...` once for the whole launch: the first rank to fail prints its message (naming its
    rank unless it is rank 0) and tells the others, whose watchdogs then end them; before the process group
    exists every rank meets the same input, and rank 0 alone prints."""
    store = _store()
    if store is None:
        if rank() == 0:
            print(f"kdist: error: {message}", file=sys.stderr, flush=True)
        return
    first = store.compare_set(ERROR_KEY, "", str(rank()).encode()) == str(rank()).encode()
    if first:
        where = "" if rank() == 0 else f" (rank {rank()} on {socket.gethostname()})"
        print(f"kdist: error{where}: {message}", file=sys.stderr, flush=True)


def watch_for_errors(poll_s: float = 0.5) -> None:
    """A daemon thread that ends this process (exit code 2) once another rank reported an error, wherever this
    process is waiting (a collective, a data loader). Stopped and joined at exit: a thread still inside a store
    call while the process group is torn down aborts the process."""
    store = _store()
    if store is None:
        return
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_s):
            try:
                failed = store.check([ERROR_KEY]) and store.get(ERROR_KEY) != str(rank()).encode()
            except Exception:  # the store went away: the launch is ending anyway
                return
            if failed:  # another rank's error, printed there
                os._exit(2)

    thread = threading.Thread(target=watch, name="kdist-error-watchdog", daemon=True)
    thread.start()

    def stop_watching():
        stop.set()
        thread.join()

    atexit.register(stop_watching)


_barriers = {"count": 0}


def patient_barrier(name: str) -> None:
    """Every rank waits here for the others, without the collective timeout (the store is polled instead): for
    waits on one rank's slow work. A rank that fails meanwhile ends the others through the watchdog."""
    store = _store()
    if store is None:
        return
    _barriers["count"] += 1  # every rank calls barriers in the same order
    key = f"kdist/barrier/{_barriers['count']}/{name}"
    if store.add(key, 1) == torch.distributed.get_world_size():
        store.set(key + "/open", b"1")
    # Polled, not store.wait: a waiting call would hold the store's connection, which the watchdog shares.
    while not store.check([key + "/open"]):
        time.sleep(0.05)


@contextmanager
def main_first(name: str, is_main: bool):
    """The main process runs the block first (a download, shard writing and checking), the others after it: like
    Accelerate's main_process_first, with patient barriers."""
    if not is_main:
        patient_barrier(name)
    yield
    if is_main:
        patient_barrier(name)


def broadcast_choice(value):
    """Rank 0's `value` (any picklable object of kdist's own making) on every rank."""
    if _store() is None:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def check_shared_folder(folder: Path, is_main: bool, wait_s: float = 5.0) -> None:
    """Every node must see the run folder that rank 0 writes (checkpoints, the kept weights, results.json):
    rank 0 writes a token there, every rank reads it back (retrying for `wait_s`: a network filesystem may show a
    new file late), else stops with one line naming the folder and the host."""
    if _store() is None:
        return
    token = broadcast_choice(secrets.token_hex(8) if is_main else None)
    marker = folder / f".shared-check-{token}"  # its own name: jobs of one study share the folder
    if is_main:
        marker.write_text(token)
    patient_barrier("shared-folder-written")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = marker.read_text() == token
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not seen:
        raise KdistError(
            f"{socket.gethostname()} does not see the run folder {folder.resolve()} that rank 0 writes; --out must "
            "be on a filesystem shared by every node (e.g. the cluster's shared home or project space)"
        )
    patient_barrier("shared-folder-read")
    if is_main:
        marker.unlink(missing_ok=True)
