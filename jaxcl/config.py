"""Run configuration: the schema every benchmark config starts from, and its checks.

A benchmark config (``configs/<benchmark>.py``) calls :func:`base_config`, changes what
its benchmark needs, and returns :func:`finalize` of it. ``finalize`` merges the chosen
method's defaults into ``config.method`` and locks the dict, so that a misspelt key
(``--set method.ewc_lamda=1``) is refused by name instead of silently added.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import json
from typing import Any, Mapping

import ml_collections

# The methods raise it from their validate(); the config layer re-exports it (one class:
# jaxcl.config.ConfigError is jaxcl.methods.base.ConfigError).
from jaxcl.methods.base import ConfigError

SCENARIOS = ("task", "class", "domain")
STREAMS = ("split", "permuted", "rotated", "multi")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
# Sections that do not change what a run computes: a checkpoint written under other
# values of these keys may be resumed.
NON_RESULT_SECTIONS = ("log", "checkpoint", "mesh", "loop")
# Keys that change where the work is done but not what it computes (up to float rounding).
NON_RESULT_KEYS = ("data.on_device", "data.grain_workers")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with its default."""
    c = ml_collections.ConfigDict()
    c.benchmark = "custom"
    c.seed = 0
    c.seeds = ()  # train these seeds at once in one program (--seeds); () = just `seed`
    c.sweep = ()  # ("KEY=v1,v2,...", ...): a grid of numeric settings trained at once in one program (--sweep)
    c.num_tasks = 5
    c.epochs = 1
    c.batch_size = 32
    c.eval_batch_size = 512
    c.scenario = "task"  # task | class | domain
    c.online = False  # one pass over each task (epochs forced to 1)

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100 | any TFDS name
    c.data.source = "auto"  # auto | sklearn | npz | tfds
    c.data.dir = ""  # folder of <name>.npz files; falls back to $JAXCL_DATA_DIR
    c.data.stream = "split"  # split | permuted | rotated | multi
    c.data.classes_per_task = 2  # split streams; multi streams: 0 = one task per dataset
    c.data.class_order = ()  # split streams: explicit order of the classes
    c.data.shuffle_classes = False  # split streams: class order drawn from the seed
    c.data.superclass_tasks = False  # split streams: one task per superclass (CIFAR-100 coarse labels)
    c.data.datasets = ()  # multi streams: one dataset per task
    c.data.tasks = ()  # multi streams: keep only these task indices (e.g. (2,) to learn task 2 alone)
    c.data.image_shape = ()  # multi streams: (H, W, C) every dataset is brought to (default: the largest)
    c.data.angles = ()  # rotated streams: degrees per task (default: evenly spaced)
    c.data.max_angle = 180.0
    c.data.normalize = True
    c.data.augment = False  # random crop (pad 4) and horizontal flip, on device
    c.data.train_limit = 0  # keep at most this many training samples per task (0: all)
    c.data.test_limit = 0
    c.data.label_key = "label"  # TFDS feature holding the label (cifar100: coarse_label)
    c.data.download = False  # let TFDS download and prepare a missing dataset
    c.data.tfds_dir = ""  # TFDS data_dir (default: TFDS's own)
    c.data.tfds_splits = ("train", "test")  # the TFDS splits read as train and test (e.g. test[:80%], test[80%:])
    c.data.num_classes = 0  # classes of data.name (0: the dataset's own, or those found in y_train)
    c.data.allow_missing_classes = False  # let a task hold a class with no training or test samples
    c.data.on_device = "auto"  # auto | true | false: keep the stream in device memory (auto: when it fits)
    c.data.pipeline = "memory"  # memory | grain | auto: arrays in host memory, or a grain pipeline streaming from disk
    c.data.image_size = 0  # resize every image to this many pixels square as it is read (0: as stored)
    c.data.grain_workers = -1  # data.pipeline=grain: worker processes that read, decode and resize (-1: half the CPUs, 0: none)
    c.data.memory_budget_mb = 0.0  # data.pipeline=auto: the most MiB of images kept in memory (0: a quarter of the host's)

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # see `jaxcl list`
    c.model.hidden = (400, 400)  # mlp
    c.model.activation = "relu"  # mlp: relu | tanh
    c.model.dropout = 0.0  # mlp and the ViTs (attention, MLP and residual dropout)
    c.model.width = 0  # resnets and cnn: base width (0: the model's own default)
    c.model.depth = 0  # the ViTs: blocks (0: the model's own, e.g. 12 for vit_b16)
    c.model.stages = ()  # the ResNets: blocks per stage, e.g. (1, 1) (empty: the model's own, (2, 2, 2, 2) for resnet18)
    c.model.init = "torch"  # torch (PyTorch module defaults) | flax
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.pretrained = ""  # a jaxcl run (workdir) or a torchvision/timm .safetensors file: the trunk (all but the heads)

    c.method = ml_collections.ConfigDict()
    c.method.name = "finetune"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.0
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 0.0  # L2 added to the gradient, as torch.optim.SGD/Adam
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip = 0.0  # global-norm clipping (0: off)
    c.optimizer.schedule = "constant"  # constant | step | cosine, stepped per epoch
    c.optimizer.milestones = ()  # step schedule: epochs at which lr *= gamma
    c.optimizer.gamma = 0.1
    c.optimizer.reset_per_task = True  # fresh optimizer state at each task (and each later phase of it)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # also save every N train steps (0: after each task only)
    c.checkpoint.keep = 2

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.progress = True
    c.log.tensorboard = True
    c.log.plots = True
    # jax.profiler traces of the train calls into WORKDIR/profile (TensorBoard's profile
    # plugin, xprof and Perfetto read them): profile_steps train steps (whole calls; 0: no
    # trace) from the first call after profile_after steps of the run, once compiled
    c.log.profile_steps = 0
    c.log.profile_after = 10

    c.loop = ml_collections.ConfigDict()
    c.loop.steps_per_call = "auto"  # train steps per compiled call; auto or an integer >= 1
    # how a call runs its steps: scan (a lax.scan, one copy of the step compiled), unrolled (K copies in a
    # row, padding steps masked with jnp.where: no step inside a loop or conditional), auto (unrolled on
    # CPU when the model has a convolution, which XLA:CPU runs ~20x slower inside a loop; else scan)
    c.loop.chunk = "auto"
    # how several runs (--seeds, a sweep) share one program: vmap (a leading run axis, every compiled function
    # vmapped), map (each function compiled for one run and called for every run of a run group in turn, the
    # groups of mesh.runs side by side), auto (map on CPU
    # when the model has a convolution, which XLA:CPU runs ~7x slower vmapped, as a grouped convolution; else vmap)
    c.loop.run_axis = "auto"

    c.mesh = ml_collections.ConfigDict()
    # run groups: the runs of seeds/sweep (a leading axis of one program) are split over
    # this many groups of data x fsdp devices; must divide the number of runs. -1 (auto):
    # as many groups as the devices and the runs allow (one run per device when they
    # match; one group with grain over several processes: jaxcl.train.auto_runs)
    c.mesh.runs = -1
    c.mesh.data = -1  # devices on the `data` axis (-1: all the devices `fsdp` leaves)
    c.mesh.fsdp = 1  # devices on the `fsdp` axis: parameters and the trees that shadow them are split along it
    c.mesh.min_shard_bytes = 65536  # leaves smaller than this (counted as float32) stay replicated
    return c


