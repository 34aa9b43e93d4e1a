"""Checkpoints carry a checksum manifest; damage is refused by name, with the newest
intact checkpoint to resume from."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import checkpoint
from jaxcl.checkpoint import MANIFEST, CheckpointError, Checkpointer, CheckpointWarning

FINGERPRINT = {"optimizer": {"lr": 0.1}}


def state(seed):
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)},
            "opt_state": {"mu": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32), "count": jnp.int32(seed)}}


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.fixture
def saved(tmp_path):
    """A Checkpointer holding checkpoints 0 and 1 of ``state(0)`` and ``state(1)``."""
    ck = Checkpointer(tmp_path / "checkpoints", keep=3)
    for i in (0, 1):
        ck.save(i, state(i), {"config": FINGERPRINT, "position": {"task": i}})
    yield ck
    ck.close()


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def overwrite_in_place(path, n):
    """``n`` bytes in the middle of ``path`` inverted; the size stays the same."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        block = f.read(n)
        f.seek(size // 2 - n // 2)
        f.write(bytes(255 - b for b in block))
    assert path.stat().st_size == size


def assert_our_words(message):
    for library_text in ("pybind", "TensorStore", "tensorstore", "<", "Traceback"):
        assert library_text not in message, message


def test_each_save_writes_a_manifest_of_every_file(saved):
    folder = saved.directory / "1"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(files) == on_disk and any(name.startswith("state/") for name in files)
    assert all(len(f["sha256"]) == 64 and f["size"] == (folder / name).stat().st_size for name, f in files.items())
    assert saved.verify(1) == [] and saved.intact() == [0, 1] and saved.newest_intact() == 1
    assert saved.manager.all_steps() == [0, 1]  # orbax lists (and restores) folders holding the manifest
    s, meta = saved.restore(abstract(state(1)), FINGERPRINT)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s, state(1))
    assert meta["position"] == {"task": 1}


def test_bytes_overwritten_in_place_are_refused_naming_the_file_and_the_intact_one(saved):
    data_file = largest_file(saved.directory / "1" / "state")
    overwrite_in_place(data_file, 5000)
    name = data_file.relative_to(saved.directory / "1").as_posix()
    assert saved.verify(1) == [f"{name} (changed)"]
    assert saved.intact() == [0] and saved.newest_intact() == 0
    for attempt in (lambda: saved.restore(abstract(state(1)), FINGERPRINT), saved.read_meta):
        with pytest.raises(CheckpointError) as e:
            attempt()
        message = str(e.value)
        assert message == (f"checkpoint {saved.directory / '1'} is damaged or unreadable: its files differ from its "
                           f"checksum manifest: {name} (changed); the newest intact one is {saved.directory / '0'}: "
                           "resume from it with --resume-from 0")
        assert_our_words(message)
    s, meta = saved.restore(abstract(state(0)), FINGERPRINT, index=0)  # the intact one still restores
    jax.tree_util.tree_map(np.testing.assert_array_equal, s, state(0))


def test_resume_from_the_newest_intact_sets_the_damaged_one_aside(saved):
    os.remove(largest_file(saved.directory / "1" / "state"))
    with pytest.raises(CheckpointError, match=r"\(missing\); the newest intact one is .*--resume-from 0"):
        saved.restore(abstract(state(1)), FINGERPRINT)
    s, meta = saved.restore(abstract(state(0)), FINGERPRINT, index=0)
    assert meta["position"] == {"task": 0}
    moved = saved.set_aside_newer(0)
    assert moved == [saved.directory.with_name("checkpoints.set-aside") / "1"] and moved[0].is_dir()
    assert saved.latest() == 0
    saved.save(1, state(2), {"config": FINGERPRINT, "position": {"task": 2}})  # numbering continues where it was
    assert saved.intact() == [0, 1] and saved.read_meta()["position"] == {"task": 2}
    with pytest.raises(CheckpointError, match=r"no checkpoint 7 in .*checkpoints; it holds 0, 1"):
        saved.read_meta(7)


def test_every_checkpoint_damaged_says_so(saved):
    for i in (0, 1):
        overwrite_in_place(largest_file(saved.directory / str(i) / "state"), 100)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint remains in .*: start in a new --workdir"):
        saved.restore(abstract(state(1)), FINGERPRINT)
    assert saved.newest_intact() is None


def test_extra_files_and_a_damaged_manifest_are_problems(saved):
    (saved.directory / "1" / "state" / "stray").write_bytes(b"x")
    assert saved.verify(1) == ["state/stray (not in the manifest)"]
    (saved.directory / "0" / MANIFEST).write_text("{not json")
    assert saved.verify(0) == [f"{MANIFEST} (unreadable)"]


def test_a_checkpoint_without_a_manifest_is_restored_unverified_with_a_warning(saved):
    """A jaxcl older than the manifests wrote none; such runs still resume, and say so."""
    (saved.directory / "1" / MANIFEST).unlink()
    assert saved.verify(1) == [] and saved.intact() == [0, 1]
    with pytest.warns(CheckpointWarning, match=r"checkpoint .*1 has no checksum manifest .* restoring it unverified"):
        s, _ = saved.restore(abstract(state(1)), FINGERPRINT)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s, state(1))


# Orbax's tensorstore reader leaves an asyncio callback behind when a read fails (see test_train).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::jaxcl.checkpoint.CheckpointWarning")
def test_damage_found_by_orbax_alone_is_reported_in_our_words(saved):
    (saved.directory / "1" / MANIFEST).unlink()
    for f in (saved.directory / "1" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage" * 16)
    with pytest.raises(CheckpointError) as e:
        saved.restore(abstract(state(1)), FINGERPRINT)
    message = str(e.value)
    assert message.startswith(f"checkpoint {saved.directory / '1'} is damaged or unreadable: ")
    assert message.endswith("resume from it with --resume-from 0")
    assert_our_words(message)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_state(saved.directory / "1")
    assert_our_words(str(e.value))


def test_only_process_zero_writes_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_primary", lambda: False)  # as on process 1 of several
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(0, state(0), {"config": FINGERPRINT})
    ck.close()
    assert not (tmp_path / "0" / MANIFEST).exists()
