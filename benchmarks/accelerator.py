"""One prepared accelerator check (issue 18): everything a session with a GPU runs in one call.

    python benchmarks/accelerator.py --prepare        # here: wheels + peers into .whl/, prints the call
    python benchmarks/accelerator.py --out $OUT       # on the device (the call --prepare prints)
    python benchmarks/accelerator.py --dry-run --out /tmp/acc   # the same sequence on CPU, toy sizes

The device machine (one H200; jax 0.11 with CUDA 13, flax, optax, orbax, chex, torch and
torchvision in its python3, Python 3.12, no package registry) gets the wheels it lacks and
the PyTorch peers in the git-ignored folder ``.whl/`` (the ``carry`` of the call), then runs,
each part time-boxed inside ``--budget`` seconds (a part that fails or runs out of time is
recorded and the next one starts):

  env        jax/torch versions, the device, its memory
  tests      ``pytest -m accelerator`` (tests/test_accelerator.py: every method trains on the
             device, host and device input paths agree, bfloat16 steps stay finite)
  W1..W6     benchmarks/wN_*.py side by side with the PyTorch peer at ``PEERS_DEVICE=cuda``
  W3_bf16    W3 in bfloat16 at batch 256 (and float32 at 256 beside it), with its MFU: the
             peer's FLOP per step (``flops.jsonl``, batch 64) scaled to the batch, against the
             device's dense bf16 matmul rate (H200: 790 TFLOP/s measured)
  seeds_W2/3 ``jaxcl.run`` of W2's PackNet and W3's CLR work (2 tasks, 1 epoch, random
             images of CIFAR's shape) with 1 seed and with 8 seeds in one program
             (``mesh.runs=1`` where the config has it; ``mesh.runs=N`` too on N devices)

Every part runs in its own process (``--dry-run``: in this one), so each reports its own peak
device memory (``memory_stats()['peak_bytes_in_use']``). Figures go, one JSON line each, to
``OUT/accelerator.jsonl`` as they come, the whole records to ``OUT/accelerator-raw.jsonl``,
the children's output to ``OUT/accelerator.log``, and a table to ``OUT/accelerator.md``.
Shares of peak on the device are against its bf16 matmul rate (float32 work cannot reach it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata as md
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WHL = ROOT / ".whl"
SHARED_PEERS = ROOT.parent / "shared" / "peers"
MiB = 2 ** 20

# ----------------------------------------------------------------------------- prepare (CPU machine)

# The device image's Python packages (../.library/device KINDS.md, read 2026-11-17): wheels
# are carried only for what is not among them.
IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
# the device's Python, for the markers of the requirements
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
TRAVEL_LIMIT_MiB = 48  # the call's limit is 64 MiB for the working tree and the carry together
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_list(roots) -> dict[str, str]:
    """{name: version installed here} of ``roots`` and everything they require on the
    device (markers evaluated for its Python) that its image lacks."""
    from packaging.requirements import Requirement

    need, todo = {}, [(r, ()) for r in roots]
    while todo:
        spec, extras = todo.pop()
        req = Requirement(spec) if isinstance(spec, str) else spec
        name = _norm(req.name)
        if name in IMAGE or name in need:
            continue
        try:
            need[name] = md.version(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"--prepare: {req.name} is not installed here; install the project first "
                             "(pip install -e .) so that its versions can be pinned") from None
        for dep in md.requires(req.name) or []:
            d = Requirement(dep)
            extra_ok = [e for e in ("", *req.extras) if d.marker is None or d.marker.evaluate({**TARGET, "extra": e})]
            if extra_ok:
                todo.append((d, ()))
    return dict(sorted(need.items()))


def _project_roots() -> list[str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps]


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _download(name: str, version: str, dest: Path) -> str:
    """One wheel for the device: a manylinux/none-any wheel, else (a pure-Python sdist,
    such as promise's) a wheel built here, kept only if it is ``none-any``."""
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    p = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
             *plats, "-d", str(dest), f"{name}=={version}")
    if p.returncode == 0:
        return "downloaded"
    with tempfile.TemporaryDirectory() as tmp:
        b = _pip("wheel", "--no-deps", "--no-binary", name, "-w", tmp, f"{name}=={version}")
        built = list(Path(tmp).glob("*.whl"))
        if b.returncode == 0 and built and built[0].name.endswith("-none-any.whl"):
            shutil.copy(built[0], dest / built[0].name)
            return "built here (pure Python, no wheel on the index)"
    raise SystemExit(f"--prepare: no wheel of {name}=={version} for Python 3.12 manylinux x86_64:\n"
                     f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.stdout[-500:]}")


