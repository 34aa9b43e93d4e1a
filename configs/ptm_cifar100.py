"""Split CIFAR-100 on a pretrained ViT-B/16: 10 tasks of 10 classes, class-incremental (no
task id at test time), images resized to 224, inputs in [0, 1] (``data.normalize=False``:
the L2P code's ``norm_01``, CODA-Prompt's and RanPAC's ``ToTensor`` alone), the trunk from
a timm ``.safetensors`` file (``model.pretrained``), the pretrained-model methods' own
settings per ``:method=``.

    # the weights (in the peers venv, or anywhere timm can download):
    python -c "import timm, safetensors.torch as st; \
st.save_file(timm.create_model('vit_base_patch16_224.orig_in21k', pretrained=True).state_dict(), 'vit_b16_in21k.safetensors')"
    jaxcl run ptm_cifar100:method=l2p --set model.pretrained=vit_b16_in21k.safetensors --set data.download=true

Per method: its paper's code, its paper's figure (final average accuracy over the 10 tasks
/ forgetting, ViT-B/16 ImageNet-21k) as the target, and the estimated time on one
H100/H200-class GPU (ViT-B/16 at 224: ~35 GFLOP a forward pass; not measured; the 32->224
resize runs in grain workers, ``data.grain_workers``). None of these is reproduced here
(no weights, no GPU): see benchmarks/RESULTS.md.

* ``l2p`` (google-research/l2p ``configs/cifar100_l2p.py``): pool 10, prompt length 10,
  top-4, batchwise selection, pull 1.0, Adam, constant lr 0.03 x batch/256 (the code scales
  it so) at batch 128 (its 16 per device on 8 devices), gradient clipping 1.0, 5 epochs.
  Target 83.83 / 7.63 (L2P paper, Table 1; the official code rerun by the l2p-pytorch
  port: 82.59 / 7.88). The weights are the original ImageNet-21k
  ViT-B/16 (``ViT-B_16.npz``; timm's ``orig_in21k``). ~10-20 min.
* ``dualprompt`` (``configs/cifar100_dualprompt.py``): G-prompt length 5 on blocks 0-1,
  E-prompts length 5 on blocks 2-4, pool 10, pull 1.0, Adam lr 0.03 x 192/256 at batch 192
  (24 per device on 8 devices: the devices are our assumption), clipping 1.0, 5 epochs.
  Target 86.51 / 5.16 (DualPrompt paper, Table 1; the official code rerun by the
  dualprompt-pytorch port: 85.59 / 5.03). ~10-20 min.
* ``coda_prompt`` (GT-RIPL/CODA-Prompt ``configs/cifar-100_prompt.yaml``,
  ``experiments/cifar-100.sh``): pool 100, length 8, blocks 0-4, ortho 0, Adam lr 1e-3
  (b1 0.9), cosine over 20 epochs, batch 128. Its code loads timm's
  ``vit_base_patch16_224`` (ImageNet-21k pretrained, fine-tuned on 1k): pass that file.
  Target 86.25 (CODA-Prompt paper, Table 1, as we recall it: not checked against the table
  here). ~40-80 min.
* ``simplecil``: prototypes of the frozen model, no training. Target 83.4, the "NCM only"
  row of RanPAC's ``paper_tables/Table_data_main_cifar224.csv`` (cosine nearest class
  mean on ``vit_base_patch16_224_in21k``); the SimpleCIL paper reports its own figure
  with the same backbone (not checked here). ~2 min.
* ``ranpac`` (RanPAC/RanPAC ``args/cifar224_publish.csv`` row 4: M = 10,000, no Phase 1):
  target 89.0, the "No Phase 1" row of the same table (92.2 with Phase 1, which jaxcl
  does not provide). ~3 min.
* any other method (``finetune``, ``ewc``, ...): the whole ViT trains, SGD lr 0.01
  momentum 0.9, batch 128, 5 epochs: the comparison's lower bound.

    jaxcl run ptm_cifar100:runlocal=1,method=l2p    # vit_cifar at 32x32, 64 images a task: a smoke test
"""
from jaxcl import config as cfglib
from jaxcl.configs import _ptm


def get_config(arg=None):
    args = cfglib.parse_arg(arg)
    runlocal = args.pop("runlocal", "0") not in ("0", "false", "False", "")
    c = cfglib.base_config()
    c.benchmark = "ptm_cifar100"
    c.num_tasks = 10
    c.scenario = "class"
    c.epochs = 5
    c.batch_size = 128
    c.eval_batch_size = 256
    c.data.name = "cifar100"
    c.data.source = "tfds"
    c.data.stream = "split"
    c.data.classes_per_task = 10
    c.data.normalize = False
    c.data.image_size = 224
    c.data.pipeline = "grain"
    c.model.name = "vit_b16"
    c.method.name = "l2p"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    adam = {"optimizer.name": "adam", "optimizer.momentum": 0.0, "optimizer.grad_clip": 1.0}
    per_method = {
        "l2p": {**adam, "optimizer.lr": 0.03 * 128 / 256},
        "dualprompt": {**adam, "batch_size": 192, "optimizer.lr": 0.03 * 192 / 256},
        "coda_prompt": {"optimizer.name": "adam", "optimizer.momentum": 0.0, "optimizer.lr": 1e-3,
                        "optimizer.schedule": "cosine", "epochs": 20},
        "simplecil": {},
        "ranpac": {},
    }
    if runlocal:
        per_method = _ptm.runlocal(c, per_method)
    return cfglib.finalize(c, ",".join(f"{k}={v}" for k, v in args.items()) or None, per_method)
