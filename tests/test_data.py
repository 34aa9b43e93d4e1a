import jax

import jaxcl
import numpy as np
import pytest

from jaxcl import data
from jaxcl.data import DataError


def fake(name="fake", n=60, k=6, shape=(6, 6, 1), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    y = np.arange(n) % k
    return data.checked(name, x, y, x[: n // 2].copy(), y[: n // 2].copy(), num_classes=k)


def test_digits_is_the_real_sklearn_dataset_with_a_fixed_split():
    d = data.load("digits")
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.uint8 and d.x_train.max() == 255 and d.num_classes == 10
    assert np.bincount(d.y_test).min() >= 35  # stratified
    d2 = data.load("digits")
    np.testing.assert_array_equal(d.x_train, d2.x_train)


def test_split_partitions_classes_and_relabels_locally():
    ds = fake()
    s = data.split(ds, 3, 2, scenario="task")
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5)]
    for t in s.tasks:
        assert set(np.unique(t.y_train)) == {0, 1}
    assert s.info.num_heads == 3 and s.info.num_outputs == 2
    c = data.split(ds, 3, 2, scenario="class")
    assert c.info.num_heads == 1 and c.info.num_outputs == 6
    np.testing.assert_array_equal(c.targets(2, np.array([0, 1])), [4, 5])
    d = data.split(ds, 3, 2, scenario="domain")
    assert d.info.num_heads == 1 and d.info.num_outputs == 2
    np.testing.assert_array_equal(d.targets(2, np.array([0, 1])), [0, 1])
    # the samples of task 1 are exactly the dataset's samples of classes 2 and 3
    sel = np.isin(ds.y_train, [2, 3])
    np.testing.assert_array_equal(s.tasks[1].x_train, ds.x_train[sel])


def test_split_class_order_and_seeded_shuffle():
    ds = fake()
    s = data.split(ds, 2, 3, class_order=(5, 0, 3, 1, 2, 4))
    assert s.tasks[0].classes == (5, 0, 3)
    a = data.split(ds, 3, 2, shuffle_classes=True, seed=1)
    b = data.split(ds, 3, 2, shuffle_classes=True, seed=1)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    assert sorted(sum((t.classes for t in a.tasks), ())) == list(range(6))
    assert any([t.classes for t in data.split(ds, 3, 2, shuffle_classes=True, seed=k).tasks]
               != [t.classes for t in a.tasks] for k in range(2, 6))
    with pytest.raises(DataError, match="needs 8 classes, the dataset has 6"):
        data.split(ds, 4, 2)
    with pytest.raises(DataError, match="class_order"):
        data.split(ds, 2, 2, class_order=(0, 0, 1, 2))


def test_permuted_applies_one_fixed_permutation_per_task():
    ds = fake(k=3)
    s = data.permuted(ds, 3, seed=0)
    x0 = ds.x_train.reshape(len(ds.x_train), -1)
    for t in s.tasks:
        xt = t.x_train.reshape(len(t.x_train), -1)
        # same multiset of pixels per image, and one permutation shared by all images
        np.testing.assert_array_equal(np.sort(xt, 1), np.sort(x0, 1))
        np.testing.assert_array_equal(t.y_train, ds.y_train)
    assert not np.array_equal(s.tasks[0].x_train, s.tasks[1].x_train)
    s2 = data.permuted(ds, 3, seed=0)
    np.testing.assert_array_equal(s.tasks[2].x_test, s2.tasks[2].x_test)
    assert s.scenario == "domain" and s.info.num_heads == 1


def test_rotated_by_zero_is_identity_and_by_ninety_is_rot90():
    ds = fake(k=3)
    s = data.rotated(ds, 2, angles=(0.0, 90.0))
    np.testing.assert_array_equal(s.tasks[0].x_train, ds.x_train)
    np.testing.assert_array_equal(s.tasks[1].x_train, np.rot90(ds.x_train, 1, axes=(1, 2)))
    with pytest.raises(DataError, match="2 angles given for 3 tasks"):
        data.rotated(ds, 3, angles=(0.0, 90.0))


def test_multi_brings_datasets_to_one_shape():
    a = fake("grey", shape=(4, 4, 1), k=2)
    b = fake("rgb", shape=(6, 6, 3), k=3)
    s = data.multi([a, b], scenario="class")
    assert s.info.input_shape == (6, 6, 3) and s.info.num_outputs == 5
    x = s.tasks[0].x_train
    assert x.shape[1:] == (6, 6, 3)
    np.testing.assert_array_equal(x[:, 1:5, 1:5, 0], a.x_train[..., 0])  # centred
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # repeated channels
    assert (x[:, 0] == 0).all()


def test_multi_brings_datasets_to_a_given_shape():
    a = fake("grey", shape=(4, 4, 1), k=2)
    s = data.multi([a], shape=(8, 8, 3))
    assert s.info.input_shape == (8, 8, 3) and s.tasks[0].x_train.shape[1:] == (8, 8, 3)
    with pytest.raises(DataError, match="data.image_shape"):
        data.multi([a], shape=(8, 8))


def test_limits_keep_a_seeded_subset():
    s = data.split(fake(n=120), 3, 2, limits=(10, 5), seed=3)
    assert all(len(t.x_train) == 10 and len(t.x_test) == 5 for t in s.tasks)


def test_npz_source_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCL_CACHE_DIR", str(tmp_path / "cache"))
    x = np.zeros((20, 5, 5), np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "toy.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    monkeypatch.setenv("JAXCL_DATA_DIR", str(tmp_path))
    d = data.load("toy")
    assert d.x_train.shape == (20, 5, 5, 1) and d.num_classes == 4
    d2 = data.load("toy")  # second read comes from the .npy cache
    np.testing.assert_array_equal(d.y_train, d2.y_train)

    np.savez(tmp_path / "short.npz", x_train=x, y_train=y[:19], x_test=x, y_test=y)
    with pytest.raises(DataError, match="x_train has 20 samples but y_train has 19"):
        data.load("short")
    np.savez(tmp_path / "floats.npz", x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match="dtype float32; expected uint8"):
        data.load("floats")
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=y)
    with pytest.raises(DataError, match="missing array"):
        data.load("partial")
    np.savez(tmp_path / "shapes.npz", x_train=x, y_train=y, x_test=np.zeros((8, 6, 6), np.uint8), y_test=y[:8])
    with pytest.raises(DataError, match="train images are .* but test images are"):
        data.load("shapes")
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot be read as .npz"):
        data.load("broken", source="npz")
    with pytest.raises(DataError, match="does not exist"):
        data.load("absent", source="npz")


def test_labels_out_of_range_are_refused():
    x = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(DataError, match=r"bad: y_train holds label -1 \(at index 3.*not one of the 3 declared classes"):
        data.checked("bad", x, np.array([0, 1, 2, -1]), x, np.array([0, 1, 2, 0]), num_classes=3)
    with pytest.raises(DataError, match=r"bad: y_test holds label 3 \(at index 1.*not one of the 3 declared classes"):
        data.checked("bad", x, np.array([0, 1, 2, 0]), x, np.array([0, 3, 2, 0]), num_classes=3)


def write_npz(directory, name, y_train, y_test):
    """``<directory>/<name>.npz`` of random 8x8 images with these labels."""
    rng = np.random.default_rng(0)
    x = {s: rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8) for s, y in (("train", y_train), ("test", y_test))}
    np.savez(directory / f"{name}.npz", x_train=x["train"], y_train=np.asarray(y_train, np.uint8),
             x_test=x["test"], y_test=np.asarray(y_test, np.uint8))


