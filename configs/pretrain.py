"""Pre-train a trunk for methods that start from one (``model.pretrained``): one task
holding every class of a dataset (default: CIFAR-10, reduced ResNet-18, 30 epochs, SGD
lr 0.05 momentum 0.9, random crop and flip). Its workdir is the checkpoint to hand on.

    jaxcl run pretrain --workdir runs/pretrain-c10       # ~50 min on 2 CPU cores; minutes on a GPU
    jaxcl run split_cifar10:method=packnet --set model.pretrained=runs/pretrain-c10
    jaxcl run pretrain --set data.name=mnist --set model.name=mlp --set epochs=5   # ~20 s
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "pretrain"
    c.num_tasks = 1
    c.epochs = 30
    c.batch_size = 64
    c.eval_batch_size = 500
    c.scenario = "class"
    c.data.name = "cifar10"
    c.data.stream = "split"
    c.data.classes_per_task = 10
    c.data.augment = True
    c.model.name = "reduced_resnet18"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.method.name = "finetune"
    c.checkpoint.every_steps = 500  # a long single-task run: resume mid-task if it dies
    return cfglib.finalize(c, arg)
