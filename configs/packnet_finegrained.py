"""PackNet's fine-grained setting (Mallya & Lazebnik, CVPR 2018, Table 2): a VGG-16 from
ImageNet weights learns CUBS-200-2011, Stanford Cars and Flowers-102 in turn, one head
per task, 224x224 inputs, each task trained then pruned by 75% of its weights and
retrained, as the reference code (arunmallya/packnet, ``scripts/run_all_sequence.sh``):
SGD momentum 0.9, batch 32, 20 epochs at lr 1e-3 (x0.1 after 10), then 10 retraining
epochs at lr 1e-4.

    python -c "from safetensors.torch import save_file; import torchvision; \
save_file(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.safetensors')"
    jaxcl run packnet_finegrained --set model.pretrained=vgg16.safetensors --workdir runs/packnet-fg
    # GPU time (estimate, not measured on these datasets): 15,158 training images x 30
    # epochs = 455k VGG-16 steps-worth of images at 224 (~46 GFLOP each, forward and
    # backward) ~ 21 PFLOP: ~10 min of compute on one H100/H200-class GPU at 35 TFLOP/s
    # sustained, plus evaluation; the input (JPEG decode + resize, benchmarks/input.py)
    # needs ~8 CPU cores (data.grain_workers) to keep up. Budget ~20-30 min.
    jaxcl run packnet_finegrained:runlocal=1       # 32x32, a width-8 VGG, 64 images a task: a smoke test

TFDS names: ``caltech_birds2011`` (CUBS: 5,994 train / 5,794 test), ``cars196`` (8,144 /
8,041), ``oxford_flowers102`` (its ``train`` split, 1,020 images; the paper trains on
train+validation, 2,040). They are prepared once with ``tfds build NAME`` (or
``data.download=True`` where the machine may download); the images stream from TFDS's
ArrayRecord files through grain (``data.pipeline=grain``): decoded and resized to 224 in
worker processes. Differences from the paper: the torchvision ImageNet weights are the
starting point but not themselves a pruned PackNet task (the paper first prunes the
ImageNet network by 50% and keeps that half for ImageNet); training augmentation is the
loop's on-device random crop (pad 4) and flip, not a random-sized crop; images are
resized to 224x224 without keeping the aspect ratio.
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    args = cfglib.parse_arg(arg)
    runlocal = args.pop("runlocal", "0") not in ("0", "false", "False", "")
    c = cfglib.base_config()
    c.benchmark = "packnet_finegrained"
    c.num_tasks = 3
    c.scenario = "task"
    c.epochs = 20
    c.batch_size = 32
    c.eval_batch_size = 100
    c.data.stream = "multi"
    c.data.source = "tfds"
    c.data.datasets = ("caltech_birds2011", "cars196", "oxford_flowers102")
    c.data.classes_per_task = 0  # one task per dataset
    c.data.image_size = 224
    c.data.image_shape = (224, 224, 3)
    c.data.pipeline = "grain"
    c.data.augment = True
    c.model.name = "vgg16"
    c.method.name = "packnet"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.schedule = "step"
    c.optimizer.milestones = (10,)
    c.optimizer.gamma = 0.1
    packnet = {"method.prune": (0.75,), "method.retrain_epochs": 10, "method.retrain_lr": 1e-4}
    if runlocal:
        c.epochs = 1
        c.batch_size = 8
        c.eval_batch_size = 32
        c.data.image_size = 32
        c.data.image_shape = (32, 32, 3)
        c.data.train_limit = c.data.test_limit = 64
        c.data.allow_missing_classes = True  # 64 images cannot hold every one of 200 classes
        c.model.width = 8
        c.log.every_steps = 1
        packnet = {**packnet, "method.retrain_epochs": 1}
    return cfglib.finalize(c, ",".join(f"{k}={v}" for k, v in args.items()) or None, {"packnet": packnet})
