"""Where image-classification datasets come from.

Three sources, each giving a :class:`Dataset` of uint8 NHWC images and integer labels:

* ``sklearn``: scikit-learn's bundled 8x8 digits (1,797 images), the offline default;
* ``npz``: ``<dir>/<name>.npz`` with ``x_train, y_train, x_test, y_test`` (uint8), the
  layout of ``shared/data``; ``dir`` is ``data.dir`` or ``$JAXCL_DATA_DIR``;
* ``tfds``: TensorFlow Datasets by name through ``tfds.data_source`` (random access over
  ArrayRecord files, no TensorFlow needed).
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
        x, y = np.asarray(x), np.asarray(y)
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


def load(name: str, source: str = "auto", directory: str = "", *, label_key: str = "label",
         download: bool = False, tfds_dir: str = "", num_classes: int = 0) -> Dataset:
    """Load dataset ``name`` from ``source`` (``auto`` tries sklearn, npz, then TFDS).
    ``num_classes`` declares the classes (default: the dataset's own declaration, such
    as TFDS's or :data:`NUM_CLASSES`, else those found in the training split)."""
    if source not in ("auto", "sklearn", "npz", "tfds"):
        raise DataError(f"data.source: {source!r} is not one of auto, sklearn, npz, tfds")
    if source == "sklearn" or (source == "auto" and name == "digits"):
        if name != "digits":
            raise DataError(f"data.source=sklearn only provides 'digits', not {name!r}")
        return load_digits(num_classes)
    d = data_dir(directory)
    npz = d / f"{name}.npz" if d else None
    if source == "npz" or (source == "auto" and npz is not None and npz.exists()):
        if npz is None:
            raise DataError(
                f"dataset {name!r}: no data directory; set data.dir or ${DATA_DIR_ENV} to a folder holding {name}.npz"
            )
        return load_npz(npz, name, num_classes)
    try:
        return load_tfds(name, label_key=label_key, download=download, data_dir=tfds_dir or None,
                         num_classes=num_classes)
    except DataError as e:
        where = f"no {npz}" if npz else f"no data directory (data.dir / ${DATA_DIR_ENV})"
        raise DataError(f"dataset {name!r} not found: {where}, and TFDS: {e}") from None


def load_digits(num_classes: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixels 0..16 scaled to 0..255, a fixed stratified
    80/20 split (the same on every machine)."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return checked("digits", x_tr, y_tr, x_te, y_te, num_classes=num_classes or 10)


def _cache_root() -> Path:
    base = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxcl"
    )
    return Path(base)


def load_npz(path: Path, name: str | None = None, num_classes: int = 0) -> Dataset:
    """Read a ``.npz`` of uint8 arrays; its classes are ``num_classes`` if given, else
    those of :data:`NUM_CLASSES` for a known name, else those found in ``y_train``. LZMA-compressed files (such as cifar10.npz) take
    seconds to inflate, so their arrays are cached once as ``.npy`` and memory-mapped."""
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
    return checked(name, *arrays[:4], num_classes=num_classes or NUM_CLASSES.get(name), coarse=tuple(arrays[4:6]) if len(arrays) == 6 else None)


def load_tfds(name: str, *, label_key: str = "label", image_key: str = "image",
              download: bool = False, data_dir: str | None = None, num_classes: int = 0) -> Dataset:
    """Read every example of a TFDS dataset's train and test splits into memory."""
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
    for split in ("train", "test"):
        try:
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except Exception as e:  # not prepared and download=False, no network, ...
            raise DataError(
                f"TFDS could not open {name}:{split} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "prepare it or set data.download=True"
            ) from None
        xs, ys, cs = [], [], []
        for i in range(len(src)):
            ex = src[i]
            xs.append(np.asarray(ex[image_key]))
            ys.append(int(ex[label_key]))
            if coarse_key:
                cs.append(int(ex[coarse_key]))
        splits += [np.stack(xs), np.asarray(ys, np.int32)]
        coarse.append(np.asarray(cs, np.int32))
    return checked(name, *splits, num_classes=num_classes, coarse=tuple(coarse) if coarse_key else None)
