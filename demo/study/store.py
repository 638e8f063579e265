"""The study's run store: one JSON file per finished run, reused only when its fingerprint matches.

A run is ``(task, point, learning rate, seed index)``; its file is
``OUT/runs/TASK/POINT__lrLR__sSEED.json`` and holds the run record plus a fingerprint (a hash of
everything the run depends on: the task settings, the data cuts' seed, the torch version, the
thread count, the buffer generator, the config, the learning rate and the seed).  A rerun with the
same ``--out`` loads the files whose fingerprint matches and runs only the rest; an interrupted
study loses at most the run in progress.  Writes are atomic (a temporary file, then a rename), so
two processes can fill one folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["Store", "fingerprint", "run_key"]


def fingerprint(payload: dict[str, Any]) -> str:
    """A 16-hex-digit SHA-256 of ``payload`` as sorted JSON (non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(point: str, lr: float, seed: int) -> str:
    """The file stem of one run: ``POINT__lrLR__sSEED``."""
    return f"{point}__lr{lr:g}__s{seed}"


class Store:
    """Finished runs under ``OUT/runs/TASK/``."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def path(self, task: str, key: str) -> Path:
        return self.out / "runs" / task / f"{key}.json"

    def get(self, task: str, key: str, fp: str) -> dict[str, Any] | None:
        """The stored record of ``key`` when its fingerprint is ``fp``, else ``None``."""
        path = self.path(task, key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("fingerprint") == fp else None

    def put(self, task: str, key: str, record: dict[str, Any]) -> None:
        """Store ``record`` (atomically)."""
        path = self.path(task, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(record)}")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
