"""The linear and k-NN probes report top-1 as a plain percentage of the scored examples."""

import numpy as np
import pytest
import threadpoolctl

from byol_core import evaluation
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


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


def test_the_probes_fit_with_one_blas_thread_and_give_the_threads_back(monkeypatch) -> None:
    # OpenBLAS's threads made the probe's small products 4-11x slower on two cores
    # (evaluate_features); the limit must hold inside the fit and end with it.
    before = _blas_threads()
    if not before or max(before) < 2:
        pytest.skip(f"BLAS runs one thread here already ({before}): nothing to limit")
    seen: list[list[int]] = []

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return linear_top1(*args, **kwargs)

    monkeypatch.setattr(evaluation, "linear_top1", spy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), 50)
    x[np.arange(200), y] += 3.0  # one informative feature per class
    result = evaluation.evaluate_features(protocol="study", test=(x, y), knn_k=5)
    assert seen == [[1] * len(before)]
    assert _blas_threads() == before
    assert result["linear_top1"] > 80 and result["knn_top1"] > 80