@pytest.fixture
def npz_config(make_config, tmp_path, monkeypatch):
    """``npz_config(name, **sets)``: a split run on ``tmp_path/<name>.npz``; sets the
    config keys ``data.num_classes`` / ``data.allow_missing_classes`` when given."""
    import ml_collections

    monkeypatch.setenv("JAXCL_CACHE_DIR", str(tmp_path / "cache"))

    def make(name, num_classes=None, allow_missing_classes=None, **sets):
        c = ml_collections.ConfigDict(make_config(data__source="npz", data__dir=str(tmp_path), data__name=name,
                                                  **sets).to_dict())
        for key, value in (("num_classes", num_classes), ("allow_missing_classes", allow_missing_classes)):
            if value is not None:
                c.data[key] = value
        return c

    return make


def test_a_label_outside_the_classes_is_refused_naming_dataset_split_and_label(npz_config, tmp_path):
    y_train, y_test = np.arange(100) % 10, np.arange(50) % 10
    y_train[7] = 12  # one label of 12 among 10 classes
    write_npz(tmp_path, "mnist", y_train, y_test)  # a known name: its 10 classes are declared
    with pytest.raises(DataError, match=r"mnist: y_train holds label 12 \(at index 7; 1 such sample\(s\)\), which is "
                                        r"not one of the 10 declared classes 0..9"):
        data.build(npz_config("mnist"))
    write_npz(tmp_path, "toy", y_train, y_test)  # classes found in the training split: 10 and 11 are gaps
    with pytest.raises(DataError, match=r"toy: y_train holds labels up to 12 but no sample of class 10, 11.*"
                                        r"data.num_classes=13"):
        data.build(npz_config("toy"))
    assert data.build(npz_config("toy", num_classes=13)).tasks[4].classes == (8, 9)  # declared: allowed
    y_test[3] = 11
    write_npz(tmp_path, "toy2", np.arange(100) % 10, y_test)
    with pytest.raises(DataError, match=r"toy2: y_test holds label 11 \(at index 3; 1 such sample\(s\)\), which is "
                                        r"not one of the classes found in y_train, 0..9"):
        data.build(npz_config("toy2"))