def _travelling_bytes() -> int:
    """What a device call sends besides the carry: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    return sum((ROOT / f).stat().st_size for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file())


def _dist_of_wheel(path: Path) -> str:
    return _norm(path.name.split("-")[0])


def prepare(args) -> int:
    WHL.mkdir(exist_ok=True)
    wanted = wheel_list(_project_roots())
    have = {_dist_of_wheel(p): p for p in WHL.glob("*.whl")}
    for name, p in have.items():  # one version of each: two would stop the whole install
        if name not in wanted or f"-{wanted[name]}-" not in p.name:
            p.unlink()
    for name, version in wanted.items():
        p = have.get(name)
        how = "kept" if p is not None and p.exists() else _download(name, version, WHL)
        print(f"[prepare] {name}=={version}: {how}")
    # the PyTorch peers and their FLOP counts: ../shared does not travel
    peers = WHL / "peers"
    if SHARED_PEERS.is_dir():
        shutil.rmtree(peers, ignore_errors=True)
        peers.mkdir()
        for f in list(SHARED_PEERS.glob("*.py")) + list(SHARED_PEERS.glob("flops.jsonl")):
            shutil.copy(f, peers / f.name)
            (peers / f.name).chmod(0o644)
        print(f"[prepare] peers: {len(list(peers.iterdir()))} files of {SHARED_PEERS}")
    else:
        print(f"[prepare] peers: {SHARED_PEERS} not found; the device run will time jaxcl alone")
    whl = sum(p.stat().st_size for p in WHL.rglob("*") if p.is_file())
    tree = _travelling_bytes()
    total = (whl + tree) / MiB
    print(f"[prepare] .whl {whl / MiB:.1f} MiB + working tree {tree / MiB:.1f} MiB = {total:.1f} MiB "
          f"(the call takes 64 MiB; this script keeps it under {TRAVEL_LIMIT_MiB})")
    if total > TRAVEL_LIMIT_MiB:
        raise SystemExit(f"--prepare: {total:.1f} MiB would travel; over {TRAVEL_LIMIT_MiB} MiB")
    print(json.dumps({"carry": [".whl"], "timeout_s": 540, "command": device_command(args.budget)}))
    print("carry: [\".whl\"]   timeout_s: 540\ncommand:\n" + device_command(args.budget))
    return 0


def device_command(budget: int) -> str:
    return f"{INSTALL} PYTHONUNBUFFERED=1 python3 benchmarks/accelerator.py --out $OUT --budget {budget}"


# ----------------------------------------------------------------------------- rows


def row(part: str, figure: str, jaxcl=None, *, unit: str = "", ref=None, ref_name: str = "", ratio=None,
        share=None, ref_share=None, peak_bytes=None, status: str = "ok", note: str = "") -> dict:
    """One figure: jaxcl's value, the reference beside it (the PyTorch peer, one seed,
    float32), jaxcl / reference, shares of the device's peak, the part's peak device memory."""
    if ratio is None and isinstance(jaxcl, (int, float)) and isinstance(ref, (int, float)) and ref:
        ratio = round(jaxcl / ref, 3)
    return {"kind": "row", "part": part, "figure": figure, "jaxcl": jaxcl, "unit": unit, "ref": ref,
            "ref_name": ref_name, "ratio": ratio, "share_of_peak": share, "ref_share_of_peak": ref_share,
            "peak_device_bytes": peak_bytes, "status": status, "note": note}


def _median(d):
    if isinstance(d, dict):
        return d.get("median", d.get("median_ms"))
    return None


def _unit(key: str, d: dict) -> str:
    return "ms" if "median_ms" in d else key.rsplit("_per_s", 1)[0].split("_", 1)[-1] + "/s"


SHARE_KEY = {"train_steps_per_s": "train", "eval_samples_per_s": "eval", "calls_per_s": "call",
             "eval_samples_per_s_merged": "eval_merged", "eval_samples_per_s_unmerged": "eval_unmerged"}


def workload_rows(part: str, rec: dict, peak_bytes, note: str = "") -> list[dict]:
    """The figures of a W script's record: every timed entry of ``jaxcl`` beside the
    peer's entry of the same name."""
    ours, theirs, shares = rec.get("jaxcl", {}), rec.get("plain_torch") or {}, rec.get("share_of_peak") or {}
    out = []
    for key, d in ours.items():
        v = _median(d)
        if v is None:
            continue
        t = _median(theirs.get(key))
        sk = SHARE_KEY.get(key)
        out.append(row(part, key, v, unit=_unit(key, d), ref=t, ref_name="torch" if t is not None else "",
                       share=shares.get(sk), ref_share=shares.get(f"torch_{sk}"), peak_bytes=peak_bytes,
                       note=note))
    return out


