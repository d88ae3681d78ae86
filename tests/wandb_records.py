"""Reads an offline W&B run back from its .wandb file, with wandb's own protobuf definitions: the file is a
LevelDB-style record log (7-byte ':W&B' header, 32 KiB blocks, each record chunk behind a 7-byte header of
CRC, length and type) of wandb_internal_pb2.Record messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb record log"
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = BLOCK - position % BLOCK
        if room < 7:  # the block's tail is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(folder: Path) -> dict:
    """{"run": (job_type, group, name, id), "config": {...}, "history": [{...}], "summary": {...}} of an offline
    run folder."""
    (path,) = Path(folder).glob("run-*.wandb")
    out = {"history": [], "summary": {}, "config": {}, "run": None}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = (run.job_type, run.run_group, run.display_name, run.run_id)
            for item in run.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
    return out
