"""mtlopt.datasets.multidigits: shapes, determinism, the source split, labels (numpy only)."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from mtlopt.datasets import MultiDigits, multidigits


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target


@pytest.mark.parametrize("tasks", [2, 4])
def test_shapes_and_dtypes(tasks):
    d = multidigits(n_train=60, n_test=30, tasks=tasks, seed=1)
    assert isinstance(d, MultiDigits)
    assert d.x_train.shape == (60, 10, 14) and d.x_test.shape == (30, 10, 14)
    assert d.x_train.dtype == d.x_test.dtype == np.float32
    assert d.y_train.shape == (60, tasks) and d.y_test.shape == (30, tasks)
    assert d.y_train.dtype == d.y_test.dtype == np.int32
    assert d.source_train.shape == (60, 2) and d.source_test.shape == (30, 2)
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    for field in ["task_names", "task_kinds", "output_sizes", "metrics", "higher_is_better"]:
        assert len(getattr(d, field)) == tasks, field
    assert d.task_kinds[:2] == ("classification", "classification")
    assert d.output_sizes[:2] == (10, 10)


def test_task_set_four():
    d = multidigits(n_train=10, n_test=10, tasks=4)
    assert d.task_names == ("left", "right", "sum", "left>right")
    assert d.task_kinds == ("classification", "classification", "regression", "binary")
    assert d.metrics == ("accuracy", "accuracy", "mae", "accuracy")
    assert d.higher_is_better == (True, True, False, True)
    assert d.output_sizes == (10, 10, 1, 1)


def test_deterministic_given_seed():
    a = multidigits(n_train=50, n_test=20, tasks=4, seed=3)
    b = multidigits(n_train=50, n_test=20, tasks=4, seed=3)
    c = multidigits(n_train=50, n_test=20, tasks=4, seed=4)
    for x, y in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.source_train, b.source_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_no_source_image_shared(digits):
    d = multidigits(n_train=3000, n_test=1000, seed=0)
    train, test = set(d.source_train.ravel()), set(d.source_test.ravel())
    assert not train & test
    assert all(i != j for i, j in d.source_train) and all(i != j for i, j in d.source_test)
    # Every class is in both pools (the split is stratified by class).
    _, labels = digits
    assert set(labels[list(test)]) == set(range(10)) == set(labels[list(train)])
    # No test canvas holds an image whose pixels equal a training image's (duplicates among
    # load_digits' scans would defeat the split by index).
    images, _ = digits
    flat = images.reshape(len(images), -1)
    train_rows = {flat[i].tobytes() for i in train}
    assert not any(flat[i].tobytes() in train_rows for i in test)


def test_labels_and_pixels(digits):
    images, labels = digits
    d = multidigits(n_train=200, n_test=100, tasks=4, seed=2)
    for x, y, src in [(d.x_train, d.y_train, d.source_train), (d.x_test, d.y_test, d.source_test)]:
        left, right = labels[src[:, 0]], labels[src[:, 1]]
        np.testing.assert_array_equal(y[:, 0], left)
        np.testing.assert_array_equal(y[:, 1], right)
        np.testing.assert_array_equal(y[:, 2], left + right)
        np.testing.assert_array_equal(y[:, 3], (left > right).astype(np.int32))
        # The canvas is the pixelwise max of the two digits: its ink equals their total ink
        # where they do not overlap and is never more.
        assert np.all(x.sum((1, 2)) <= images[src].sum((1, 2, 3)) + 1e-4)
        assert np.all(x.max((1, 2)) >= images[src].max((2, 3)).max(1) - 1e-6)


def test_offsets_place_digits():
    # With no shift and a canvas of exactly two digits, the canvas is the two images side by
    # side (left at columns 0-7, right at 8-15).
    d = multidigits(n_train=20, n_test=5, canvas=(8, 16), max_shift=0, seed=0)
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    np.testing.assert_array_equal(d.x_train[:, :, :8], images[d.source_train[:, 0]])
    np.testing.assert_array_equal(d.x_train[:, :, 8:], images[d.source_train[:, 1]])


def test_bad_arguments():
    with pytest.raises(ValueError, match="tasks must be 2 or 4"):
        multidigits(tasks=3)
    with pytest.raises(ValueError, match="does not fit"):
        multidigits(canvas=(10, 9), max_shift=2)
    with pytest.raises(ValueError, match="test_fraction"):
        multidigits(test_fraction=1.0)


def test_import_does_not_load_sklearn():
    code = "import sys, mtlopt, mtlopt.datasets; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
