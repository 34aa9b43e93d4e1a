"""Where image-classification datasets come from.

Three sources, each giving a :class:`Dataset` of uint8 NHWC images and integer labels:

* ``sklearn``: scikit-learn's bundled 8x8 digits (1,797 images), the offline default;
* ``npz``: ``<dir>/<name>.npz`` with ``x_train, y_train, x_test, y_test`` (uint8), the
  layout of ``shared/data``; ``dir`` is ``data.dir`` or ``$JAXCL_DATA_DIR``;
* ``tfds``: TensorFlow Datasets by name through ``tfds.data_source`` (random access over
  ArrayRecord files, no TensorFlow needed).

``data.image_size`` resizes every image (bilinear, PIL) to a square as it is read.
With ``lazy=True`` (``data.pipeline=grain``) a source reads only the labels: its images
are :class:`LazyImages`, a view that reads, decodes and resizes an image when indexed
(in grain's worker processes), so a stream never needs all of them in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}  # as declared
KNOWN = tuple(NUM_CLASSES)
DATA_DIR_ENV = "JAXCL_DATA_DIR"
CACHE_DIR_ENV = "JAXCL_CACHE_DIR"


class DataError(ValueError):
    """A dataset cannot be found, or its arrays are not usable as given."""


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` (uint8 HWC) resized to ``size`` x ``size``, bilinear (PIL); unchanged
    when ``size`` is 0 or it already has that size. The one resize of both pipelines."""
    if not size or img.shape[:2] == (size, size):
        return img
    from PIL import Image

    planes = [img[..., 0]] if img.shape[-1] == 1 else ([img] if img.shape[-1] == 3 else
                                                       [img[..., c] for c in range(img.shape[-1])])
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(p)).resize((size, size), Image.BILINEAR)) for p in planes]
    return out[0].reshape(size, size, -1) if len(out) == 1 else np.stack(out, -1)


class ArrayReader:
    """Images of an array in memory (the embedded digits, or arrays handed over)."""

    def __init__(self, x: np.ndarray, size: int = 0):
        self.x, self.size = x, size

    def get(self, i: int) -> np.ndarray:
        return resize(np.asarray(self.x[i]), self.size)


class NpyReader:
    """Images of a ``.npy`` file, memory-mapped where it is read (a worker process
    receives the path, not the pixels)."""

    def __init__(self, path: Path, size: int = 0):
        self.path, self.size, self._x = str(path), size, None

    def __getstate__(self):
        return {**self.__dict__, "_x": None}

    def get(self, i: int) -> np.ndarray:
        if self._x is None:
            self._x = np.load(self.path, mmap_mode="r")
        x = np.asarray(self._x[i])
        return resize(x[..., None] if x.ndim == 2 else x, self.size)


class TfdsReader:
    """Images of a TFDS split through ``tfds.data_source`` (random access over its
    ArrayRecord files; the image is decoded where it is read)."""

    def __init__(self, name: str, split: str, data_dir, image_key: str, size: int = 0, src=None):
        self.name, self.split, self.data_dir, self.image_key, self.size, self._src = (
            name, split, data_dir, image_key, size, src)

    def __getstate__(self):
        return {**self.__dict__, "_src": None}

    def get(self, i: int) -> np.ndarray:
        if self._src is None:
            import tensorflow_datasets as tfds

            self._src = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        x = np.asarray(self._src[i][self.image_key])
        return resize(x[..., None] if x.ndim == 2 else x, self.size)