# ----------------------------------------------------------------------------- parts (child side)


class PartTimeout(Exception):
    pass


def _bench_modules():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import common

    return common


def peak_device_bytes():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without the call
        stats = None
    return (stats or {}).get("peak_bytes_in_use")


# the device's dense bf16 matmul rate in GFLOP/s, measured on the lent kind (KINDS.md: 769-798 on random data)
PEAK_GFLOPS = {"H200": 790e3}


def device_peak_gflops(toy: bool):
    import jax

    if toy:
        return 100.0
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_GFLOPS.items() if k in kind), None)


class _SetsProxy:
    """A W script's ``config_lib`` with ``extra`` --set strings applied after its own."""

    def __init__(self, real, extra):
        self._real, self._extra = real, list(extra)

    def override(self, config, sets):
        return self._real.override(config, [*sets, *self._extra])

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def bench_context(ctx):
    """What every W part runs under: the peers' folder and python, the peak of the
    device, the last loss of every StepCycle kept; at toy sizes, tiny models and loops."""
    common = _bench_modules()
    import jax

    import jaxcl.models as models_lib

    class Cycle(common.StepCycle):
        last = []

        def __call__(self):
            loss = super().__call__()
            Cycle.last[:] = [loss]
            return loss

    peak = device_peak_gflops(ctx.toy)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(common, StepCycle=Cycle))
        if ctx.peers:
            stack.enter_context(patched(common, PEERS=Path(ctx.peers), PEERS_PYTHON=ctx.peers_python))
        if peak is not None or ctx.toy:
            stack.enter_context(patched(common, peak_gflops=lambda: peak))
        if ctx.toy:
            from jaxcl.models import resnet

            tiny = functools.partial(resnet.ResNet, stage_sizes=(), block=resnet.BasicBlock, width=4, stem="cifar")
            registry = dict(models_lib._MODELS)
            registry.update({k: tiny for k in ("reduced_resnet18", "resnet18_cifar")})
            stack.enter_context(patched(models_lib, _MODELS=registry))
            stack.enter_context(patched(common, jax_matmul_gflops=lambda: 100.0))
        if "PEERS_DEVICE" not in os.environ and jax.default_backend() == "gpu":
            os.environ["PEERS_DEVICE"] = "cuda"
        yield common, Cycle


TOY_SIZES = {  # module -> constants at toy sizes
    "w3_clr_resnet": {"BATCH": 4},
    "w4_nccl": {"B": 2, "MEM": 8, "config_lib": "method.inner_steps=1"},
    "w5_rescl": {"BATCH": 4},
    "w6_l2p_vit": {"BATCH": 2, "IMG": 32},  # ViT-Ti/16's 12 blocks on 2x2 patches (+ cls, 25 prompt tokens)
}
WORKLOADS = {"W1": "w1_packnet_mlp", "W2": "w2_packnet_resnet", "W3": "w3_clr_resnet", "W4": "w4_nccl",
             "W5": "w5_rescl", "W6": "w6_l2p_vit"}


