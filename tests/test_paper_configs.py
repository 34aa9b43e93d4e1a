"""The papers' settings (configs/packnet_finegrained.py, configs/clr_transfer.py): the
full configs say what the papers say, and both run end to end on tfds.testing.mock_data
through the grain pipeline at reduced size (runlocal=1: 32x32, 64 images a task; the
small CNN stands in for VGG-16 / ResNet-50, whose compilation alone takes over a minute
on 2 CPU cores)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxcl
from jaxcl import config as config_lib


def test_packnet_finegrained_is_the_papers_setting():
    c = jaxcl.get_config("packnet_finegrained")
    config_lib.validate(c)
    assert c.method.name == "packnet" and c.model.name == "vgg16"
    assert tuple(c.data.datasets) == ("caltech_birds2011", "cars196", "oxford_flowers102")
    assert c.data.image_size == 224 and tuple(c.data.image_shape) == (224, 224, 3) and c.data.pipeline == "grain"
    assert tuple(c.method.prune) == (0.75,) and c.epochs == 20 and c.method.retrain_epochs == 10
    assert c.optimizer.lr == 1e-3 and c.method.retrain_lr == 1e-4 and tuple(c.optimizer.milestones) == (10,)


def test_clr_transfer_is_the_papers_setting():
    c = jaxcl.get_config("clr_transfer")
    config_lib.validate(c)
    assert c.method.name == "clr" and c.method.variant == "reduced" and c.model.name == "resnet50"
    assert c.num_tasks == len(c.data.datasets) == 8 and c.data.image_size == 224
    assert c.optimizer.name == "adam" and c.optimizer.lr == 1e-3 and c.method.l2 == 1e-5


@pytest.mark.parametrize("name", ["packnet_finegrained", "clr_transfer"])
def test_paper_config_runs_end_to_end_on_mock_data(name, tmp_path):
    # a width-4 CNN and 2 datasets (the pipeline and the run do not depend on more)
    sets = ["log.progress=false", "log.plots=false", "log.tensorboard=false", "data.grain_workers=0",
            "model.name=cnn", "model.width=4"] + (
        ["method.retrain_epochs=0", "num_tasks=2", "data.datasets=('caltech_birds2011','cars196')"]
        if name == "packnet_finegrained" else [])
    c = config_lib.override(jaxcl.get_config(f"{name}:runlocal=1"), sets)
    with tfds.testing.mock_data(num_examples=80):
        r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    assert r["data_path"] == "grain"
    assert np.asarray(r["accuracy_matrix"]).shape == (c.num_tasks, c.num_tasks)
    assert r["stream"]["train_sizes"] == [64] * c.num_tasks
    assert r["config"]["data"]["image_size"] == 32
