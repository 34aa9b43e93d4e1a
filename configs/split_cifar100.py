"""Split-CIFAR-100: 10 tasks of 10 classes (or 20 of 5:
``--set num_tasks=20 data.classes_per_task=5``), task-incremental, reduced ResNet-18,
SGD lr 0.03 momentum 0.9, batch 32, 10 epochs, random crop and flip. Through TFDS
(``data.source=tfds``; no CIFAR-100 copy ships with the shared data), meant for GPUs.

    jaxcl run split_cifar100:method=ewc --set data.download=true   # ~45 min on 2 CPU cores (projected)
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "split_cifar100"
    c.num_tasks = 10
    c.epochs = 10
    c.batch_size = 32
    c.eval_batch_size = 500
    c.scenario = "task"
    c.data.name = "cifar100"
    c.data.stream = "split"
    c.data.classes_per_task = 10
    c.data.augment = True
    c.model.name = "reduced_resnet18"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.03
    c.optimizer.momentum = 0.9
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 100.0}})