def part_workload(ctx, part: str, sink) -> None:
    script = WORKLOADS[part]
    if not (BENCH / f"{script}.py").exists():
        sink(row(part, "skipped", status="skipped", note=f"benchmarks/{script}.py not present"))
        return
    with bench_context(ctx) as (common, Cycle), contextlib.ExitStack() as stack:
        argv = [] if ctx.peers else ["--no-peer"]
        captured = []
        stack.enter_context(patched(common, emit=lambda rec: captured.append(rec)))
        if part in ("W1", "W2"):
            import packnet_workload as pw

            w = getattr(pw, part)
            if ctx.toy:
                w = dataclasses.replace(w, batch=8, task1_steps=2, iters=2, warmup=1, train_repeats=2, eval_batches=2)
            run = functools.partial(pw.main, w)
        else:
            mod = importlib.import_module(script)
            if ctx.toy:
                if script not in TOY_SIZES:
                    sink(row(part, "skipped", status="skipped", note=f"{script} has no toy size"))
                    return
                toy = dict(TOY_SIZES[script])
                if "config_lib" in toy:  # --set strings after the script's own
                    toy["config_lib"] = _SetsProxy(mod.config_lib, [toy["config_lib"]])
                stack.enter_context(patched(mod, **toy))
            run = mod.main
        t0 = time.perf_counter()
        run(argv)
        wall = time.perf_counter() - t0
        rec = captured[-1]
        mem = peak_device_bytes()
        last = Cycle.last[0] if Cycle.last else None
        finite = None if last is None else bool(math.isfinite(float(last)))
        sink({"kind": "raw", "part": part, "record": rec, "wall_s": round(wall, 1)})
        rows = workload_rows(part, rec, mem, note="" if ctx.peers else "peer not run")
        rows.append(row(part, "last_loss_finite", finite, peak_bytes=mem,
                        status="ok" if finite is not False else "failed"))
        for r in rows:
            sink(r)


def part_bf16(ctx, part: str, sink) -> None:
    """W3 at batch 256 in bfloat16, then in float32: steps/s, MFU, finite loss."""
    import numpy as np

    with bench_context(ctx) as (common, Cycle):
        import w3_clr_resnet as w3

        batch = 4 if ctx.toy else 256
        flop = (common.flops("w3_clr_resnet").get("train_step") or 0) * batch / 64 or None
        peak = device_peak_gflops(ctx.toy)
        out = {}
        for dtype in ("bfloat16",) if ctx.toy else ("bfloat16", "float32"):
            Cycle.last[:] = []
            with patched(w3, BATCH=batch, config_lib=_SetsProxy(w3.config_lib, [f"model.dtype={dtype}"])):
                res = w3.run_jaxcl()
            loss = float(Cycle.last[0]) if Cycle.last else float("nan")
            out[dtype] = dict(res, last_loss=loss, peak_device_bytes=peak_device_bytes())
        sink({"kind": "raw", "part": part, "record": {"batch": batch, "flop_per_step": flop, "peak_gflops": peak,
                                                      **out}})
        bf = out["bfloat16"]
        fp = out.get("float32", {"train_steps_per_s": {}, "eval_samples_per_s": {}, "last_loss": None})
        rate = bf["train_steps_per_s"]["median"]
        mfu = round(rate * flop / (peak * 1e9), 4) if flop and peak else None
        sink(row(part, f"train_steps_per_s_b{batch}", rate, unit="steps/s", ref=fp["train_steps_per_s"].get("median"),
                 ref_name="float32", share=mfu, peak_bytes=bf["peak_device_bytes"],
                 note="share_of_peak is the MFU: FLOP/step x steps/s / dense bf16 rate"))
        sink(row(part, f"eval_samples_per_s_b{batch}", bf["eval_samples_per_s"]["median"], unit="samples/s",
                 ref=fp["eval_samples_per_s"].get("median"), ref_name="float32", peak_bytes=bf["peak_device_bytes"]))
        ok = bool(np.isfinite(bf["last_loss"]))
        sink(row(part, "bf16_last_loss", bf["last_loss"], ref=fp["last_loss"], ref_name="float32",
                 status="ok" if ok else "failed", note="" if ok else "bfloat16 loss not finite"))


