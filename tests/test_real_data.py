"""End to end on the real MNIST of ../shared/data (skipped when it is absent), and the
``optimized`` mark (tests/conftest.py) that its multi-dataset run uses."""
import jax
import numpy as np
import pytest
from conftest import session_disables_optimizations

import jaxcl


def test_split_mnist_class_incremental_finetune_forgets_joint_does_not(make_config, shared_data, tmp_path):
    sets = dict(scenario="class", epochs=1, data__dir=str(shared_data), data__train_limit=2000, data__test_limit=500,
                model__hidden=(200,))
    ft = jaxcl.run(make_config("split_mnist:method=finetune", **sets), tmp_path / "ft", echo=lambda s: None)
    jt = jaxcl.run(make_config("split_mnist:method=joint", **sets), tmp_path / "jt", echo=lambda s: None)
    R = np.asarray(ft["accuracy_matrix"])
    assert np.diag(R).min() > 0.9  # every task is learned when it is trained ...
    assert R[-1, :-1].max() < 0.1 and ft["acc"] < 0.25  # ... and forgotten by the end
    assert jt["acc"] > 0.85 and jt["forgetting"] < 0.1


@pytest.mark.optimized  # ~280 conv steps: faster code outweighs the longer compile
def test_multi_dataset_sequence_on_real_data(make_config, shared_data, tmp_path):
    sets = dict(epochs=3, batch_size=32, data__dir=str(shared_data), data__train_limit=1000, data__test_limit=300,
                model__width=8)
    r = jaxcl.run(make_config("multi_dataset:method=finetune", **sets), tmp_path, echo=lambda s: None)
    assert r["stream"]["tasks"] == ["mnist", "fashion_mnist", "cifar10"]
    R = np.asarray(r["accuracy_matrix"])
    assert R[0, 0] > 0.7 and R[1, 1] > 0.6 and R[2, 2] > 0.2  # each dataset learned in turn (chance: 0.1)


@pytest.mark.optimized
def test_the_optimized_mark_turns_xla_optimisation_on_for_its_test_only():
    if not session_disables_optimizations():
        pytest.skip("this session compiles with XLA's optimisations on already")
    assert jax.config.read("jax_disable_most_optimizations") is False


def test_an_unmarked_test_compiles_as_the_session_does():
    assert jax.config.read("jax_disable_most_optimizations") is session_disables_optimizations()