def test_a_class_missing_from_a_task_split_is_refused_naming_task_class_and_split(npz_config, tmp_path):
    y_train, y_test = np.arange(100) % 10, np.arange(50) % 10
    y_train[y_train == 3] = 2  # digit 3 relabelled: task 1 would learn class 2 alone
    write_npz(tmp_path, "mnist", y_train, y_test)
    with pytest.raises(DataError, match=r"task 1 \(mnist\[2,3\]\) of stream split_mnist: class 3 has no training "
                                        r"samples .*data.allow_missing_classes=True"):
        jaxcl.run(npz_config("mnist"), tmp_path / "run", echo=lambda s: None)
    with pytest.raises(DataError, match=r"task 1 \(mnist\[2,3\]\) of stream split_mnist: its training split holds "
                                        r"the single class 2; a task-incremental task needs at least two"):
        data.build(npz_config("mnist", allow_missing_classes=True))
    write_npz(tmp_path, "mnist", np.arange(100) % 10, np.where(y_test == 5, 4, y_test))
    with pytest.raises(DataError, match=r"task 2 \(mnist\[4,5\]\) of stream split_mnist: class 5 has no test samples"):
        data.build(npz_config("mnist"))
    s = data.build(npz_config("mnist", allow_missing_classes=True))  # explicitly allowed
    assert set(s.tasks[2].y_test.tolist()) == {0}


def test_a_single_class_task_is_refused_where_the_scenario_needs_two(npz_config, tmp_path):
    write_npz(tmp_path, "toy", np.arange(100) % 10, np.arange(50) % 10)
    for scenario in ("task", "domain"):
        with pytest.raises(DataError, match=rf"task 0 \(toy\[0\]\) .* single class 0; a {scenario}-incremental task"):
            data.build(npz_config("toy", scenario=scenario, num_tasks=10, data__classes_per_task=1))
    s = data.build(npz_config("toy", scenario="class", num_tasks=10, data__classes_per_task=1))
    assert s.info.num_outputs == 10


def test_empty_task_is_refused_by_name():
    x = np.zeros((6, 2, 2, 1), np.uint8)
    ds = data.checked("gap", x, np.array([0, 1, 0, 1, 0, 1]), x, np.array([0, 1, 0, 1, 0, 1]), num_classes=4)
    with pytest.raises(DataError, match=r"task 1 \(gap\[2,3\], classes \[2, 3\]\) has no training samples"):
        data.split(ds, 2, 2)


def test_unknown_dataset_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCL_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset 'mnistt'"):
        data.load("mnistt")
    with pytest.raises(DataError, match="data.source"):
        data.load("mnist", source="ftp")