def _synthetic_cifar(folder: Path, per_class: int, test_per_class: int, size: int) -> None:
    """``cifar10.npz`` of random uint8 images with a mean pattern per class (learnable):
    the real file (134 MB) does not travel."""
    import numpy as np

    rng = np.random.default_rng(0)
    means = rng.integers(60, 196, (10, size, size, 3))

    def split(n):
        y = np.repeat(np.arange(10), n)
        x = np.clip(means[y] + rng.normal(0, 40, (len(y), size, size, 3)), 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    (xtr, ytr), (xte, yte) = split(per_class), split(test_per_class)
    np.savez(folder / "cifar10.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)


SEEDS = {  # part -> (spec, --set strings, batch): W2's and W3's work through jaxcl.run
    "seeds_W2": ("split_cifar10:method=packnet", ["model.name=reduced_resnet18", "method.prune=(0.5,)"], 32),
    "seeds_W3": ("split_cifar10:method=clr", ["model.name=resnet18_cifar", "method.variant=full",
                                              "method.task_bn=false"], 64),
}
QUIET = ["log.progress=false", "log.plots=false", "log.tensorboard=false"]


def part_seeds(ctx, part: str, sink) -> None:
    import jax
    import numpy as np

    with bench_context(ctx) as (common, _), tempfile.TemporaryDirectory(prefix="jaxcl_acc_") as tmp:
        import jaxcl

        tmp = Path(tmp)
        spec, sets, batch = SEEDS[part]
        n = ctx.seeds
        if ctx.toy:
            batch = 4
        _synthetic_cifar(tmp, per_class=2 * batch if ctx.toy else 512, test_per_class=batch if ctx.toy else 100,
                         size=8 if ctx.toy else 32)
        base = [*QUIET, f"data.dir={tmp}", "data.augment=false", "num_tasks=2", "epochs=1", f"batch_size={batch}",
                f"eval_batch_size={2 * batch if ctx.toy else 500}", "optimizer.name=sgd", "optimizer.lr=0.01",
                "optimizer.momentum=0", "optimizer.schedule=constant", *sets]
        has_runs = "runs" in jaxcl.get_config(spec).mesh
        layouts = [["mesh.runs=1"]] if has_runs else [[]]
        D = jax.device_count()
        if has_runs and D > 1 and n % D == 0:
            layouts.append([f"mesh.runs={D}"])
        os.environ.setdefault("JAXCL_CACHE_DIR", str(tmp / "cache"))
        quiet = dict(echo=lambda s: None)
        one = common.run_config(spec, [*base, *layouts[0], "seed=0"], tmp / "one", **quiet)
        mem1 = peak_device_bytes()
        sink(row(part, "wall_s_1_seed", round(one["wall_s"], 2), unit="s", peak_bytes=mem1,
                 note=f"train_s {one['train_s']:.2f}, {one['train_steps']} steps, acc {one['acc']:.3f}"))
        for lay in layouts:
            many = common.run_config(spec, [*base, *lay, f"seeds={tuple(range(n))}"], tmp / "many", **quiet)
            mem = peak_device_bytes()
            shutil.rmtree(tmp / "many", ignore_errors=True)
            tag = f"_{lay[0].replace('.', '_').replace('=', '')}" if lay else ""
            by_seed = {r["seed"]: r for r in many["runs"]}
            diff = float(np.max(np.abs(np.asarray(by_seed[0]["accuracy_matrix"]) - np.asarray(one["accuracy_matrix"]))))
            sink({"kind": "raw", "part": part, "layout": lay, "record": {
                "one": {k: one[k] for k in ("wall_s", "train_s", "train_steps", "acc", "accuracy_matrix", "devices")},
                "many": {"wall_s": many["wall_s"], "train_s": many["train_s"], "runs_in_program": n,
                         "acc": [r["acc"] for r in many["runs"]], "train_steps": many["runs"][0]["train_steps"]},
                "seed0_diff": diff, "peak_one": mem1, "peak_many": mem}})
            note = f"{n} seeds in one program vs seed 0 alone; {one['train_steps']} steps per seed"
            sink(row(part, f"wall_s_{n}_seeds{tag}", round(many["wall_s"], 2), unit="s", ref=round(one["wall_s"], 2),
                     ref_name="1 seed", peak_bytes=mem, note=note + (" (GPU target <= 1.5)" if not ctx.toy else "")))
            sink(row(part, f"train_s_{n}_seeds{tag}", round(many["train_s"], 2), unit="s",
                     ref=round(one["train_s"], 2), ref_name="1 seed", peak_bytes=mem, note="compiles included"))
            sink(row(part, f"seed0_matrix_max_abs_diff{tag}", diff, peak_bytes=mem1,
                     status="ok" if diff <= 0.02 else "failed", note="seed 0 in the program vs its own run"))


def part_tests(ctx, part: str, sink) -> None:
    import pytest

    class Collect:
        """Each test's outcome as it comes (a part killed at its limit keeps them)."""

        def __init__(self):
            self.reports, self.collected = [], 0

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.reports.append(report)
                sink({"kind": "raw", "part": part, "test": report.nodeid, "when": report.when,
                      "outcome": report.outcome, "s": round(report.duration, 2)})
                if report.outcome == "failed":
                    last = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
                    sink(row(part, report.nodeid.split("::", 1)[-1], "failed", status="failed", note=last))

        def pytest_collection_finish(self, session):
            self.collected = len(session.items)

    c = Collect()
    args = ["-o", "addopts=", "-p", "no:cacheprovider", "-q", "-m", "accelerator", "--rootdir", str(ROOT)]
    if ctx.toy:  # the selection only: on a loaded CPU one of these runs takes minutes
        args += [str(ROOT / "tests" / "test_accelerator.py"), "--collect-only"]
    else:  # compiles are single-threaded host work: 4 workers share the device
        args += [str(ROOT / "tests"), "-n", "4", "--dist", "load"]
    old = os.environ.get("JAXCL_ACCELERATOR_TESTS")
    os.environ["JAXCL_ACCELERATOR_TESTS"] = "1"
    t0 = time.perf_counter()
    try:
        code = pytest.main(args, plugins=[c])
    finally:
        if old is None:
            os.environ.pop("JAXCL_ACCELERATOR_TESTS", None)
        else:
            os.environ["JAXCL_ACCELERATOR_TESTS"] = old
    wall = round(time.perf_counter() - t0, 1)
    counts = {k: sum(r.outcome == k for r in c.reports) for k in ("passed", "failed", "skipped")}
    sink({"kind": "raw", "part": part, "record": {"exit_code": int(code), "wall_s": wall, **counts}})
    if ctx.toy:
        sink(row(part, "collected", c.collected,
                 status="ok" if int(code) == 0 and c.collected else "failed",
                 note=f"pytest -m accelerator --collect-only: exit {int(code)}; the tests run on the device"))
        return
    bad = int(code) != 0 or counts["failed"] or not counts["passed"]
    sink(row(part, "passed", counts["passed"], ref=counts["passed"] + counts["failed"] + counts["skipped"],
             ref_name="run", status="failed" if bad else "ok",
             note=f"pytest exit {int(code)}, {counts['failed']} failed, {counts['skipped']} skipped, {wall} s"))


def part_env(ctx, part: str, sink) -> None:
    import jax

    d = jax.devices()[0]
    stats = None
    try:
        stats = d.memory_stats()
    except Exception:  # noqa: BLE001
        pass
    info = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": d.device_kind,
            "device_count": jax.device_count(), "bytes_limit": (stats or {}).get("bytes_limit"),
            "python": sys.version.split()[0], "peak_gflops_bf16": device_peak_gflops(ctx.toy)}
    for pkg in ("flax", "optax", "orbax-checkpoint", "chex", "tensorflow-datasets", "grain", "torch", "timm"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = p.stdout.strip()
    sink({"kind": "raw", "part": part, "record": info})
    sink(row(part, "device", f"{info['backend']}:{info['device_kind']} x{info['device_count']}",
             note=f"jax {info['jax']}, torch {info['torch']}, python {info['python']}"))


PARTS = {  # name -> (function, seconds it may take on the device)
    "env": (part_env, 40),
    "tests": (part_tests, 110),
    **{w: (part_workload, 75) for w in ("W1", "W2", "W3", "W4", "W5", "W6")},
    "W3_bf16": (part_bf16, 75),
    "seeds_W2": (part_seeds, 100),
    "seeds_W3": (part_seeds, 100),
}


@dataclasses.dataclass
class Ctx:
    toy: bool
    peers: str | None
    peers_python: str
    seeds: int


def run_child(args) -> int:
    """``--child PART``: one part in this (fresh) process, rows appended to ``--rows``."""
    ctx = Ctx(args.toy, args.peers, args.peers_python, args.seeds)
    with open(args.rows, "a") as f:
        def sink(r):
            f.write(json.dumps(r, default=str) + "\n")
            f.flush()

        PARTS[args.child][0](ctx, args.child, sink)
    return 0


# ----------------------------------------------------------------------------- the sequence (parent side)


def _tail(text: str, n: int = 400) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "")[:n]


def run_isolated(name: str, ctx: Ctx, limit: float, log: Path) -> tuple[list, str, str]:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as rf:
        rows_file = rf.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--rows", rows_file,
           "--seeds", str(ctx.seeds), "--peers-python", ctx.peers_python]
    if ctx.toy:
        cmd.append("--toy")
    if ctx.peers:
        cmd += ["--peers", ctx.peers]
    with open(log, "a") as lf:
        lf.write(f"\n===== {name} (limit {limit:.0f} s): {' '.join(cmd)}\n")
        lf.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and the peer it started
            proc.wait()
            status = "timeout"
    out = [json.loads(x) for x in Path(rows_file).read_text().splitlines() if x.strip()]
    os.unlink(rows_file)
    err = ""
    if status != "ok":
        with open(log) as lf:
            text = lf.read()
        err = _tail(text[text.rfind(f"===== {name}"):]) if status == "failed" else f"killed after {limit:.0f} s"
    return out, status, err


