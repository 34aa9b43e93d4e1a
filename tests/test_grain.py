"""data.pipeline=grain: the same batches as the memory path, real ArrayRecord files on
disk, an exact mid-epoch resume, auto's choice, shards, and bad input refused by name."""
import os
import signal
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxcl
from jaxcl import data
from jaxcl.data import feed as feed_lib
from jaxcl.data import pipeline
from jaxcl.data.pipeline import GrainFeed

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz")


def quiet(_):
    pass


def _same_items(a: dict, b: dict) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("stream", ["split", "permuted"])
def test_grain_batches_equal_the_memory_batches(make_config, stream):
    sets = {} if stream == "split" else dict(data__stream="permuted", scenario="domain", num_tasks=2)
    mem = data.build(make_config(data__pipeline="memory", **sets))
    lazy = data.build(make_config(data__pipeline="grain", **sets))
    assert lazy.pipeline == "grain" and mem.pipeline == "memory"
    fm = feed_lib.Feed([mem], [0], normalize=True, resident=False)
    fg = GrainFeed([lazy], [0], normalize=True, grain_workers=0)
    for t in range(len(mem)):
        n = fm.size(0, "train", t)
        order = data.epoch_order(n, 0, t, 0, 0)
        for s in (0, 3, n // 16 - 2):  # also a start in the middle of the epoch, as after a resume
            _same_items(fm.train_items(t, [order], range(s, s + 4), 16, 5),
                        fg.train_items(t, [order], range(s, s + 4), 16, 5))
        for a, b in zip(fm.pass_items("test", t, 100), fg.pass_items("test", t, 100)):
            _same_items(a, b)


def test_two_seeds_share_a_lazy_stream(make_config):
    lazy = data.build(make_config(data__pipeline="grain"))
    mem = data.build(make_config())
    fm = feed_lib.Feed([mem], [0, 0], normalize=True, resident=False)
    fg = GrainFeed([lazy], [0, 0], normalize=True, grain_workers=0)
    n = fm.size(0, "train", range(2))
    orders = [data.epoch_order(n, s, 1, 0, 0) for s in (0, 1)]
    _same_items(fm.train_items(range(2), orders, range(0, 3), 8, 4), fg.train_items(range(2), orders, range(0, 3), 8, 4))


def test_each_process_reads_its_rows_of_a_batch(make_config):
    lazy = data.build(make_config(data__pipeline="grain"))
    whole = GrainFeed([lazy], [0], normalize=True, grain_workers=0)
    halves = []
    for i in range(2):
        f = GrainFeed([lazy], [0], normalize=True, grain_workers=0)
        f.shard = (i, 2)
        halves.append(f)
    order = data.epoch_order(whole.size(0, "train", 0), 0, 0, 0, 0)
    full = whole.train_items(0, [order], range(2), 16, 2)["item"]
    parts = [h.train_items(0, [order], range(2), 16, 2)["item"] for h in halves]
    for k in full:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=1), full[k])


def test_auto_picks_by_the_budget_and_says_so(make_config):
    small = data.build(make_config(data__pipeline="auto"))
    big = data.build(make_config(data__pipeline="auto", data__memory_budget_mb=0.01))
    assert small.pipeline == "memory" and "within the budget" in small.pipeline_why
    assert big.pipeline == "grain" and "over the budget of 0.0 MiB (data.memory_budget_mb=0.01)" in big.pipeline_why
    feed = pipeline.make(make_config(data__pipeline="auto", data__memory_budget_mb=0.01), [big], [0])
    assert feed.path == "grain" and feed.pipeline_why == big.pipeline_why


def test_image_size_resizes_in_both_pipelines_alike(make_config):
    mem = data.build(make_config(data__image_size=12))
    lazy = data.build(make_config(data__pipeline="grain", data__image_size=12))
    assert mem.info.input_shape == lazy.info.input_shape == (12, 12, 1)
    np.testing.assert_array_equal(mem.tasks[1].x_test, np.asarray(lazy.tasks[1].x_test))


# ----------------------------------------------------------------------------- on disk


class GrainDigits(tfds.core.GeneratorBasedBuilder):
    """The embedded digits (or a subset of shared MNIST) as a TFDS dataset of real
    ArrayRecord files (a Tensor feature: writing it needs no TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        x = _images()[0]
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=x.shape[1:], dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        x, y = _images()[:2] if split == "train" else _images()[2:]
        for i in range(len(x)):
            yield i, {"image": x[i], "label": int(y[i])}


def _images():
    if os.path.exists(SHARED_MNIST):  # 1,000 / 300 real MNIST digits
        with np.load(SHARED_MNIST) as f:
            return f["x_train"][:1000, ..., None], f["y_train"][:1000], f["x_test"][:300, ..., None], f["y_test"][:300]
    d = data.load_digits()
    return d.x_train, d.y_train, d.x_test, d.y_test


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    GrainDigits(data_dir=str(root), file_format="array_record").download_and_prepare()
    files = list(root.rglob("*.array_record*"))
    assert len(files) == 2
    return str(root)


def test_train_from_array_record_files_and_resume_mid_epoch(make_config, on_disk, tmp_path, crash_at_save):
    c = make_config("split_digits:method=finetune", data__name="grain_digits", data__source="tfds",
                    data__tfds_dir=on_disk, data__pipeline="grain", data__grain_workers=0, num_tasks=2,
                    checkpoint__every_steps=7, loop__steps_per_call=3, batch_size=32)
    full = jaxcl.run(c, tmp_path / "full", echo=quiet)
    assert full["data_path"] == "grain"
    assert np.asarray(full["accuracy_matrix"])[1, 1] > 0.8  # it learns from the files
    def mid_epoch(call, meta):  # the checkpoint to resume from: in the middle of an epoch
        if call == 1:
            assert meta["position"]["batch"] > 0

    crash_at_save(lambda: jaxcl.run(c, tmp_path / "cut", echo=quiet), 2, mid_epoch)
    resumed = jaxcl.run(c, tmp_path / "cut", resume=True, echo=quiet)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    memory = jaxcl.run(jaxcl.config.override(c, ["data.pipeline=memory"]), tmp_path / "memory", echo=quiet)
    assert memory["accuracy_matrix"] == full["accuracy_matrix"]


def test_a_dead_worker_is_an_error_not_a_hang(make_config, on_disk):
    import multiprocessing

    lazy = data.build(make_config(data__name="grain_digits", data__source="tfds", data__tfds_dir=on_disk,
                                  data__pipeline="grain"))
    feed = GrainFeed([lazy], [0], normalize=True, grain_workers=1, prefetch=1)
    before = set(p.pid for p in multiprocessing.active_children())
    it = feed.batches(feed._elements_of(0, "train", 0), np.arange(feed.size(0, "train", 0)), 2, "task 0")
    next(it)
    workers = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    t = time.time()
    with pytest.raises(data.DataError, match="grain worker process died"):
        for _ in it:
            pass
    assert time.time() - t < 60


def test_a_dataset_not_prepared_is_named(make_config, tmp_path):
    c = make_config(data__name="grain_digits", data__source="tfds", data__tfds_dir=str(tmp_path),
                    data__pipeline="grain")
    with pytest.raises(data.DataError, match=r"grain_digits.*prepare it or set data.download=True"):
        data.build(c)


def test_varying_image_sizes_need_image_size(make_config):
    with tfds.testing.mock_data(num_examples=20):
        c = make_config(data__name="oxford_flowers102", data__source="tfds", data__pipeline="grain",
                        data__classes_per_task=2, num_tasks=1)
        with pytest.raises(data.DataError, match="vary in size.*data.image_size"):
            data.build(c)
