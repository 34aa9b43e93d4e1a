"""The TFDS source end to end, on tfds.testing.mock_data (no download, no TensorFlow)."""
import numpy as np
import tensorflow_datasets as tfds

import jaxcl


def test_split_mnist_from_tfds_runs_end_to_end(make_config, tmp_path):
    with tfds.testing.mock_data(num_examples=300):
        c = make_config("split_mnist:method=ewc", epochs=1, batch_size=8, data__source="tfds",
                        model__hidden=(32,))
        r = jaxcl.run(c, tmp_path, echo=lambda s: None)
    assert np.asarray(r["accuracy_matrix"]).shape == (5, 5)
    assert sum(r["stream"]["train_sizes"]) == 300 and sum(r["stream"]["test_sizes"]) == 300