def _cpu_s() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_in_process(name: str, ctx: Ctx, limit: float) -> tuple[list, str, str]:
    out = []

    def alarm(signum, frame):
        raise PartTimeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(limit)))
    try:
        PARTS[name][0](ctx, name, out.append)
        status, err = "ok", ""
    except PartTimeout:
        status, err = "timeout", f"stopped after {limit:.0f} s"
    except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
        import traceback

        traceback.print_exc()
        status, err = "failed", f"{type(e).__name__}: {str(e).strip()[:300]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return out, status, err


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(out: Path, rows: list[dict], head: dict) -> None:
    lines = [f"# Accelerator check, {head['date']}", "",
             f"Device: {head.get('device', '?')}. Command: `{head['command']}`. "
             f"Parts: {head['parts']}; {head['elapsed_s']:.0f} s of a {head['budget_s']} s budget"
             + (" (dry run: toy sizes on CPU, figures mean nothing)" if head["toy"] else "") + ".",
             "Ratio: jaxcl / reference (rates: above 1 is faster; s and ms: above 1 is slower). Share of peak: of the "
             "device's dense bf16 matmul rate (the MFU for W3_bf16).", "",
             "| part | figure | jaxcl | unit | reference | ratio | share of peak (ref) | peak device MiB | status "
             "| note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{_fmt(r['ref'])} ({r['ref_name']})" if r.get("ref") is not None else ""
        share = _fmt(r.get("share_of_peak")) + (f" ({_fmt(r['ref_share_of_peak'])})"
                                                 if r.get("ref_share_of_peak") is not None else "")
        mem = f"{r['peak_device_bytes'] / MiB:.0f}" if isinstance(r.get("peak_device_bytes"), (int, float)) else ""
        note = str(r.get("note", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['part']} | {r['figure']} | {_fmt(r['jaxcl'])} | {r.get('unit', '')} | {ref} | "
                     f"{_fmt(r.get('ratio'))} | {share} | {mem} | {r['status']} | {note} |")
    (out / "accelerator.md").write_text("\n".join(lines) + "\n")


def ensure_configs_link() -> None:
    """``jaxcl/configs`` is a git-ignored link to ``configs/`` that a device copy lacks."""
    link = ROOT / "jaxcl" / "configs"
    if not link.exists() and (ROOT / "configs").is_dir():
        with contextlib.suppress(OSError):
            link.symlink_to(Path("..") / "configs")


def run_sequence(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "accelerator-out")
    out.mkdir(parents=True, exist_ok=True)
    ensure_configs_link()
    names = [n for n in PARTS if (not args.only or n in args.only) and n not in (args.skip or [])]
    peers = args.peers
    if peers is None and not args.dry_run:
        peers = next((str(p) for p in (WHL / "peers", SHARED_PEERS) if (p / "common.py").exists()), None)
    ctx = Ctx(args.dry_run, peers, args.peers_python, 2 if args.dry_run and args.seeds == 8 else args.seeds)
    isolate = args.isolate or not args.dry_run
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # room for the peers; peaks are what is used
    if not args.dry_run:  # programs that recur across parts and test workers compile once
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxcl-accelerator-cache")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    log = out / "accelerator.log"
    for f in ("accelerator.jsonl", "accelerator-raw.jsonl", "accelerator.log"):
        (out / f).unlink(missing_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    rows: list[dict] = []
    head = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "budget_s": args.budget, "toy": ctx.toy, "parts": ", ".join(names), "elapsed_s": 0.0}
    for name in names:
        left = deadline - time.monotonic()
        t0, c0 = time.monotonic(), _cpu_s()
        if left < 20:
            got, status, err = [], "skipped", f"{left:.0f} s of the budget left"
        else:
            limit = min(PARTS[name][1] * (3 if ctx.toy else 1), left)
            print(f"[accelerator] {name} (up to {limit:.0f} s)", flush=True)
            got = run_isolated(name, ctx, limit, log) if isolate else run_in_process(name, ctx, limit)
            got, status, err = got
        new = [r for r in got if r.get("kind") == "row"]
        if status != "ok" or not new:
            new.append(row(name, "part", status=status if status != "ok" else "failed",
                           note=err or "the part produced no figure"))
        for r in new:
            r["part_s"], r["part_cpu_s"] = round(time.monotonic() - t0, 1), round(_cpu_s() - c0, 1)
        with open(out / "accelerator.jsonl", "a") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in new)
        with open(out / "accelerator-raw.jsonl", "a") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in got if r.get("kind") == "raw")
        rows += new
        if name == "env" and new and new[0]["status"] == "ok":
            head["device"] = new[0]["jaxcl"]
        head["elapsed_s"] = time.monotonic() - start
        write_table(out, rows, head)
        print(f"[accelerator] {name}: {status} in {time.monotonic() - t0:.0f} s ({_cpu_s() - c0:.0f} s of CPU)",
              flush=True)
    print((out / "accelerator.md").read_text(), flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="download the wheels the device lacks into .whl/")
    ap.add_argument("--dry-run", action="store_true", help="the same sequence on CPU at toy sizes, in this process")
    ap.add_argument("--out", help="where the results go (default: $OUT, else ./accelerator-out)")
    ap.add_argument("--budget", type=int, default=470, help="seconds for all parts together (default 470)")
    ap.add_argument("--only", type=lambda s: s.split(","), help=f"comma-separated parts of: {', '.join(PARTS)}")
    ap.add_argument("--skip", type=lambda s: s.split(","), help="comma-separated parts to leave out")
    ap.add_argument("--seeds", type=int, default=8, help="seeds of the seeds_* parts (dry run: 2)")
    ap.add_argument("--peers", help="the PyTorch peers' folder (device: .whl/peers; dry run: none, unless given)")
    ap.add_argument("--peers-python", default=os.environ.get("JAXCL_PEERS_PYTHON", sys.executable),
                    help="the python that runs the peers (on the device the image's python3 holds torch)")
    ap.add_argument("--isolate", action="store_true", help="dry run: each part in its own process, as on the device")
    ap.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--toy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for names in (args.only or []), (args.skip or []):
        unknown = [n for n in names if n not in PARTS]
        if unknown:
            ap.error(f"--only/--skip: unknown part {unknown[0]!r}; parts: {', '.join(PARTS)}")
    if args.prepare:
        return prepare(args)
    if args.child:
        return run_child(args)
    return run_sequence(args)


if __name__ == "__main__":
    sys.exit(main())