def method_module(name: str):
    """The module ``jaxcl.methods.<name>``, or a ConfigError listing the known ones."""
    from jaxcl import methods

    if name not in methods.available():
        raise ConfigError(
            f"method.name: unknown method {name!r}; known: {', '.join(methods.available())}"
        )
    return importlib.import_module(f"jaxcl.methods.{name}")


def parse_arg(arg: str | None) -> dict[str, str]:
    """``'method=ewc,foo=bar'`` -> ``{'method': 'ewc', 'foo': 'bar'}``."""
    out: dict[str, str] = {}
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ConfigError(f"config argument {part!r} is not of the form key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def finalize(
    c: ml_collections.ConfigDict,
    arg: str | None = None,
    method_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> ml_collections.ConfigDict:
    """Apply ``arg`` (``method=NAME``), the method's defaults and this benchmark's
    overrides for it, then lock the config."""
    args = parse_arg(arg)
    name = args.pop("method", c.method.name)
    if args:
        raise ConfigError(f"unknown config argument(s): {', '.join(args)} (only method=NAME)")
    set_method(c, name)
    for key, value in (method_overrides or {}).get(name, {}).items():
        _assign(c, key, value)
    c.lock()
    return c


def set_method(c: ml_collections.ConfigDict, name: str) -> None:
    """Replace ``c.method`` by ``name``'s defaults (see each method's ``defaults()``)."""
    module = method_module(name)
    m = ml_collections.ConfigDict({"name": name, **module.defaults()})
    with c.unlocked():
        c.method = m


def check_method_keys(c: ml_collections.ConfigDict) -> None:
    """``config.method`` holds exactly the settings of ``method.name`` (a method switched
    by assigning ``config.method.name`` keeps the old method's settings: refused, naming
    them and the way to switch)."""
    name = c.method.name
    want = set(method_module(name).defaults())
    have = set(c.method.keys()) - {"name"}
    missing, stale = sorted(want - have), sorted(have - want)
    if missing or stale:
        what = "; ".join(filter(None, (
            f"it lacks {name}'s setting(s) {', '.join(f'method.{k}' for k in missing)}" if missing else "",
            f"it holds {', '.join(f'method.{k}' for k in stale)}, which {name} does not have" if stale else "")))
        raise ConfigError(f"method.name: {name!r}, but config.method is not {name}'s ({what}): switch methods with "
                          f"jaxcl.config.set_method(config, {name!r}) (it takes {name}'s defaults), "
                          f"--set method.name={name}, or the config argument method={name}")


def _lookup(c: ml_collections.ConfigDict, key: str):
    parts = key.split(".")
    node = c
    for i, p in enumerate(parts):
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if p not in known:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{k}" if prefix else k for k in known]
            hint = difflib.get_close_matches(key, full, n=1)
            raise ConfigError(
                f"unknown config key {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else f"; {prefix or 'config'} has: {', '.join(known)}")
            )
        if i < len(parts) - 1:
            node = node[p]
    return node, parts[-1]


def parse_value(text: str, current: Any) -> Any:
    """Parse a command-line value to the type of the current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, str) and value:
            return tuple(v.strip() for v in value.split(","))
        return (value,)
    return value


def _assign(c: ml_collections.ConfigDict, key: str, value: Any) -> None:
    node, leaf = _lookup(c, key)
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (
        current is not None
        and not isinstance(current, ml_collections.ConfigDict)
        and not isinstance(value, type(current))
    ):
        raise ConfigError(
            f"{key}: expected a value of type {type(current).__name__} (like {current!r}), got {value!r}"
        )
    node[leaf] = value


def override(c: ml_collections.ConfigDict, assignments: list[str]) -> ml_collections.ConfigDict:
    """Apply ``KEY=VALUE`` strings (``--set``) to a copy of ``c``. ``method.name=X``
    switches method first, taking X's defaults, so it may be combined with X's keys."""
    c = ml_collections.ConfigDict(c.to_dict())  # unlocked copy
    pairs = []
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--set {a!r}: expected KEY=VALUE")
        k, v = a.split("=", 1)
        pairs.append((k.strip(), v.strip()))
    for k, v in pairs:
        if k == "method.name":
            set_method(c, v)
    c.lock()
    for k, v in pairs:
        if k == "method.name":
            continue
        node, leaf = _lookup(c, k)
        _assign(c, k, parse_value(v, node[leaf]))
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Refuse values no run can use, naming the key."""
    from jaxcl import models

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    check_method_keys(c)
    need(c.scenario in SCENARIOS, f"scenario: {c.scenario!r} is not one of {', '.join(SCENARIOS)}")
    need(c.data.stream in STREAMS, f"data.stream: {c.data.stream!r} is not one of {', '.join(STREAMS)}")
    need(c.num_tasks >= 1, f"num_tasks: must be >= 1, got {c.num_tasks}")
    need(c.epochs >= 1, f"epochs: must be >= 1, got {c.epochs}")
    need(c.batch_size >= 1, f"batch_size: must be >= 1, got {c.batch_size}")
    need(c.eval_batch_size >= 1, f"eval_batch_size: must be >= 1, got {c.eval_batch_size}")
    need(c.optimizer.name in OPTIMIZERS, f"optimizer.name: {c.optimizer.name!r} is not one of {', '.join(OPTIMIZERS)}")
    need(c.optimizer.lr > 0, f"optimizer.lr: must be > 0, got {c.optimizer.lr}")
    need(
        c.optimizer.schedule in SCHEDULES,
        f"optimizer.schedule: {c.optimizer.schedule!r} is not one of {', '.join(SCHEDULES)}",
    )
    need(c.model.name in models.available(), f"model.name: unknown model {c.model.name!r}; known: {', '.join(models.available())}")
    need(c.model.init in ("torch", "flax"), f"model.init: {c.model.init!r} is not one of torch, flax")
    need(c.model.dtype in ("float32", "bfloat16"), f"model.dtype: {c.model.dtype!r} is not one of float32, bfloat16")
    need(isinstance(c.model.depth, int) and c.model.depth >= 0, f"model.depth: must be an integer >= 0, got {c.model.depth!r}")
    need(not c.model.depth or c.model.name in models.VITS,
         f"model.depth={c.model.depth}: only the ViTs ({', '.join(models.VITS)}) take a depth, not {c.model.name!r}")
    stages = tuple(c.model.stages)
    need(all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in stages),
         f"model.stages: blocks per stage, integers >= 1, got {stages}")
    need(not stages or c.model.name in models.RESNETS,
         f"model.stages={stages}: only the ResNets ({', '.join(models.RESNETS)}) take stages, not {c.model.name!r}")
    need(c.data.train_limit >= 0 and c.data.test_limit >= 0, "data.train_limit/test_limit: must be >= 0")
    need(c.data.num_classes >= 0, f"data.num_classes: must be >= 0, got {c.data.num_classes}")
    need(str(c.data.on_device).lower() in ("auto", "true", "false"),
         f"data.on_device: {c.data.on_device!r} is not one of auto, true, false")
    need(c.data.pipeline in ("memory", "grain", "auto"),
         f"data.pipeline: {c.data.pipeline!r} is not one of memory, grain, auto")
    need(len(c.data.tfds_splits) == 2 and all(isinstance(s, str) and s for s in c.data.tfds_splits),
         f"data.tfds_splits: expected two TFDS split names (train, test), got {tuple(c.data.tfds_splits)}")
    need(c.data.image_size >= 0, f"data.image_size: must be >= 0 (0: as stored), got {c.data.image_size}")
    need(c.data.grain_workers >= -1, f"data.grain_workers: must be -1 (auto), 0 or more, got {c.data.grain_workers}")
    need(c.data.memory_budget_mb >= 0, f"data.memory_budget_mb: must be >= 0 (0: auto), got {c.data.memory_budget_mb}")
    for key in ("profile_steps", "profile_after"):
        v = c.log[key]
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"log.{key}: must be an integer >= 0, got {v!r}")
    steps_per_call(c)
    need(c.loop.chunk in CHUNKS, f"loop.chunk: {c.loop.chunk!r} is not one of {', '.join(CHUNKS)}")
    need(c.loop.run_axis in RUN_AXES, f"loop.run_axis: {c.loop.run_axis!r} is not one of {', '.join(RUN_AXES)}")
    seeds = tuple(c.seeds)
    need(all(isinstance(s, int) and not isinstance(s, bool) for s in seeds), f"seeds: expected integers, got {seeds}")
    need(all(s >= 0 for s in seeds), f"seeds: every seed must be an integer >= 0, got {seeds}")
    need(isinstance(c.seed, int) and c.seed >= 0, f"seed: must be an integer >= 0, got {c.seed!r}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    need(not dup, f"seeds: {dup} given more than once")
    n_runs = len(sweep_settings(c)) * len(run_seeds(c))
    need(isinstance(c.mesh.runs, int) and (c.mesh.runs >= 1 or c.mesh.runs == -1),
         f"mesh.runs: must be an integer >= 1, got {c.mesh.runs!r} (or -1: chosen from the devices and the runs)")
    need(c.mesh.runs == -1 or n_runs % c.mesh.runs == 0,
         f"mesh.runs={c.mesh.runs} does not divide the {n_runs} runs (seeds x sweep settings); "
         f"use a divisor of {n_runs}")
    _validate_sweep(c, sweep_settings(c))
    need(c.mesh.fsdp >= 1, f"mesh.fsdp: must be >= 1, got {c.mesh.fsdp}")
    need(c.mesh.data == -1 or c.mesh.data >= 1, f"mesh.data: must be -1 (all devices) or >= 1, got {c.mesh.data}")
    method_module(c.method.name).validate(c)


def _validate_sweep(c: ml_collections.ConfigDict, settings: list[dict]) -> None:
    """Every swept value passes the checks its key gets from ``--set``: each value alone
    first (the message names it), then each setting of the grid."""
    if not c.sweep:
        return
    seen = set()
    for st in settings:
        for k, v in st.items():
            if (k, v) not in seen:
                seen.add((k, v))
                _validate_setting(c, {k: v}, f"--sweep {k}={v:g}")
    if len(settings[0]) > 1:
        for st in settings:
            _validate_setting(c, st, f"--sweep setting {setting_name(st)}")


def _validate_setting(c: ml_collections.ConfigDict, setting: dict, where: str) -> None:
    try:
        # one setting alone: the grid's layout (mesh.runs over all its runs) was checked above
        validate(override(c, ["sweep=()", "mesh.runs=1"] + [f"{k}={v!r}" for k, v in setting.items()]))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


CHUNKS = ("auto", "scan", "unrolled")
RUN_AXES = ("auto", "vmap", "map")


def steps_per_call(c: ml_collections.ConfigDict) -> int | None:
    """``loop.steps_per_call`` as an integer, or None for auto."""
    v = c.loop.steps_per_call
    if isinstance(v, str) and v.strip().lower() == "auto":
        return None
    try:
        k = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"loop.steps_per_call: expected auto or an integer >= 1, got {v!r}") from None
    if k < 1 or str(k) != str(v).strip():
        raise ConfigError(f"loop.steps_per_call: expected auto or an integer >= 1, got {v!r}")
    return k


