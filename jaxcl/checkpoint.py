"""Orbax checkpoints of the whole continual-learning state.

One checkpoint holds the :class:`~jaxcl.methods.base.State` (parameters and every extra
collection, model state such as batch-norm statistics, optimizer state, trainable masks,
the method's arrays: anchors, importances, replay memory, owner indices, and the RNG)
plus a JSON ``meta`` item: the config that produced it, the stream position to continue
from, and the results so far (accuracy matrix, timings). Checkpoints are numbered by save
(0, 1, 2, ...); the newest ``keep`` are kept.

Each checkpoint folder ``<dir>/<index>/`` also holds ``manifest.sha256.json``: the
SHA-256 and size of every other file in it, written (by process 0, atomically) once the
save is complete. Restoring checks it, and a damaged checkpoint is refused by name with
the newest intact one to resume from instead. A checkpoint without a manifest (written
by a jaxcl older than the manifests, or cut off between the save and its manifest) is
restored unverified, with a :class:`CheckpointWarning` that says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.sha256.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: damaged, or written by another config."""


class CheckpointWarning(UserWarning):
    """A checkpoint is used without its checksums (it has no manifest)."""


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


# ----------------------------------------------------------------------------- checksums


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its relative path, the manifest (and its temporary) aside."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _primary() -> bool:
    """Whether this process writes manifests (one process does, for all of them)."""
    return jax.process_index() == 0


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 and size of every file in ``folder`` in its manifest."""
    files = {rel: {"sha256": _sha256(p), "size": p.stat().st_size} for rel, p in _files(folder).items()}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def verify_folder(folder: Path) -> list[str] | None:
    """What differs in ``folder`` from its manifest (``[]``: intact), or None when it has
    no manifest. Reads only."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {rel: (int(f["size"]), str(f["sha256"])) for rel, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} (unreadable)"]
    found, problems = _files(folder), []
    for rel, (size, digest) in expected.items():
        p = found.pop(rel, None)
        if p is None:
            problems.append(f"{rel} (missing)")
        elif p.stat().st_size != size or _sha256(p) != digest:
            problems.append(f"{rel} (changed)")
    return problems + [f"{rel} (not in the manifest)" for rel in found]


# ----------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                                 enable_async_checkpointing=False),
        )
        self._unverified_warned: set = set()  # one warning per checkpoint, however often it is read

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, index: int, state, meta: dict) -> None:
        self.manager.save(index, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        if _primary():
            write_manifest(self.directory / str(index))

    def verify(self, index: int) -> list[str]:
        """The damaged files of checkpoint ``index`` (``[]``: intact, or no manifest to check)."""
        return verify_folder(self.directory / str(index)) or []

    def intact(self) -> list[int]:
        """The checkpoints whose files match their manifest (or that have none), oldest first."""
        return [i for i in self.manager.all_steps() if not self.verify(i)]

    def newest_intact(self, skip: tuple = ()) -> int | None:
        return next((i for i in sorted(self.manager.all_steps(), reverse=True)
                     if i not in skip and not self.verify(i)), None)

    def set_aside_newer(self, index: int) -> list[Path]:
        """Move the checkpoints newer than ``index`` (a resume from an older one would
        number its saves like them) to ``<dir>.set-aside/``; returns where they went."""
        moved = []
        for i in [i for i in self.manager.all_steps() if i > index]:
            dest = self.directory.with_name(self.directory.name + ".set-aside") / str(i)
            n = 1
            while dest.exists():
                dest, n = dest.with_name(f"{i}.{n}"), n + 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(i)), dest)
            moved.append(dest)
        if moved:
            self.manager.reload()
        return moved

    def check(self, index: int | None) -> int:
        """``index`` (default: newest) once its files match its manifest; else a
        CheckpointError naming the damaged files and the newest intact checkpoint."""
        index = self.latest() if index is None else index
        steps = self.manager.all_steps()
        if index is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if index not in steps:
            held = f"; it holds {', '.join(map(str, steps))}" if steps else ""
            raise CheckpointError(f"no checkpoint {index} in {self.directory}{held}")
        problems = verify_folder(self.directory / str(index))
        if problems:
            shown = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise CheckpointError(f"checkpoint {self.directory / str(index)} is damaged or unreadable: its files "
                                  f"differ from its checksum manifest: {shown}{self._advice(index)}")
        if problems is None and index not in self._unverified_warned:
            self._unverified_warned.add(index)
            warnings.warn(f"checkpoint {self.directory / str(index)} has no checksum manifest (written by an older "
                          "jaxcl, or cut off before it); restoring it unverified", CheckpointWarning, stacklevel=3)
        return index

    def read_meta(self, index: int | None = None) -> dict:
        return self._meta(self.check(index))

    def _meta(self, index: int) -> dict:
        try:
            return self.manager.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(self._damaged(index, e)) from None

    def restore(self, abstract_state, fingerprint: dict, index: int | None = None):
        """(state, meta) of checkpoint ``index`` (default: newest), refused when its files
        differ from its manifest, or when it was written by a config whose
        results-relevant keys differ from ``fingerprint``."""
        index = self.check(index)
        meta = self._meta(index)
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
            raise CheckpointError(f"checkpoint {self.directory / str(index)} is damaged or unreadable: arrays of "
                                  f"the wrong shape or dtype: {', '.join(bad[:5])}{self._advice(index)}")
        return state, meta

    def _damaged(self, index, e: Exception) -> str:
        """Our words for a read that failed inside orbax: the checkpoint's files the
        error names, never the library's text."""
        return (f"checkpoint {self.directory / str(index)} is damaged or unreadable: "
                f"{_failed_read(self.directory / str(index), e)}{self._advice(index)}")

    def _advice(self, index) -> str:
        ok = self.newest_intact(skip=(index,))
        if ok is None:
            return f"; no intact checkpoint remains in {self.directory}: start in a new --workdir"
        return f"; the newest intact one is {self.directory / str(ok)}: resume from it with --resume-from {ok}"

    def close(self) -> None:
        self.manager.close()


def _failed_read(folder: Path, e: Exception) -> str:
    """``reading a/b failed``, naming the files under ``folder`` that the text of ``e``
    mentions, never the text itself (a library's repr)."""
    names = sorted({n.rstrip("./") for n in re.findall(re.escape(folder.as_posix()) + r"/([\w./-]+)", str(e))})
    return f"reading {', '.join(names[:3])} failed" if names else "it could not be read"


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
    problems = verify_folder(state_dir.parent)
    if problems:
        raise CheckpointError(f"checkpoint {state_dir.parent} is damaged: its files differ from its checksum "
                              f"manifest: {', '.join(problems[:3])}")
    try:
        return ocp.StandardCheckpointer().restore(state_dir.absolute())
    except Exception as e:
        raise CheckpointError(f"checkpoint {state_dir.parent} is damaged or unreadable: "
                              f"{_failed_read(state_dir.parent, e)}") from None


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