def test_tfds_source_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        d = data.load("mnist", source="tfds")
        assert d.x_train.shape == (40, 28, 28, 1) and d.x_train.dtype == np.uint8
        assert d.num_classes == 10 and d.y_train.max() < 10
        c = data.load("cifar100", source="tfds", label_key="coarse_label")
        assert c.num_classes == 20 and c.x_train.shape[1:] == (32, 32, 3)


def test_batches_pad_and_mask_and_orders_are_seeded():
    s = data.split(fake(n=60), 3, 2)
    p = data.pool(s, 0)
    n = len(p)
    bs = list(data.batches(p, 8))
    assert len(bs) == -(-n // 8)
    assert bs[-1]["mask"].sum() == n - 8 * (len(bs) - 1) and bs[-1]["x"].shape == (8, 6, 6, 1)
    train = list(data.batches(p, 4, data.epoch_order(n, 0, 0, 0, 1), drop_last=True))
    assert len(train) == n // 4 and all(b["mask"].all() for b in train)
    np.testing.assert_array_equal(data.epoch_order(n, 0, 1, 2), data.epoch_order(n, 0, 1, 2))
    assert not np.array_equal(data.epoch_order(n, 0, 1, 2), data.epoch_order(n, 0, 1, 3))
    rest = list(data.batches(p, 4, data.epoch_order(n, 0, 0, 0, 1), drop_last=True, start=2))
    np.testing.assert_array_equal(rest[0]["x"], train[2]["x"])
    # normalisation: the stream's per-channel statistics
    x = np.concatenate([b["x"] for b in bs])[: n]
    raw = p.x.astype(np.float32) / 255
    np.testing.assert_allclose(x, (raw - p.mean[0]) / p.std[0], rtol=1e-5, atol=1e-5)
    mixed = data.pool(s, [0, 2])
    assert set(mixed.task) == {0, 2}


def test_augment_crops_and_flips_deterministically():
    x = jax.numpy.arange(2 * 4 * 4 * 1, dtype=jax.numpy.float32).reshape(2, 4, 4, 1)
    a = data.augment(x, jax.random.PRNGKey(0), pad=1)
    b = data.augment(x, jax.random.PRNGKey(0), pad=1)
    assert a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    outs = {np.asarray(data.augment(x, jax.random.PRNGKey(k), pad=1)).tobytes() for k in range(20)}
    assert len(outs) > 5


def test_multi_can_split_each_dataset_into_class_groups():
    a = fake("grey", shape=(4, 4, 1), k=4)
    b = fake("rgb", shape=(4, 4, 3), k=4)
    s = data.multi([a, b], classes_per_task=2)
    assert [t.name for t in s.tasks] == ["grey[0-1]", "grey[2-3]", "rgb[0-1]", "rgb[2-3]"]
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (0, 1), (2, 3)]
    np.testing.assert_array_equal(s.tasks[1].x_train[..., 0], a.x_train[np.isin(a.y_train, [2, 3])][..., 0])
    assert set(s.tasks[3].y_train.tolist()) == {0, 1}
    with pytest.raises(DataError, match="does not divide the 4 classes"):
        data.multi([a], classes_per_task=3)


def test_data_tasks_selects_tasks_of_a_multi_stream(make_config):
    c = make_config("split_digits:method=finetune", num_tasks=1, data__stream="multi", data__datasets=("digits",),
                    data__classes_per_task=2, data__tasks=(3,))
    s = data.build(c)
    assert [t.name for t in s.tasks] == ["digits[6-7]"]
    with pytest.raises(DataError, match=r"data.tasks: \[9\] out of range"):
        data.build(jaxcl.config.override(c, ["data.tasks=(9,)"]))


def test_channel_statistics_are_numpys_over_the_first_ten_thousand_images():
    from jaxcl.data.streams import _channel_stats

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10500, 4, 3, 3), dtype=np.uint8)
    x[:, :, :, 2] //= 7  # the channels differ
    ref = x[:10000].astype(np.float64) / 255.0
    mean, std = _channel_stats(x)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32
    # the histogram of uint8 pixels and float64 sums of the same pixels agree
    np.testing.assert_allclose(_channel_stats(x.astype(np.float32)), (mean, std), rtol=1e-6)
