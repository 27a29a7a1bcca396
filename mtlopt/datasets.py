"""Small multi-task data sets that need no download, for examples, notebooks and benchmarks.

:func:`multidigits` builds a MultiMNIST-style set from scikit-learn's bundled handwritten
digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 scans). scikit-learn is an extra
(``pip install "mtlopt[examples]"``), imported only when the function is called; importing this
module, or ``mtlopt``, needs numpy only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["MultiDigits", "multidigits"]

_DIGIT = 8  # load_digits images are 8 x 8, values 0..16

# name, kind, metric, higher_is_better, output size (classes; 1 for a scalar output)
_TASKS = {
    "left": ("classification", "accuracy", True, 10),
    "right": ("classification", "accuracy", True, 10),
    "sum": ("regression", "mae", False, 1),
    "left>right": ("binary", "accuracy", True, 1),
}
_TASK_SETS = {2: ("left", "right"), 4: ("left", "right", "sum", "left>right")}


class MultiDigits(NamedTuple):
    """The arrays and the task description of :func:`multidigits`.

    Attributes:
      x_train: ``(n_train, H, W)`` float32 canvases, values in ``[0, 1]``.
      y_train: ``(n_train, T)`` int32 labels, column ``t`` for task ``t``: the class (0-9) of a
        classification task, the integer target of the regression (the sum of the two digits,
        0-18: cast it to float), 0 or 1 for the binary task.
      x_test: ``(n_test, H, W)``, as ``x_train`` for the test pairs.
      y_test: ``(n_test, T)``, as ``y_train`` for the test pairs.
      task_names: ``T`` names: ``"left"``, ``"right"`` (the two digits' classes), ``"sum"``
        (their sum), ``"left>right"`` (whether the left digit is larger).
      task_kinds: ``"classification"`` (cross-entropy over 10 classes), ``"regression"``
        (mean squared error) or ``"binary"`` (logistic loss), one per task.
      output_sizes: a head's output size per task: 10 for a classification task, 1 otherwise.
      metrics: the test metric per task: ``"accuracy"`` for classification and binary tasks,
        ``"mae"`` (mean absolute error) for the regression.
      higher_is_better: per task, whether a larger metric is better (``False`` for ``"mae"``).
      source_train: ``(n_train, 2)`` int32 indices into ``load_digits()`` of the left and
        right digit of every training pair.
      source_test: ``(n_test, 2)``, the same for the test pairs. The two share no index:
        every test pair is made of digit images never seen in training.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task_names: tuple[str, ...]
    task_kinds: tuple[str, ...]
    output_sizes: tuple[int, ...]
    metrics: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    source_train: np.ndarray
    source_test: np.ndarray


def _fail(message: str) -> ValueError:
    return ValueError(f"mtlopt.datasets.multidigits: {message}")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mtlopt.datasets.multidigits needs scikit-learn (its bundled digits); install it "
            'with pip install "mtlopt[examples]".'
        ) from err
    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int32)