class LazyImages:
    """uint8 images ``[N, H, W, C]`` read on demand: ``reader``'s images at ``idx``,
    each passed through ``steps`` (batch transforms, applied to one image at a time:
    the same functions, so the same pixels, as on a whole array). Indexing returns
    numpy pixels; :meth:`rows` and :meth:`then` make new views without reading."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, reader, idx, image_shape, steps=()):
        self.reader, self.idx = reader, np.asarray(idx, np.int64)
        self.image_shape, self.steps = tuple(int(v) for v in image_shape), tuple(steps)

    @property
    def shape(self) -> tuple:
        return (len(self.idx),) + self.image_shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.idx)

    def rows(self, sel) -> "LazyImages":
        return LazyImages(self.reader, self.idx[sel], self.image_shape, self.steps)

    def then(self, fn, image_shape) -> "LazyImages":
        return LazyImages(self.reader, self.idx, image_shape, self.steps + (fn,))

    def image(self, i: int) -> np.ndarray:
        x = self.reader.get(int(self.idx[i]))
        if self.steps:
            x = x[None]
            for fn in self.steps:
                x = fn(x)
            x = x[0]
        if x.shape != self.image_shape:
            raise DataError(f"{getattr(self.reader, 'name', 'images')}: image {int(self.idx[i])} has shape {x.shape}, "
                            f"expected {self.image_shape}; set data.image_size to resize every image to one size")
        return x

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.image(int(key) % len(self))
        pos = np.arange(len(self))[key]
        out = np.zeros((len(pos),) + self.image_shape, np.uint8)
        for j, i in enumerate(pos):
            out[j] = self.image(i)
        return out

    def __array__(self, dtype=None, copy=None):
        x = self[:]
        return x if dtype is None else x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    coarse_train: np.ndarray | None = None  # superclass of each sample (CIFAR-100), if known
    coarse_test: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def checked(name, x_train, y_train, x_test, y_test, num_classes=None, coarse=None) -> Dataset:
    """Bring arrays to NHWC uint8 / int32 and refuse inconsistent ones by name.
    The classes are ``0..num_classes-1`` when declared, else those found in ``y_train``
    (which must then be ``0..K-1`` with no gap); any other label is an error.
    ``coarse``: optional (train, test) superclass labels."""
    arrays = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = (x if isinstance(x, LazyImages) else np.asarray(x)), np.asarray(y)
        if x.ndim == 3:  # [N, H, W] greyscale
            x = x[..., None]
        if x.ndim != 4:
            raise DataError(f"{name}: x_{split} has shape {x.shape}; expected [N, H, W] or [N, H, W, C]")
        if y.ndim != 1:
            raise DataError(f"{name}: y_{split} has shape {y.shape}; expected [N]")
        if len(x) != len(y):
            raise DataError(f"{name}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise DataError(f"{name}: the {split} split is empty")
        if x.dtype != np.uint8:
            raise DataError(f"{name}: x_{split} has dtype {x.dtype}; expected uint8 pixels 0..255")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{name}: y_{split} has dtype {y.dtype}; expected integer class labels")
        arrays[split] = (x, y.astype(np.int32))
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise DataError(
            f"{name}: train images are {arrays['train'][0].shape[1:]} but test images are "
            f"{arrays['test'][0].shape[1:]}"
        )
    num_classes = _classes(name, arrays["train"][1], arrays["test"][1], num_classes)
    if coarse is not None:
        coarse = tuple(np.asarray(c, np.int32) for c in coarse)
        for split, c, (_, y) in zip(("train", "test"), coarse, (arrays["train"], arrays["test"])):
            if c.shape != y.shape:
                raise DataError(f"{name}: {len(c)} superclass labels for {len(y)} {split} samples")
        return Dataset(name, *arrays["train"], *arrays["test"], num_classes=num_classes,
                       coarse_train=coarse[0], coarse_test=coarse[1])
    return Dataset(name, *arrays["train"], *arrays["test"], num_classes=num_classes)


def _classes(name: str, y_train: np.ndarray, y_test: np.ndarray, declared) -> int:
    """The number of classes: ``declared``, or found in ``y_train``; refuses a label
    outside them, and (when found) a class with no training sample below the largest."""
    if declared:
        k = int(declared)
        them = f"the {k} declared classes 0..{k - 1} (data.num_classes declares another count)"
    else:
        found = np.unique(y_train[y_train >= 0])
        k = int(found[-1]) + 1 if len(found) else 0
        gaps = sorted(set(range(k)) - set(found.tolist()))
        if gaps:
            raise DataError(
                f"{name}: y_train holds labels up to {k - 1} but no sample of class {_few(gaps)}; the classes are "
                f"those found in the training split, so these are gaps. Fix the labels, or declare the classes "
                f"with data.num_classes={k} and let tasks miss a class with data.allow_missing_classes=True")
        them = f"the classes found in y_train, 0..{k - 1}"
    for split, y in (("train", y_train), ("test", y_test)):
        bad = (y < 0) | (y >= k)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{name}: y_{split} holds label {int(y[i])} (at index {i}; {int(bad.sum())} such "
                            f"sample(s)), which is not one of {them}")
    return k


def _few(items, n: int = 10) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def data_dir(configured: str = "") -> Path | None:
    d = configured or os.environ.get(DATA_DIR_ENV, "")
    return Path(d).expanduser() if d else None


def _resize_all(x: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(x)
    if not size or x.shape[1:3] == (size, size):
        return x
    x = x[..., None] if x.ndim == 3 else x
    return np.stack([resize(img, size) for img in x]) if len(x) else x


def _lazy_shape(name: str, shape, size: int) -> tuple:
    """The (H, W, C) a lazy source's images will have (after ``size``)."""
    shape = tuple(shape) if len(shape) == 3 else tuple(shape) + (1,)
    if size:
        return (size, size, shape[2])
    if None in shape or -1 in shape:
        raise DataError(f"{name}: its images vary in size ({shape}); set data.image_size to resize them to one size")
    return shape


