"""Input pipeline throughput (issue 15).

1. grain's images per second per CPU core for decode + resize to 224 + augment (random
   crop and flip of the resized image, in the map step): JPEG-encoded 500x375 images
   (the size of CUBS/Cars photos) decoded with PIL, through data.pipeline's resize, in
   ``--workers`` grain worker processes;
2. the train step fed by grain (data.pipeline=grain) against the in-memory path
   (data.pipeline=memory) on CIFAR-10 at 32x32 (shared/data/cifar10.npz, else the
   embedded digits), same model and batch: seconds per step after warm-up.

    python benchmarks/input.py [--workers 1] [--images 400] [--steps 150]
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np


class _Jpegs:
    def __init__(self, n: int):
        from PIL import Image

        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (375, 500, 3), np.uint8)
        self.blobs = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.roll(base, i, axis=1)).save(buf, format="JPEG", quality=90)
            self.blobs.append(buf.getvalue())

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        return self.blobs[i]


def _decode_resize_augment(i_blob):
    from PIL import Image

    from jaxcl.data.sources import resize

    i, blob = i_blob
    img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    img = resize(img, 256)
    rng = np.random.default_rng(i)
    y, x = rng.integers(0, 256 - 224 + 1, 2)
    img = img[y:y + 224, x:x + 224]
    return img[:, ::-1] if rng.random() < 0.5 else img


def decode_rate(n: int, workers: int) -> float:
    import grain

    from jaxcl.data.pipeline import _absl_flags

    ds = grain.MapDataset.source(_Jpegs(n)).map_with_index(lambda i, b: (i, b)).map(_decode_resize_augment).batch(16)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if workers:
        _absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    it = iter(it)
    next(it)  # workers started
    t = time.perf_counter()
    count = sum(len(b) for b in it)
    return count / (time.perf_counter() - t) / max(workers, 1)


def step_time(pipeline: str, steps: int, workers: int) -> float:
    import jaxcl
    from jaxcl import config as config_lib

    data_dir = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    cifar = os.path.exists(os.path.join(data_dir, "cifar10.npz"))
    spec = "split_cifar10:method=finetune" if cifar else "split_digits:method=finetune"
    times = []
    for epochs in (1, 2):  # compile and set-up cancel in the difference
        sets = ["log.progress=false", "log.plots=false", "log.tensorboard=false", f"data.pipeline={pipeline}",
                f"data.grain_workers={workers}", "num_tasks=1", f"epochs={epochs}", "batch_size=32",
                "model.name=cnn", f"data.train_limit={steps * 32}", "data.test_limit=200", "data.on_device=true"]
        if cifar:
            sets.append(f"data.dir={data_dir}")
        c = config_lib.override(jaxcl.get_config(spec), sets)
        with tempfile.TemporaryDirectory() as d:
            r = jaxcl.run(c, d, echo=lambda s: None)
        times.append(r["train_s"])
    return (times[1] - times[0]) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    print(f"decode+resize 224+augment: {decode_rate(a.images, 0):.0f} images/s in-process (1 core)")
    print(f"decode+resize 224+augment: {decode_rate(a.images, a.workers):.0f} images/s per worker core "
          f"({a.workers} workers)")
    mem = step_time("memory", a.steps, a.workers)
    for w in sorted({0, a.workers}):
        g = step_time("grain", a.steps, w)
        print(f"train step, CIFAR-10 32x32 cnn batch 32: memory {1e3 * mem:.2f} ms, grain ({w} workers) "
              f"{1e3 * g:.2f} ms, ratio {g / mem:.2f}")


if __name__ == "__main__":
    main()