def _split_sources(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the source images for training and test, stratified by class."""
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _pairs(n: int, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n pairs of distinct source indices drawn from pool, as an (n, 2) array."""
    i = rng.integers(0, len(pool), size=n)
    j = (i + rng.integers(1, len(pool), size=n)) % len(pool)  # any other image of the pool
    return np.stack([pool[i], pool[j]], axis=1).astype(np.int32)


def _paint(
    images: np.ndarray,
    src: np.ndarray,
    canvas: tuple[int, int],
    max_shift: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Canvases with the left digit near the left edge and the right one near the right edge,
    each shifted at random; where they overlap the brighter pixel wins (np.maximum)."""
    H, W = canvas
    n = len(src)
    out = np.zeros((n, H, W), np.float32)
    x_left = rng.integers(0, max_shift + 1, size=n)
    x_right = rng.integers(W - _DIGIT - max_shift, W - _DIGIT + 1, size=n)
    ys = rng.integers(0, H - _DIGIT + 1, size=(n, 2))
    rows = np.arange(n)[:, None, None]
    di = np.arange(_DIGIT)[None, :, None]
    dj = np.arange(_DIGIT)[None, None, :]
    for k, xs in enumerate((x_left, x_right)):
        r = ys[:, k, None, None] + di
        c = xs[:, None, None] + dj
        out[rows, r, c] = np.maximum(out[rows, r, c], images[src[:, k]])
    return out


def _labels(digit_labels: np.ndarray, src: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    left = digit_labels[src[:, 0]]
    right = digit_labels[src[:, 1]]
    columns = {"left": left, "right": right, "sum": left + right, "left>right": left > right}
    return np.stack([columns[n] for n in names], axis=1).astype(np.int32)


def multidigits(
    n_train: int = 10_000,
    n_test: int = 2_000,
    *,
    tasks: int = 2,
    seed: int = 0,
    test_fraction: float = 0.3,
    canvas: tuple[int, int] = (10, 14),
    max_shift: int = 2,
) -> MultiDigits:
    """Two real handwritten digits side by side on one canvas, with two or four tasks.

    A MultiMNIST-style set (Sener & Koltun 2018) built from scikit-learn's bundled digits
    (``load_digits``, 1,797 real 8x8 images, no download). The source images are first split,
    stratified by class, into a training pool and a test pool (``test_fraction`` of each class
    goes to test), and pairs are drawn within each pool: no digit image of a test pair appears in
    training. Each pair puts its left digit at a random column offset in ``[0, max_shift]``
    and its right digit at an offset in ``[W - 8 - max_shift, W - 8]``, each at a random row
    offset in ``[0, H - 8]``; where the two overlap, the brighter pixel wins. With the default
    ``10 x 14`` canvas the digits' ink (columns 1-6 of each 8x8 image) overlaps by 0 to 4
    columns. The data depend only on the arguments: the same ``seed`` gives the same arrays
    (a ``numpy.random.Generator``).

    Task sets:

    * ``tasks=2``: ``"left"``, ``"right"``: classify each digit (10 classes each).
    * ``tasks=4``: those two, ``"sum"``: the sum of the two digits as a regression (mean
      squared error, target 0-18), and ``"left>right"``: whether the left digit is larger
      (binary; equal digits count as 0). Its losses differ in scale by two orders of
      magnitude at the start (the squared error of the sum against cross-entropies).

    Args:
      n_train: the number of training pairs.
      n_test: the number of test pairs.
      tasks: 2 or 4, the task set above.
      seed: the seed of the split, the pairs and the offsets.
      test_fraction: the share of each class's source images kept for the test pairs.
      canvas: ``(H, W)``, with ``H >= 8`` and ``W >= 8 + max_shift`` (both digits fit).
      max_shift: the largest random column offset of each digit from its edge.

    Returns:
      A :class:`MultiDigits` named tuple: ``x_train`` ``(n_train, H, W)`` float32,
      ``y_train`` ``(n_train, T)`` int32 (one column per task), the same for test, the tasks'
      names, kinds, head output sizes, metrics, metric directions, and the source indices.

    Examples:
      >>> from mtlopt.datasets import multidigits
      >>> data = multidigits(n_train=100, n_test=50, tasks=4, seed=0)
      >>> data.x_train.shape, data.y_train.shape, data.x_test.shape, data.y_test.shape
      ((100, 10, 14), (100, 4), (50, 10, 14), (50, 4))
      >>> data.task_names
      ('left', 'right', 'sum', 'left>right')
      >>> data.task_kinds
      ('classification', 'classification', 'regression', 'binary')
      >>> bool((data.y_train[:, 2] == data.y_train[:, 0] + data.y_train[:, 1]).all())
      True
    """
    if tasks not in _TASK_SETS:
        raise _fail(f"tasks must be 2 or 4, got {tasks!r}.")
    if int(n_train) < 1 or int(n_test) < 1:
        raise _fail(f"n_train and n_test must be at least 1, got {n_train} and {n_test}.")
    if not 0.0 < test_fraction < 1.0:
        raise _fail(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    H, W = (int(s) for s in canvas)
    if max_shift < 0 or H < _DIGIT or W - _DIGIT - max_shift < 0:
        raise _fail(
            f"canvas {tuple(canvas)} with max_shift {max_shift} does not fit two 8x8 digits; "
            f"expected H >= 8, W >= 8 + max_shift and max_shift >= 0."
        )
    images, digit_labels = _load_digits()
    rng = np.random.default_rng(seed)
    pool_train, pool_test = _split_sources(digit_labels, test_fraction, rng)
    src_train = _pairs(int(n_train), pool_train, rng)
    src_test = _pairs(int(n_test), pool_test, rng)
    x_train = _paint(images, src_train, (H, W), max_shift, rng)
    x_test = _paint(images, src_test, (H, W), max_shift, rng)
    names = _TASK_SETS[tasks]
    kinds, metrics, higher, sizes = zip(*(_TASKS[n] for n in names), strict=True)
    return MultiDigits(
        x_train=x_train,
        y_train=_labels(digit_labels, src_train, names),
        x_test=x_test,
        y_test=_labels(digit_labels, src_test, names),
        task_names=names,
        task_kinds=kinds,
        output_sizes=sizes,
        metrics=metrics,
        higher_is_better=higher,
        source_train=src_train,
        source_test=src_test,
    )
