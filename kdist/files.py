"""Atomic file output: write to a temp file beside the target, then rename it over the target.

A killed process never leaves a half-written file that a later run would trust, and concurrent
writers (DDP ranks) never share a temp file. `locked` serialises writers of one file across jobs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

STALE_LOCK_S = 600  # a lock file older than this was left by a killed writer


@contextmanager
def atomic_output(path):
    """Yields a temp path (same folder and suffix); it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


@contextmanager
def locked(path, poll_s: float = 0.05):
    """An exclusive lock on `path` for the block, between processes and jobs: flock where the filesystem has it,
    else (Lustre or NFSv3 mounted without flock: ENOLCK, EOPNOTSUPP, EINVAL) a lock file created with O_EXCL,
    which those filesystems create atomically; one older than STALE_LOCK_S is taken as a killed writer's."""
    path = Path(path)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        else:
            yield
            return
    claim = path.with_name(path.name + ".held")
    while True:
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            try:
                if time.time() - claim.stat().st_mtime > STALE_LOCK_S:
                    claim.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(poll_s)
    try:
        yield
    finally:
        claim.unlink(missing_ok=True)
