"""Issue 12: the accelerator-native loop against the host loop, side by side in one run.

For each stream, train steps/s of three variants of the same run:

* ``host``:   ``data.on_device=false loop.steps_per_call=1``    (the old loop: batches made
  in numpy, one compiled call per step);
* ``chunk``:  ``data.on_device=false loop.steps_per_call=auto`` (host batches, K steps per
  call: the effect of the lax.scan alone);
* ``device``: ``data.on_device=true  loop.steps_per_call=auto`` (the stream resident on
  the device, batches gathered there, K steps per call);

plus ``host_batches_per_s``: what making the batches in numpy alone sustains
(``jaxcl.data.batches`` over one epoch of the first task's pool, same order and batch).
Optional variant ``scan`` (``--variants ... scan``): the device loop with ``loop.chunk=scan``
forced, the rolled chunk that ``loop.chunk=auto`` replaces on CPU for conv models.

For a convolutional model (the reduced ResNet-18 of split_cifar10 and the ``cnn`` of
``split_cifar10_cnn``) also ``bare_steps_per_s``: the train step built with
``train.make_train_step``, jitted alone (state donated) and called on one resident batch
in a Python loop, the best any loop can do; ``ratio_bare_over_device`` is how far the
CLI's loop falls behind it (issue 18: within 1.3x).

Compile time is excluded twice over: a persistent compilation cache (a temporary folder)
is filled by an unmeasured warm-up run of each variant, and each variant is then run (in
this process, its own ``jaxcl.run``) with ``epochs=E1`` and ``epochs=E2``; steps/s =
(steps(E2) - steps(E1)) / (train_s(E2) - train_s(E1)). ``train_s`` already leaves out
evaluation; what is left of the first call's cost (tracing, loading the cached
executable) is in both runs and cancels. Each
rate is set against the fp32 matmul peak (``peak.py`` of ../shared/peers when its venv
exists, as benchmarks/common.py does): FLOP per step = 6 x params x batch for the MLPs
(the task's head counted), the peers' measured W2 figure for the reduced ResNet-18
(``flops.jsonl``, same model and batch 32).

    python benchmarks/loop.py [--streams split_mnist permuted_mnist split_cifar10 split_cifar10_cnn]
                              [--repeats N] [--variants host chunk device scan] [--set KEY=VALUE ...]

One JSON line per stream: medians over ``--repeats`` interleaved pairs, and the best pair
of each variant (the least contended: on a shared machine the ratios of the best pairs
are the steadier figure).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {
    "host": ["data.on_device=false", "loop.steps_per_call=1"],
    "chunk": ["data.on_device=false", "loop.steps_per_call=auto"],
    "device": ["data.on_device=true", "loop.steps_per_call=auto"],
    "scan": ["data.on_device=true", "loop.steps_per_call=auto", "loop.chunk=scan"],
}
DEFAULT_VARIANTS = ("host", "chunk", "device")
QUIET = ["log.progress=false", "log.plots=false", "log.tensorboard=false"]

# stream -> (config spec, overrides, (E1, E2))
STREAMS = {
    "split_mnist": ("split_mnist:method=finetune", [], (1, 3)),
    "permuted_mnist": ("permuted_mnist:method=finetune",
                       ["data.train_limit=10000", "data.test_limit=1000", "num_tasks=3"], (1, 5)),
    "split_cifar10": ("split_cifar10:method=finetune",
                      ["data.train_limit=640", "data.test_limit=200", "num_tasks=2"], (1, 2)),
    "split_cifar10_cnn": ("split_cifar10:method=finetune",
                          ["model.name=cnn", "data.train_limit=640", "data.test_limit=200", "num_tasks=2"], (1, 2)),
}


def conv(res: dict) -> bool:
    return res["config"]["model"]["name"] not in ("mlp",)


def _run(spec: str, sets: list[str], tmp: Path, name: str) -> dict:
    return common.run_config(spec, sets, tmp / name, echo=lambda s: None)


def flop_per_step(stream: str, res: dict) -> float | None:
    cfg = res["config"]
    if cfg["model"]["name"] == "mlp":
        p = res["params"]
        return 6.0 * (p["backbone"] + p["head_per_task"]) * cfg["batch_size"]
    if cfg["model"]["name"] == "reduced_resnet18" and not cfg["model"]["width"] and cfg["batch_size"] == 32:
        return common.flops("w2_packnet_resnet").get("train_step")
    return None


def recorded_peak() -> float | None:
    """The peers' peak.py figure recorded on an uncontended run of this CPU model
    (../shared/peers/peak-*.json), if any: the contended figure measured now is lower."""
    cpu = common.env_info()["cpu"]
    for f in sorted(common.PEERS.glob("peak-*.json")):
        d = json.loads(f.read_text())
        if d.get("env", {}).get("cpu", "").startswith(cpu) and not d["env"].get("contended", True):
            return float(d["peak_gflops"])
    return None


def host_batches_per_s(spec: str, sets: list[str], repeats: int = 3) -> float:
    """Batches/s of jaxcl.data.batches over one epoch of task 0's training pool."""
    import jaxcl
    from jaxcl import data

    cfg = jaxcl.config.override(jaxcl.get_config(spec), sets)
    stream = data.build(cfg)
    p = data.pool(stream, 0, "train", normalize=cfg.data.normalize)
    order = data.epoch_order(len(p), cfg.seed, 0, 0, 0)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in data.batches(p, cfg.batch_size, order, drop_last=True))
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def bare_steps_per_s(spec: str, sets: list[str], repeats: int = 3, inner: int = 4) -> float:
    """Steps/s of ``train.make_train_step`` jitted alone, on one resident batch of task 0
    (augmentation as configured), median over ``repeats`` blocks of ``inner`` steps."""
    import jax
    import jax.numpy as jnp

    import jaxcl
    from jaxcl import data, train, xla

    cfg = jaxcl.config.override(jaxcl.get_config(spec), sets)
    S = train.setup(cfg)
    state = train._init_fn(S)(train._keys(S))
    step = xla.jit(train.make_train_step(S.method, S.tx, cfg.data.augment), static_argnums=3, donate_argnums=0)
    batch = jax.device_put(next(data.batches(data.pool(S.streams[0], 0, normalize=cfg.data.normalize),
                                             cfg.batch_size)))
    cycle = common.StepCycle(step, state, [batch], jnp.int32(0), S.method.phases(0)[0].name)
    times = common.time_repeats(cycle, warmup=2, repeats=repeats, inner=inner)
    return inner / statistics.median(times)


