"""Run logs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

A run's logs are exact across a kill and ``--resume``: every checkpoint records how long
each run's ``metrics.jsonl`` was when it was written (:meth:`Writer.offset`), and a
resumed run cuts the file back to that length and rebuilds the TensorBoard scalars from
what is kept (:meth:`Writer.start`), so rows logged after the checkpoint are not
repeated. (A fresh run finds neither: :func:`jaxcl.train.run` clears an earlier run's.)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


class Writer:
    def __init__(self, workdir: str | Path, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        self._jsonl = open(self.path, "a", buffering=1)
        self._tensorboard = tensorboard
        self._tb = self._open_tb() if tensorboard else None

    def _open_tb(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.workdir / "tensorboard"))

    def offset(self) -> int:
        """The length of ``metrics.jsonl`` so far, in bytes (a checkpoint records it)."""
        self._jsonl.flush()
        return self.path.stat().st_size

    def start(self, offset: int | None) -> None:
        """Continue the logs from ``offset`` (what a checkpoint recorded): ``metrics.jsonl``
        is cut back to it and the TensorBoard scalars are rebuilt from the rows kept.
        ``None`` (a fresh run, or a checkpoint from before offsets were recorded): append."""
        if offset is None:
            return
        self._jsonl.flush()
        size = self.path.stat().st_size
        if offset >= size:
            return  # nothing was logged after the checkpoint
        self._jsonl.truncate(min(offset, size))
        if self._tb is not None:
            self._tb.close()
            shutil.rmtree(self.workdir / "tensorboard", ignore_errors=True)
            self._tb = self._open_tb()
            with open(self.path) as f:
                for line in f:
                    rec = json.loads(line)
                    self._scalars(rec["kind"], rec["step"],
                                  {k: v for k, v in rec.items() if k not in ("kind", "step", "time")})

    def write(self, kind: str, step: int, **values) -> None:
        """One line ``{"kind", "step", "time", **values}``; numbers also go to TensorBoard
        as ``kind/name``."""
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(rec, default=float) + "\n")
        self._scalars(kind, step, values)

    def _scalars(self, kind: str, step: int, values: dict) -> None:
        if self._tb is None:
            return
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

    def offset(self) -> int:
        return 0

    def start(self, offset: int | None) -> None:
        pass

    def write(self, kind: str, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass
