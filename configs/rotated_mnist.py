"""Rotated-MNIST (GEM, Lopez-Paz & Ranzato 2017): 20 tasks, each MNIST rotated by a fixed
angle evenly spaced in [0, 180) degrees, 1,000 training samples per task, one pass in
batches of 10 (online), domain-incremental, MLP 2x100, SGD lr 0.1.

    jaxcl run rotated_mnist:method=ewc            # ~15 s on 2 CPU cores
Needs mnist.npz in data.dir / $JAXCL_DATA_DIR, or TFDS's mnist.
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "rotated_mnist"
    c.num_tasks = 20
    c.epochs = 1
    c.online = True
    c.batch_size = 10
    c.scenario = "domain"
    c.data.name = "mnist"
    c.data.stream = "rotated"
    c.data.max_angle = 180.0
    c.data.train_limit = 1000
    c.model.name = "mlp"
    c.model.hidden = (100, 100)
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.log.every_steps = 100
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 10.0}})
