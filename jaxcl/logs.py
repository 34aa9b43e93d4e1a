"""Run logs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files."""
from __future__ import annotations

import json
import time
from pathlib import Path


class Writer:
    def __init__(self, workdir: str | Path, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, kind: str, step: int, **values) -> None:
        """One line ``{"kind", "step", "time", **values}``; numbers also go to TensorBoard
        as ``kind/name``."""
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(rec, default=float) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))
                elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{kind}/{k}_{i}", x, int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """What the processes other than process 0 log: nothing (one writer per run)."""

    def write(self, kind: str, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass
