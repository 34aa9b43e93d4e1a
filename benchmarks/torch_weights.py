"""torchvision's ImageNet models and timm's ViTs, random weights, loaded into jaxcl: do the
logits agree?

The PyTorch half (run in the peers venv, ``../shared/peers/setup.sh``, plus
``pip install safetensors`` there) builds torchvision's models with random weights,
randomises the batch-norm statistics (the fixture script's ``randomise``), and writes each
state dict as safetensors with the eval-mode logits of a fixed 224x224 batch. The jaxcl
half loads each file with ``jaxcl.models.torch_weights`` (the 1000-way classifier kept
as the head) and prints one JSON line per model with the largest absolute logit
difference; it exits 1 if one is above 1e-4.

    python benchmarks/torch_weights.py                        # resnet18 resnet50 vgg16_bn, ~2 min on 2 cores
    python benchmarks/torch_weights.py --models resnet34 vgg16 --batch 4
    python benchmarks/torch_weights.py --models vit_tiny_patch16_224 vit_base_patch16_224

timm's ViTs (``vit_*``: timm.create_model with random weights, randomised at the scale of
trained ones by tests/fixtures/make_vit_fixture.py's ``randomise``) load into jaxcl's
``vit_ti16``/``vit_s16``/``vit_b16``/``vit_l16`` (``TIMM_VITS``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
TOLERANCE = 1e-4
TIMM_VITS = {"vit_tiny_patch16_224": "vit_ti16", "vit_small_patch16_224": "vit_s16",
             "vit_base_patch16_224": "vit_b16", "vit_large_patch16_224": "vit_l16"}


def torch_half(names, batch, out: Path) -> None:
    sys.path.insert(0, str(FIXTURES))
    from make_torch_weights_fixture import randomise  # also makes torchvision importable

    import safetensors.torch
    import torch
    import torchvision

    for name in names:
        torch.manual_seed(0)
        if name in TIMM_VITS:
            import timm
            from make_vit_fixture import randomise as randomise_vit
            model = randomise_vit(timm.create_model(name, pretrained=False))
            x = torch.randn(batch, 3, 224, 224)
            with torch.no_grad():
                logits = model(x)
            safetensors.torch.save_file(model.state_dict(), out / f"{name}.safetensors")
            safetensors.torch.save_file({"x": x, "logits": logits}, out / f"{name}.reference.safetensors")
            continue
        model = getattr(torchvision.models, name)(weights=None)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()  # torch's default init: logits of order 1 (torchvision's VGG uses N(0, 0.01))
        randomise(model, torch.randn(8, 3, 224, 224))
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            logits = model(x)
        safetensors.torch.save_file(model.state_dict(), out / f"{name}.safetensors")
        safetensors.torch.save_file({"x": x, "logits": logits}, out / f"{name}.reference.safetensors")


def jax_half(names, out: Path) -> bool:
    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from jaxcl import models
    from jaxcl.models import torch_weights

    ok = True
    for name in names:
        ref = load_file(out / f"{name}.reference.safetensors")
        x = ref["x"].transpose(0, 2, 3, 1)
        model = models._MODELS[TIMM_VITS.get(name, name)](num_outputs=1000)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # no random init of 138M weights
        t0 = time.perf_counter()
        params, state, n_params, n_stats = torch_weights.load_pretrained(
            {"params": shapes["params"]}, {k: v for k, v in shapes.items() if k != "params"},
            str(out / f"{name}.safetensors"), model, keep_head=True)
        load_s = time.perf_counter() - t0
        logits = np.asarray(jax.jit(model.apply)({**params, **state}, x))
        diff = float(np.abs(logits - ref["logits"]).max())
        ok &= diff <= TOLERANCE
        print(json.dumps({"model": name, "max_abs_diff": diff, "max_abs_logit": float(np.abs(ref["logits"]).max()),
                          "batch": int(x.shape[0]), "arrays": n_params + n_stats, "load_s": round(load_s, 2),
                          "file_mb": round((out / f"{name}.safetensors").stat().st_size / 2**20, 1),
                          "ok": diff <= TOLERANCE}), flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16_bn"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--torch-out", help=argparse.SUPPRESS)  # the PyTorch half, run by the peers' python
    args = ap.parse_args()
    if args.torch_out:
        return torch_half(args.models, args.batch, Path(args.torch_out))
    import common

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([common.PEERS_PYTHON, __file__, "--torch-out", tmp, "--batch", str(args.batch),
                        "--models", *args.models], check=True)
        sys.exit(0 if jax_half(args.models, Path(tmp)) else 1)


if __name__ == "__main__":
    main()
