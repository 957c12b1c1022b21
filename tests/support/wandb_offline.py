"""Read back what an offline W&B run logged, straight from its ``run-*.wandb`` file.

The file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks
of records: crc32, length, type, payload) whose payloads are serialized
``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def run_file(wandb_dir: Path) -> Path:
    files = sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {wandb_dir}"
    return files[-1]


def history(path: Path) -> list[dict[str, object]]:
    """One dict per logged step: {key: value}."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def config(path: Path) -> dict[str, object]:
    """The run config (last value of each key)."""
    out: dict[str, object] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        updates = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        for i in updates:
            out[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