# Keys that shape the program (array sizes, data, devices, files): never swept.
STRUCTURAL_SECTIONS = ("data", "model", "mesh", "log", "checkpoint", "loop")
STRUCTURAL_KEYS = ("benchmark", "seed", "seeds", "sweep", "num_tasks", "epochs", "batch_size", "eval_batch_size",
                   "scenario", "online", "method.name", "optimizer.name", "optimizer.schedule")


def sweep_settings(c: ml_collections.ConfigDict) -> list[dict]:
    """``sweep`` as the grid of settings it spans, each a dict KEY -> float, in the
    order given (the last key varies fastest); ``[{}]`` when nothing is swept. A
    structural key, a non-numeric key, an unknown key or a value that is not a number
    is refused by name."""
    import itertools

    axes = []
    for entry in c.sweep:
        if "=" not in str(entry):
            raise ConfigError(f"--sweep {entry!r}: expected KEY=v1,v2,...")
        key, values = (x.strip() for x in str(entry).split("=", 1))
        node, leaf = _lookup(c, key)
        current = node[leaf]
        if key.split(".")[0] in STRUCTURAL_SECTIONS or key in STRUCTURAL_KEYS or isinstance(current, bool) \
                or not isinstance(current, float):
            raise ConfigError(f"--sweep {key}: {key} is structural (it holds {current!r}, which shapes the program: "
                              "array sizes, data or control flow); only numeric hyperparameters such as optimizer.lr "
                              "or method weights can be swept in one program; run other values as separate runs")
        parsed = []
        for v in filter(None, (x.strip() for x in values.split(","))):
            try:
                parsed.append(float(ast.literal_eval(v)))
            except (ValueError, SyntaxError, TypeError):
                raise ConfigError(f"--sweep {key}: {v!r} is not a number") from None
        if not parsed:
            raise ConfigError(f"--sweep {key}: no values given")
        if len(set(parsed)) != len(parsed):
            raise ConfigError(f"--sweep {key}: a value is given more than once: {parsed}")
        if key in [a[0] for a in axes]:
            raise ConfigError(f"--sweep {key}: swept twice")
        axes.append((key, parsed))
    return [dict(zip([a[0] for a in axes], combo)) for combo in itertools.product(*[a[1] for a in axes])]


def setting_name(setting: dict) -> str:
    """A sweep setting as a folder name: ``optimizer.lr=0.1,method.ewc_lambda=10``."""
    return ",".join(f"{k}={v:g}" for k, v in setting.items())


def run_seeds(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The seeds a run trains: ``seeds`` when given, else ``(seed,)``."""
    return tuple(c.seeds) or (c.seed,)


def to_json(c: ml_collections.ConfigDict) -> str:
    return json.dumps(c.to_dict(), sort_keys=True, default=list)


def fingerprint(c: ml_collections.ConfigDict) -> dict:
    """The part of the config that determines the results (for resume checks)."""
    d = json.loads(to_json(c))
    for k in NON_RESULT_SECTIONS:
        d.pop(k, None)
    for k in NON_RESULT_KEYS:
        section, key = k.split(".")
        d.get(section, {}).pop(key, None)
    return d
