"""Orbax checkpoints of the whole continual-learning state.

One checkpoint holds the :class:`~jaxcl.methods.base.State` (parameters and every extra
collection, model state such as batch-norm statistics, optimizer state, trainable masks,
the method's arrays: anchors, importances, replay memory, owner indices, and the RNG)
plus a JSON ``meta`` item: the config that produced it, the stream position to continue
from, and the results so far (accuracy matrix, timings). Checkpoints are numbered by save
(0, 1, 2, ...); the newest ``keep`` are kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: damaged, or written by another config."""


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_diff(saved: dict, current: dict) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return [f"{k}: {a.get(k, '<absent>')!r} in the checkpoint, {b.get(k, '<absent>')!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, index: int, state, meta: dict) -> None:
        self.manager.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def read_meta(self, index: int | None = None) -> dict:
        index = self.latest() if index is None else index
        try:
            return self.manager.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(self._damaged(index, e)) from None

    def restore(self, abstract_state, fingerprint: dict, index: int | None = None):
        """(state, meta) of checkpoint ``index`` (default: newest), refused when it was
        written by a config whose results-relevant keys differ from ``fingerprint``."""
        index = self.latest() if index is None else index
        if index is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        meta = self.read_meta(index)
        diff = config_diff(meta.get("config", {}), fingerprint)
        if diff:
            raise CheckpointError(
                f"checkpoint {self.directory / str(index)} was written by a different config:\n  "
                + "\n  ".join(diff[:20])
                + "\nresume with the same config, or start in a new --workdir"
            )
        try:
            restored = self.manager.restore(
                index, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:
            raise CheckpointError(self._damaged(index, e)) from None
        state = restored.state
        bad = [jax.tree_util.keystr(p) for p, (a, b) in _zip_with_path(abstract_state, state)
               if a.shape != b.shape or a.dtype != b.dtype]
        if bad:
            raise CheckpointError(self._damaged(index, ValueError(f"arrays of the wrong shape: {bad[:5]}")))
        return state, meta

    def _damaged(self, index, e: Exception) -> str:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return (f"checkpoint {self.directory / str(index)} is damaged or unreadable "
                f"({type(e).__name__}: {msg}); delete it to resume from an earlier one, "
                "or start in a new --workdir")

    def close(self) -> None:
        self.manager.close()


def _zip_with_path(a, b):
    pa, _ = jax.tree_util.tree_flatten_with_path(a)
    lb = jax.tree_util.tree_leaves(b)
    return [(p, (x, y)) for (p, x), y in zip(pa, lb)]


# ----------------------------------------------------------------------------- parameter surgery


def load_state(path: str | Path) -> dict:
    """The newest saved State of a jaxcl run as nested dicts of numpy arrays. ``path``
    is a run's workdir, its ``checkpoints/`` folder, or one numbered checkpoint."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            ck = Checkpointer(candidate)
            try:
                return _restore_raw(ck.directory / str(ck.latest()) / "state", ck.latest())
            finally:
                ck.close()
    if (path / "state").is_dir():
        return _restore_raw(path / "state", path.name)
    raise CheckpointError(f"{path}: no jaxcl checkpoint found (expected a run's workdir or checkpoints folder)")


def _restore_raw(state_dir: Path, index) -> dict:
    try:
        return ocp.StandardCheckpointer().restore(state_dir.absolute())
    except Exception as e:
        raise CheckpointError(f"checkpoint {state_dir.parent} is damaged or unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def graft(dst, src, skip: tuple = ("head",), _path: str = ""):
    """``dst`` with every leaf that ``src`` has at the same path (and shape) copied
    from ``src``; subtrees named in ``skip`` are kept. A plain batch norm in ``src``
    (``bn/{scale,bias,mean,var}``) fills every task's row of a TaskNorm in ``dst``.
    Returns (tree, number of arrays copied); a shape mismatch is an error."""
    if not isinstance(dst, dict) or not isinstance(src, dict):
        raise CheckpointError(f"{_path or 'tree'}: cannot graft a {type(src).__name__} onto a {type(dst).__name__}")
    out, copied = dict(dst), 0
    if "bn" in src and any(k.startswith("task_") for k in dst):
        names = {"task_scale": "scale", "task_bias": "bias", "task_mean": "mean", "task_var": "var"}
        for k, v in dst.items():
            if names.get(k) in src["bn"]:
                row = src["bn"][names[k]]
                if tuple(row.shape) != tuple(v.shape[1:]):
                    raise CheckpointError(f"{_path}/{k}: pretrained {tuple(row.shape)} vs {tuple(v.shape[1:])} per task")
                out[k] = jax.numpy.broadcast_to(jax.numpy.asarray(row, v.dtype), v.shape)
                copied += 1
        return out, copied
    for k, v in dst.items():
        if k in skip or k not in src:
            continue
        if isinstance(v, dict):
            out[k], n = graft(v, src[k], skip, f"{_path}/{k}")
            copied += n
        else:
            if tuple(src[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{_path}/{k}: the pretrained array has shape {tuple(src[k].shape)}, "
                                      f"this model needs {tuple(v.shape)}")
            out[k] = jax.numpy.asarray(src[k], v.dtype)
            copied += 1
    return out, copied