def load(name: str, source: str = "auto", directory: str = "", *, label_key: str = "label",
         download: bool = False, tfds_dir: str = "", num_classes: int = 0, image_size: int = 0,
         lazy: bool = False, tfds_splits: tuple = ("train", "test")) -> Dataset:
    """Load dataset ``name`` from ``source`` (``auto`` tries sklearn, npz, then TFDS).
    ``num_classes`` declares the classes (default: the dataset's own declaration, such
    as TFDS's or :data:`NUM_CLASSES`, else those found in the training split).
    ``image_size``: resize every image to that square; ``lazy``: read only the labels
    now, the images (:class:`LazyImages`) when they are indexed."""
    opts = dict(image_size=image_size, lazy=lazy)
    if source not in ("auto", "sklearn", "npz", "tfds"):
        raise DataError(f"data.source: {source!r} is not one of auto, sklearn, npz, tfds")
    if source == "sklearn" or (source == "auto" and name == "digits"):
        if name != "digits":
            raise DataError(f"data.source=sklearn only provides 'digits', not {name!r}")
        return load_digits(num_classes, **opts)
    d = data_dir(directory)
    npz = d / f"{name}.npz" if d else None
    if source == "npz" or (source == "auto" and npz is not None and npz.exists()):
        if npz is None:
            raise DataError(
                f"dataset {name!r}: no data directory; set data.dir or ${DATA_DIR_ENV} to a folder holding {name}.npz"
            )
        return load_npz(npz, name, num_classes, **opts)
    try:
        return load_tfds(name, label_key=label_key, download=download, data_dir=tfds_dir or None,
                         num_classes=num_classes, tfds_splits=tuple(tfds_splits), **opts)
    except DataError as e:
        where = f"no {npz}" if npz else f"no data directory (data.dir / ${DATA_DIR_ENV})"
        raise DataError(f"dataset {name!r} not found: {where}, and TFDS: {e}") from None


def load_digits(num_classes: int = 0, image_size: int = 0, lazy: bool = False) -> Dataset:
    """scikit-learn's 8x8 digits, pixels 0..16 scaled to 0..255, a fixed stratified
    80/20 split (the same on every machine)."""
    x_tr, y_tr, x_te, y_te = _digits_split()
    if lazy:
        shape = _lazy_shape("digits", x_tr.shape[1:], image_size)
        x_tr, x_te = (LazyImages(ArrayReader(a, image_size), np.arange(len(a)), shape) for a in (x_tr, x_te))
    else:
        x_tr, x_te = _resize_all(x_tr, image_size), _resize_all(x_te, image_size)
    return checked("digits", x_tr, y_tr, x_te, y_te, num_classes=num_classes or 10)


def _digits_split() -> tuple[np.ndarray, ...]:
    """The split, made by scikit-learn once and kept in the cache folder: importing
    scikit-learn costs seconds, which every fresh process (a launched worker, a CLI run)
    would otherwise pay before its first step."""
    from importlib import metadata

    cache = _cache_root() / f"digits-sklearn-{metadata.version('scikit-learn')}.npz"
    try:
        with np.load(cache) as f:
            return tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, KeyError, ValueError):
        pass  # not made yet (or unreadable): make it
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    tmp = cache.with_name(f"{cache.stem}.tmp{os.getpid()}.npz")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache: not an error
    finally:
        tmp.unlink(missing_ok=True)
    return x_tr, y_tr, x_te, y_te


def _cache_root() -> Path:
    base = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxcl"
    )
    return Path(base)


def load_npz(path: Path, name: str | None = None, num_classes: int = 0, image_size: int = 0,
             lazy: bool = False) -> Dataset:
    """Read a ``.npz`` of uint8 arrays; its classes are ``num_classes`` if given, else
    those of :data:`NUM_CLASSES` for a known name, else those found in ``y_train``.
    LZMA-compressed files (such as cifar10.npz) take seconds to inflate, so their arrays
    are cached once as ``.npy`` and memory-mapped."""
    path = Path(path)
    name = name or path.stem
    if not path.exists():
        raise DataError(f"dataset {name!r}: file {path} does not exist")
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = _cache_root() / f"{name}-{key}"
    keys = ("x_train", "y_train", "x_test", "y_test")
    optional = ("y_train_coarse", "y_test_coarse")  # CIFAR-100 superclasses, as shared/data's README asks
    if all((cache / f"{k}.npy").exists() for k in keys):
        keys += tuple(k for k in optional if (cache / f"{k}.npy").exists())
        arrays = [np.load(cache / f"{k}.npy", mmap_mode="r") for k in keys]
    else:
        try:
            with np.load(path) as f:
                missing = [k for k in keys if k not in f.files]
                if missing:
                    raise DataError(f"{path}: missing array(s) {', '.join(missing)}; has {', '.join(f.files)}")
                keys += tuple(k for k in optional if k in f.files)
                arrays = [f[k] for k in keys]
        except DataError:
            raise
        except Exception as e:  # zipfile.BadZipFile, OSError, ...
            raise DataError(f"{path}: cannot be read as .npz ({type(e).__name__}: {e})") from None
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for k, a in zip(keys, arrays):
                np.save(tmp / f"{k}.npy", a)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache, or another process filled it first: not an error
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    arrays = list(arrays)
    for j, k in ((0, "x_train"), (2, "x_test")):
        if lazy:  # the cached .npy memory-mapped in each worker (the arrays themselves if it could not be written)
            reader = NpyReader(cache / f"{k}.npy", image_size) if (cache / f"{k}.npy").exists() else \
                ArrayReader(arrays[j], image_size)
            arrays[j] = LazyImages(reader, np.arange(len(arrays[j])), _lazy_shape(name, arrays[j].shape[1:], image_size))
        else:
            arrays[j] = _resize_all(arrays[j], image_size)
    return checked(name, *arrays[:4], num_classes=num_classes or NUM_CLASSES.get(name),
                   coarse=tuple(arrays[4:6]) if len(arrays) == 6 else None)


