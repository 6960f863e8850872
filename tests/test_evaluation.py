"""The linear and k-NN probes report top-1 as a plain percentage of the scored examples."""

import numpy as np
import pytest

from byol_core.evaluation import knn_top1, linear_top1


@pytest.mark.parametrize("probe", [linear_top1, knn_top1])
def test_top1_is_the_exact_percentage_of_correct_predictions(probe) -> None:
    # Two well-separated clusters, so both probes classify every scored point by its cluster;
    # 132 of the 1,000 scored labels agree with the cluster. 100 * 0.132 is 13.200000000000001
    # in floating point, which is what the run summary used to print.
    rng = np.random.default_rng(0)
    centre = np.repeat(np.array([[-5.0], [5.0]]), 500, axis=0)
    x_fit = centre + rng.normal(scale=0.5, size=(1000, 1))
    y_fit = np.repeat([0, 1], 500)
    x_score = centre + rng.normal(scale=0.5, size=(1000, 1))
    y_score = np.repeat([0, 1], 500)
    y_score[132:] = 1 - y_score[132:]
    assert probe(x_fit, y_fit, x_score, y_score) == 13.2
