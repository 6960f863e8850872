"""Linear and kNN evaluation of the frozen online encoder with scikit-learn.

Two protocols. ``study``: "linear evaluation accuracy on half of the test set, using the other half
of the test set as training ... an sklearn linear classifier" (the study's footnote). ``standard``:
fit on the labelled training split, score on the test split.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from byol_core.augment import eval_transform


@torch.no_grad()
def embed(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device,
    batch_size: int = 512,
    autocast: contextlib.AbstractContextManager | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Features of uint8 images (N, 3, H, W) from the encoder in eval mode, as float32 numpy."""
    was_training = encoder.training
    encoder.eval()
    feats = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = eval_transform(images[start : start + batch_size].to(device), size, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast or contextlib.nullcontext():
                feats.append(encoder(x).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(feats).numpy()


def _percent_correct(model: BaseEstimator, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 in % as 100 * correct / n, one rounding: 100 * score() printed 132 right of 1,000
    as 13.200000000000001 in the run's summary."""
    return 100.0 * int(np.count_nonzero(model.predict(x) == y)) / len(y)


def linear_top1(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_score: np.ndarray,
    y_score: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (in %) of a logistic regression on standardised features."""
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    )
    clf.fit(x_fit, y_fit)
    return _percent_correct(clf, x_score, y_score)


def knn_top1(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, *, k: int = 20
) -> float:
    """Top-1 accuracy (in %) of a cosine-distance k-nearest-neighbour vote."""
    knn = KNeighborsClassifier(n_neighbors=min(k, len(y_fit)), metric="cosine")
    knn.fit(x_fit, y_fit)
    return _percent_correct(knn, x_score, y_score)


def halves(
    x: np.ndarray, y: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The study's split of the evaluation set into a fitting half and a scoring half, stratified
    by class and fixed by the seed so every epoch and variant is scored on the same halves."""
    x_fit, x_score, y_fit, y_score = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=seed
    )
    return x_fit, y_fit, x_score, y_score


@threadpool_limits.wrap(limits=1, user_api="blas")
def evaluate_features(
    *,
    protocol: str,
    test: tuple[np.ndarray, np.ndarray],
    train: tuple[np.ndarray, np.ndarray] | None = None,
    knn_k: int = 20,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Linear and k-NN top-1 of the features under ``protocol``, fitted with one BLAS thread.

    The probe's products are small (5,000 x 128 features in the CPU-scale study), and OpenBLAS
    splitting each over threads cost more than it gained: on a 2-core CPU the logistic
    regression took 5.5-5.9 s with two BLAS threads and 0.49-0.51 s with one, with or without
    torch in the process, and the k-NN vote 0.69-0.79 against 0.18-0.20 s (docs/benchmarks.md,
    "The runs compared", Zen 5). The split changes only the products' rounding, within lbfgs's
    tolerance (top-1 34.86 against 34.88 %).
    """
    if protocol == "study":
        fit_x, fit_y, score_x, score_y = halves(*test, seed=seed)
    else:
        if train is None:
            raise ValueError("the standard protocol needs the training split's features")
        (fit_x, fit_y), (score_x, score_y) = train, test
    return {
        "linear_top1": linear_top1(
            fit_x, fit_y, score_x, score_y, C=C, max_iter=max_iter, seed=seed
        ),
        "knn_top1": knn_top1(fit_x, fit_y, score_x, score_y, k=knn_k),
    }