def load_tfds(name: str, *, label_key: str = "label", image_key: str = "image",
              download: bool = False, data_dir: str | None = None, num_classes: int = 0,
              image_size: int = 0, lazy: bool = False, tfds_splits: tuple = ("train", "test")) -> Dataset:
    """Read every example of a TFDS dataset's train and test splits (``tfds_splits``: the
    TFDS split names read as train and test, e.g. ``("test[:80%]", "test[80%:]")`` for a
    dataset with one split) into memory, or (``lazy``) only their labels, the images
    staying in the ArrayRecord files."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"unknown dataset {name!r}: not one of {', '.join(KNOWN)} and not a TFDS dataset"
        ) from None
    features = builder.info.features
    if label_key not in features or image_key not in features:
        raise DataError(f"TFDS {name!r} has features {list(features)}; need {image_key!r} and {label_key!r}")
    num_classes = num_classes or getattr(features[label_key], "num_classes", None)
    coarse_key = "coarse_label" if "coarse_label" in features and label_key != "coarse_label" else None
    splits, coarse = [], []
    for split in tfds_splits:
        try:
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except Exception as e:  # not prepared and download=False, no network, ...
            raise DataError(
                f"TFDS could not open {name}:{split} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "prepare it or set data.download=True"
            ) from None
        if lazy:
            ys, cs = _tfds_labels(src, name, split, data_dir, features, label_key, coarse_key)
            x = LazyImages(TfdsReader(name, split, data_dir, image_key, image_size, src), np.arange(len(src)),
                           _lazy_shape(name, features[image_key].shape, image_size))
            splits += [x, ys]
            coarse.append(cs)
            continue
        xs, ys, cs = [], [], []
        for i in range(len(src)):
            ex = src[i]
            img = np.asarray(ex[image_key])
            xs.append(resize(img[..., None] if img.ndim == 2 else img, image_size))
            ys.append(int(ex[label_key]))
            if coarse_key:
                cs.append(int(ex[coarse_key]))
        if len({a.shape for a in xs}) > 1:
            raise DataError(f"TFDS {name}:{split}: its images vary in size ({xs[0].shape}, "
                            f"{next(a.shape for a in xs if a.shape != xs[0].shape)}, ...); set data.image_size to "
                            "resize them to one size")
        splits += [np.stack(xs), np.asarray(ys, np.int32)]
        coarse.append(np.asarray(cs, np.int32))
    return checked(name, *splits, num_classes=num_classes, coarse=tuple(coarse) if coarse_key else None)


def _tfds_labels(src, name, split, data_dir, features, label_key, coarse_key):
    """The labels (and superclasses) of a TFDS split, without decoding its images
    where TFDS allows it (``SkipDecoding`` of every other feature)."""
    import tensorflow_datasets as tfds

    keep = {label_key, coarse_key}
    try:
        fast = tfds.data_source(name, split=split, data_dir=data_dir,
                                decoders={k: tfds.decode.SkipDecoding() for k in features if k not in keep})
        fast[0]
        src = fast
    except Exception:  # a feature that cannot skip decoding (or tfds.testing.mock_data): read them whole
        pass
    ys, cs = np.zeros(len(src), np.int32), np.zeros(len(src), np.int32)
    step = 256
    for lo in range(0, len(src), step):
        keys = list(range(lo, min(lo + step, len(src))))
        try:
            exs = src.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data's source reads one record at a time
            exs = [src[i] for i in keys]
        ys[lo:lo + len(exs)] = [int(e[label_key]) for e in exs]
        if coarse_key:
            cs[lo:lo + len(exs)] = [int(e[coarse_key]) for e in exs]
    return ys, cs
