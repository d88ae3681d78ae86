"""Atomic file output: write to a temp file beside the target, then rename it over the target.

A killed process never leaves a half-written file that a later run would trust, and concurrent
writers (DDP ranks) never share a temp file.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


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
