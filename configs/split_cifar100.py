"""Split-CIFAR-100: 10 tasks of 10 classes (or 20 of 5:
``--set num_tasks=20 data.classes_per_task=5``), task-incremental, reduced ResNet-18,
SGD lr 0.03 momentum 0.9, batch 32, 10 epochs, random crop and flip. Through TFDS
(``data.source=tfds``; no CIFAR-100 copy ships with the shared data), meant for GPUs.

    jaxcl run split_cifar100:method=ewc --set data.download=true   # ~45 min on 2 CPU cores (projected)

``method=packnet`` switches to the setting under which the CPG repository (ivclab/CPG,
``experiment1/PackNet_cifar100.sh``) reports PackNet at 67.5% average accuracy: 20 tasks,
one per CIFAR-100 superclass (5 classes each, in coarse-label order), VGG-16-BN
(``vgg16_bn_cifar``), SGD momentum 0.9 Nesterov, batch 32, weight decay 4e-5 on the
task's own weights, 100 epochs at lr 1e-2 decayed x0.1 at epochs 50 and 80, one-shot
pruning of 60% per layer, 30 retraining epochs at lr 1e-3 decayed at 25, per-task batch
norm (CPG keeps batch-norm parameters and statistics per task).

    jaxcl run split_cifar100:method=packnet --set data.download=true   # GPU: 20 x 130 epochs of 2,500 images

``method=rescl`` follows the one public ResCL reproduction
(parvex/residual-continual-learning-benchmark, which reports 77.83 +- 1.79): 5 tasks of
20 classes, WRN-28-2 (``wrn28_2``, pre-activation), Adam lr 1e-3, batch 128, 160 epochs
per stage with lr x0.1 at epochs 80 and 120 (its ``--schedule 80 120 160``), random crop
and flip.

    jaxcl run split_cifar100:method=rescl --set data.download=true     # GPU: 5 x 2 stages x 160 epochs
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
    cpg_packnet = {
        "num_tasks": 20, "data.superclass_tasks": True, "data.classes_per_task": 5, "eval_batch_size": 100,
        "model.name": "vgg16_bn_cifar", "epochs": 100,
        "optimizer.lr": 1e-2, "optimizer.nesterov": True, "optimizer.weight_decay": 4e-5,
        "optimizer.schedule": "step", "optimizer.milestones": (50, 80), "optimizer.gamma": 0.1,
        "method.prune": (0.6,), "method.retrain_epochs": 30, "method.retrain_lr": 1e-3,
        "method.retrain_milestones": (25,), "method.task_norm": True,
    }
    parvex_rescl = {
        "num_tasks": 5, "data.classes_per_task": 20, "model.name": "wrn28_2", "batch_size": 128, "epochs": 160,
        "optimizer.name": "adam", "optimizer.lr": 1e-3, "optimizer.momentum": 0.0, "optimizer.schedule": "step",
        "optimizer.milestones": (80, 120), "optimizer.gamma": 0.1,
    }
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 100.0}, "packnet": cpg_packnet,
                                    "rescl": parvex_rescl})