def bench_stream(name: str, repeats: int, peak: float | None, peak_rec: float | None,
                 variants=DEFAULT_VARIANTS, sets=()) -> dict:
    spec, extra, (e1, e2) = STREAMS[name]
    extra = [*extra, *sets]
    base = [f"data.dir={common.DATA_DIR}", *QUIET, *extra]
    rates = {v: [] for v in variants}
    bare = []
    info, warm = {}, {}
    with tempfile.TemporaryDirectory(prefix="jaxcl_loop_") as tmp:
        tmp = Path(tmp)
        for rep in range(repeats):
            # variants interleaved, so that a change of load hits them alike
            for v in variants:
                sets = VARIANTS[v]
                if rep == 0:  # warm-up: compiles into the persistent cache
                    warm[v] = _run(spec, [*base, *sets, f"epochs={e1}"], tmp, f"{v}_warmup")
                a = _run(spec, [*base, *sets, f"epochs={e1}"], tmp, f"{v}_{rep}_a")
                b = _run(spec, [*base, *sets, f"epochs={e2}"], tmp, f"{v}_{rep}_b")
                assert a["data_path"] == ("host" if v in ("host", "chunk") else "device"), a["data_path"]
                rate = (b["train_steps"] - a["train_steps"]) / (b["train_s"] - a["train_s"])
                rates[v].append(rate)
                info[v] = {"data_path": b["data_path"], "steps_per_call": b["steps_per_call"],
                           "loop_chunk": b.get("loop_chunk"),
                           "first_epoch_s_warmup_compiling": round(warm[v]["train_s"], 3),
                           "first_epoch_s_cached": round(a["train_s"], 3),
                           "steps_per_s_incl_compile": round(b["steps_per_s"], 2),
                           "acc": round(b["acc"], 4)}
                if conv(b) and v == variants[-1]:  # the bare step, interleaved like a variant
                    bare.append(bare_steps_per_s(spec, [*base, "data.on_device=true"]))
        fps = flop_per_step(name, b)
    med = {v: statistics.median(r) for v, r in rates.items()}
    best = {v: max(r) for v, r in rates.items()}  # the least contended pair of each variant

    def ratio(a, b, of):
        return round(of[a] / of[b], 3) if a in of and b in of else None

    hb = host_batches_per_s(spec, base)
    out = {
        "stream": name,
        "command": f"jaxcl run {spec} --set " + " --set ".join(extra) if extra else f"jaxcl run {spec}",
        "epochs_differenced": [e1, e2],
        "steps_per_s": {v: round(r, 2) for v, r in med.items()},
        "steps_per_s_all": {v: [round(x, 2) for x in r] for v, r in rates.items()},
        "ratio_device_over_host": ratio("device", "host", med),
        "ratio_chunk_over_host": ratio("chunk", "host", med),
        "ratio_device_over_chunk": ratio("device", "chunk", med),
        "ratio_device_over_scan": ratio("device", "scan", med),
        "steps_per_s_best": {v: round(r, 2) for v, r in best.items()},
        "ratio_device_over_host_best": ratio("device", "host", best),
        "ratio_chunk_over_host_best": ratio("chunk", "host", best),
        "bare_steps_per_s_all": [round(x, 3) for x in bare] or None,
        "ratio_bare_over_device": round(statistics.median(bare) / med["device"], 3) if bare and "device" in med
        else None,
        "host_batches_per_s": round(hb, 1),
        "flop_per_step": fps,
        "peak_gflops": peak,
        "share_of_peak": {v: common.share_of_peak(r, fps, peak) for v, r in med.items()},
        "share_of_peak_best": {v: common.share_of_peak(r, fps, peak) for v, r in best.items()},
        "peak_gflops_recorded_uncontended": peak_rec,
        "share_of_recorded_peak_best": {v: common.share_of_peak(r, fps, peak_rec) for v, r in best.items()},
        "variants": info,
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    ap.add_argument("--repeats", type=int, default=3, help="differenced pairs per variant (median and best)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override added to every run (say data.train_limit=256 for a shorter row)")
    args = ap.parse_args(argv)
    import jax

    cache = tempfile.mkdtemp(prefix="jaxcl_loop_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    peak = common.peak_gflops()
    for name in args.streams:
        load0 = open("/proc/loadavg").read().split()[0]
        rec = bench_stream(name, args.repeats, peak, recorded_peak(), tuple(args.variants), args.set)
        rec["load_1min"] = [float(load0), float(open("/proc/loadavg").read().split()[0])]
        common.emit(rec)
    shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
