"""NCCL: neuron calibration for online continual learning (Yin, Yang, Li, NeurIPS 2021).

Every conv and dense layer of the model is *calibrated* by parameters of its own
collection ``calib`` (the base weights theta stay in ``params``):

* weight calibration: ``W~ = W * tile(psi)``, psi ``[O, I]`` for a conv (tiled over the
  kernel window), ``[O]`` for a dense layer (tiled over the inputs), init ones;
* a calibration bias ``b`` (init zeros), the layer's bias;
* feature calibration ``lambda`` ``[O]`` (init ones): the authors' reference block
  multiplies, ``h = lambda * (conv(x, W~) + b)`` (the default,
  ``method.feature_calibration=multiply``); the paper's equation adds the calibrated and
  uncalibrated outputs, ``h = lambda * F(x) + F(x)`` (``=add``); batch norm and the
  activation follow. At the initial values the calibrated model is the plain model.

On a Vision Transformer every dense layer is calibrated (the patch embedding, qkv, the
attention projection, the MLP's two), LayerNorms are not.

Training is online (one pass, small batches) with a replay memory (``method.memory``:
``reservoir`` over everything seen, or ``ring``: ``memory_size`` slots per task, sampling
the earlier tasks, as the reference's per-task memory), storing inputs, labels, task ids
and the model's softmax outputs at insertion. One train step is the whole bilevel call:

* inner loop (``inner_steps`` K, a ``lax.scan``) on theta only, fast weights starting at
  theta: step 1 on the incoming batch, later steps on it plus a replay sample,
  ``CE(in) + gamma (CE(replay) + reg KL(softmax(z_r / T) || q_r))``, SGD at ``inner_lr``
  with the gradient clipped elementwise to ``inner_clip``;
* outer step on the calibration parameters (the run's optimizer, SGD): on a fresh replay
  sample, ``reg KL(softmax(z / T) || q) + sum reg_ewc (g / tile(psi))^2 (W~ - W~_0)^2``,
  g the gradient of the distillation term w.r.t. the calibrated weights (detached, as the
  reference), W~_0 the calibrated weights before the inner loop. Its gradient flows back
  through the inner trajectory: nested ``jax.grad``, second order
  (``method.second_order=true``, default). The authors' reference copies each inner update
  into ``param.data``, which cuts the graph: it is first order in effect, which
  ``second_order=false`` reproduces (the fast weights enter the outer loss as constants).
  ``ewc_grad=last_inner`` takes g from the last inner step with its graph kept instead
  (../shared/peers W4's definition);
* theta takes the fast weights.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.methods import _intercept, _memory, base
from jaxcl.models import layers


def defaults() -> dict:
    return {
        "inner_steps": 5, "inner_lr": 0.01, "inner_clip": 10.0, "gamma": 1.0, "reg": 1.0, "reg_ewc": 1.0,
        "temperature": 2.0, "memory": "reservoir", "memory_size": 200, "replay_batch": 10,
        "second_order": True, "feature_calibration": "multiply", "ewc_grad": "outer", "update_memory": True,
    }


# ----------------------------------------------------------------------------- calibrated layers


class CalibConv(layers.Conv):
    feature_calibration: str = "multiply"

    def adapt(self, kernel, bias, task):
        k, _, cin, cout = kernel.shape
        psi = self.variable("calib", "psi", lambda: jnp.ones((cout, cin))).value  # [O, I]
        b = self.variable("calib", "b", lambda: jnp.zeros((cout,))).value
        kernel = kernel * psi.T[None, None, :, :]  # tiled over the k x k window (HWIO)
        return kernel, b if bias is None else bias + b

    def post(self, y, task):
        lam = self.variable("calib", "lam", lambda: jnp.ones((self.features,))).value
        return y * lam if self.feature_calibration == "multiply" else y * lam + y


class CalibDense(layers.Dense):
    feature_calibration: str = "multiply"

    def adapt(self, kernel, bias, task):
        psi = self.variable("calib", "psi", lambda: jnp.ones((self.features,))).value  # [O]
        b = self.variable("calib", "b", lambda: jnp.zeros((self.features,))).value
        return kernel * psi[None, :], b if bias is None else bias + b

    def post(self, y, task):
        lam = self.variable("calib", "lam", lambda: jnp.ones((self.features,))).value
        return y * lam if self.feature_calibration == "multiply" else y * lam + y


def calibration_hook(feature_calibration: str):
    """The calibration of a plain ``flax.linen`` Dense or Conv (through interception):
    ``psi`` is created here and applied to the kernel by :func:`scale_kernels` (the layer
    reads its own kernel), ``b`` and ``lambda`` act on the output."""

    def hook(layer, x, y, task, call):
        o = y.shape[-1]
        shape = (o, x.shape[-1] // layer.feature_group_count) if isinstance(layer, nn.Conv) else (o,)
        layer.variable("calib", "psi", lambda: jnp.ones(shape))
        b = layer.variable("calib", "b", lambda: jnp.zeros((o,))).value
        lam = layer.variable("calib", "lam", lambda: jnp.ones((o,))).value
        y = y + b
        return y * lam if feature_calibration == "multiply" else y * lam + y

    return hook


def scale_kernels(params, calib):
    """``params`` with every calibrated kernel W replaced by ``W * tile(psi)``."""
    scaled = calibrated_weights(params, calib)

    def visit(p, prefix):
        return {k: visit(v, prefix + (k,)) if isinstance(v, dict)
                else (v * scaled[prefix][1] if k == "kernel" and prefix in scaled else v) for k, v in p.items()}

    return visit(params, ())


def calibrated(model, feature_calibration: str = "multiply"):
    """``model`` with every conv and dense layer calibrated: a jaxcl model by its layer
    classes, any other Flax model by intercepting its ``Dense``/``Conv`` layers."""
    if _intercept.is_plain(model, ("conv", "dense")):
        return _intercept.Intercepted(model, calibration_hook(feature_calibration))
    kw = {}
    if hasattr(model, "conv"):
        kw["conv"] = functools.partial(CalibConv, feature_calibration=feature_calibration)
    if hasattr(model, "dense"):
        kw["dense"] = functools.partial(CalibDense, feature_calibration=feature_calibration)
    if not kw:
        raise ValueError(f"NCCL calibrates conv and dense layers; {type(model).__name__} has none")
    return model.clone(**kw)


def calibrated_weights(params, calib):
    """{path: (W, tile(psi))} of every calibrated kernel (the W of the EWC term)."""
    out = {}

    def visit(p, c, prefix):
        for k, v in p.items():
            if isinstance(v, dict):
                visit(v, c.get(k, {}) if isinstance(c, dict) else {}, prefix + (k,))
        if "kernel" in p and isinstance(c, dict) and "psi" in c:
            w, psi = p["kernel"], c["psi"]
            out[prefix] = (w, psi.T[None, None] if w.ndim == 4 else psi[None, :])

    visit(params, calib, ())
    return out


# ----------------------------------------------------------------------------- the method


def validate(config) -> None:
    m = config.method
    for key, allowed in (("memory", ("reservoir", "ring")), ("feature_calibration", ("multiply", "add")),
                         ("ewc_grad", ("outer", "last_inner"))):
        base.check_choice(m, key, allowed)
    for key in ("inner_steps", "memory_size", "replay_batch"):
        base.check_range(m, key, 1)
    for key in ("inner_lr", "inner_clip", "gamma", "reg", "reg_ewc"):
        base.check_range(m, key, 0)
    base.check_range(m, "temperature", 0, strict=True)


def make(config, model, info) -> base.Method:
    validate(config)
    m = config.method
    num_tasks, temp, K = info.num_tasks, float(m.temperature), int(m.inner_steps)
    cmodel = calibrated(model, m.feature_calibration)
    # plain Flax layers read their own kernel: psi is applied to it before the call
    pre = scale_kernels if isinstance(cmodel, _intercept.Intercepted) else (lambda theta, calib: theta)
    ring = m.memory == "ring"

    def forward(theta, calib, model_state, x, task, rng):
        return base.apply(cmodel, {"params": pre(theta, calib), "calib": calib}, model_state, x, task, train=True,
                          rng=rng)

    def kl_to_stored(z, q):
        """KL(softmax(z / T) || q) = sum p (log p - log q), per sample (the issue's and W4's
        definition; the authors' KLDivLoss(log_softmax(z / T), q) is the reverse, KL(q || p))."""
        logp = jax.nn.log_softmax(z / temp, -1)
        return jnp.sum(jnp.exp(logp) * (logp - jnp.log(jnp.maximum(q, 1e-12))), -1)

    def init(rng, x):
        state = base.init_state(cmodel, rng, x)
        if "calib" not in state.params:
            raise ValueError(f"NCCL calibrates conv and dense layers (flax.linen Dense/Conv or jaxcl layers); "
                             f"{type(model).__name__} has none")
        mem = _memory.new(m.memory, m.memory_size, x.shape[1:], info.num_outputs, num_tasks=num_tasks)
        trainable = jax.tree_util.tree_map_with_path(
            lambda p, w: jnp.asarray(getattr(p[0], "key", None) == "calib"), state.params)
        return state.replace(trainable=trainable, extra={"memory": mem})

    def inner(theta, calib, model_state, batch, task, rng, memory):
        """The K inner SGD steps on theta (fast weights): step 1 on the incoming batch alone,
        steps 2..K (a ``lax.scan``) on it plus a replay sample, in one forward. Returns the
        fast weights, the batch-norm statistics, per-step losses, the incoming batch's
        logits at step 1 (its soft targets) and the last step's gradient."""
        allowed = memory["task"] < task if ring else None
        x, y, msk = batch["x"], batch["y"], batch["mask"]
        b = x.shape[0]
        n_in = jnp.maximum(msk.sum(), 1.0)
        clip = (lambda g: jax.tree_util.tree_map(lambda v: jnp.clip(v, -m.inner_clip, m.inner_clip), g)) \
            if m.inner_clip > 0 else (lambda g: g)

        def sgd(fast, g):
            return jax.tree_util.tree_map(lambda p, v: p - m.inner_lr * v, fast, clip(g))

        def first_loss(fast, ms):
            z, ms = forward(fast, calib, ms, x, task, rng)
            return jnp.sum(optax_ce(z, y) * msk) / n_in, (ms, z)

        (l0, (ms, z_first)), g0 = jax.value_and_grad(first_loss, has_aux=True)(theta, model_state)
        fast = sgd(theta, g0)

        def replay_loss(fast, ms, key):
            rep, have = _memory.memory_sample(memory, key, m.replay_batch, allowed)
            z, ms = forward(fast, calib, ms, jnp.concatenate([x, rep["x"]]),
                            jnp.concatenate([jnp.broadcast_to(task, (b,)), rep["task"]]), key)
            z_in, z_r = z[:b], z[b:]
            ce_in = jnp.sum(optax_ce(z_in, y) * msk) / n_in
            replay = jnp.mean(optax_ce(z_r, rep["y"])) + m.reg * jnp.mean(kl_to_stored(z_r, rep["q"]))
            return ce_in + jnp.where(have, m.gamma * replay, 0.0), ms

        def body(carry, k):
            fast, ms, _ = carry
            (loss, ms), g = jax.value_and_grad(replay_loss, has_aux=True)(fast, ms, jax.random.fold_in(rng, k))
            return (sgd(fast, g), ms, g), loss

        # unroll: XLA:CPU runs convolutions inside a loop body on a slow path (measured on W4:
        # 21 s per call rolled, 3.8 s unrolled); the scan stays one scan in the program
        (fast, ms, last_g), losses = jax.lax.scan(body, (fast, ms, g0), jnp.arange(1, K), unroll=True)
        return fast, ms, jnp.concatenate([l0[None], losses]), z_first, last_g

    def loss(params, state, batch, task, rng, phase):
        theta, calib = params["params"], params["calib"]
        memory = state.extra["memory"]
        fast, ms, losses, z_first, last_g = inner(theta, calib, state.model_state, batch, task, rng, memory)
        fast_out = fast if m.second_order else jax.lax.stop_gradient(fast)
        rep, have = _memory.memory_sample(memory, jax.random.fold_in(rng, 10_000), m.replay_batch,
                                          (memory["task"] < task) if ring else None)

        def distill(fast_w, cal):
            z, ms2 = forward(fast_w, cal, ms, rep["x"], rep["task"], rng)
            return m.reg * jnp.mean(kl_to_stored(z, rep["q"])), ms2

        # the distillation value (differentiated by the outer grad) and its gradient w.r.t.
        # the weights (a constant, as the reference's .detach()) from one forward/backward
        (kd, ms_out), g_theta = jax.value_and_grad(distill, has_aux=True)(fast_out, calib)
        cw_now = calibrated_weights(fast_out, calib)
        # W~ before the inner loop: constants, from the state the step starts from
        cw_start = calibrated_weights(state.params["params"], state.params["calib"])
        g_src = jax.lax.stop_gradient(g_theta) if m.ewc_grad == "outer" else last_g  # W4: last inner step, graph kept
        g_w = calibrated_weights(g_src, calib)
        ewc = 0.0
        for path, (w, tile) in cw_now.items():
            g = g_w[path][0] / (tile + 1e-12)  # dL/dW~ = (dL/dW) / tile(psi)
            if m.ewc_grad == "outer":
                g = jax.lax.stop_gradient(g)  # the reference's pg.detach(): a constant importance
            w0, tile0 = cw_start[path]
            ewc = ewc + jnp.sum(m.reg_ewc * g ** 2 * (w * tile - w0 * tile0) ** 2)
        outer = jnp.where(have, kd + ewc, 0.0)
        return outer, {"model_state": ms_out, "fast": jax.lax.stop_gradient(fast),
                       "soft_targets": jax.lax.stop_gradient(jax.nn.softmax(z_first, -1)),
                       "metrics": {"inner_first": losses[0], "inner_last": losses[-1], "outer_kd": kd,
                                   "outer_ewc": ewc, "acc": base.accuracy(z_first, batch["y"], batch["mask"])}}

    def after_step(state, aux, batch, task, rng, phase):
        params = {**state.params, "params": aux["fast"]}  # theta takes the fast weights
        mem = state.extra["memory"]
        if m.update_memory:
            mem = _memory.insert(mem, batch, task, aux["soft_targets"], jax.random.fold_in(rng, 20_000))
        return state.replace(params=params, extra={**state.extra, "memory": mem})

    def predict(state, x, task):
        params = {**state.params, "params": pre(state.params["params"], state.params["calib"])}
        return base.apply(cmodel, params, state.model_state, x, task, train=False)[0]

    return base.make("nccl", config, cmodel, init=init, loss=loss, after_step=after_step, predict=predict)


def optax_ce(logits, labels):
    """Per-sample softmax cross-entropy."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

