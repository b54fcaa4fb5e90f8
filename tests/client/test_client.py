"""client/client.py without a server: how a file of any size is cut into requests."""

import numpy as np
import pytest

from slimserve.client.client import split_rows


def test_rows_are_cut_by_bytes_and_cover_every_row_once():
    inputs = {"a": np.zeros((10, 4), np.float32), "b": np.zeros((10, 2), np.int64)}  # 32 bytes a row
    parts = split_rows(inputs, max_request_bytes=100)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split_rows(inputs, max_request_bytes=10) == [slice(i, i + 1) for i in range(10)]  # at least one row
    assert split_rows(inputs, max_request_bytes=1 << 20) == [slice(0, 10)]


def test_a_fixed_batch_dimension_sets_the_rows_per_request():
    inputs = {"x": np.zeros((6, 3), np.float32)}
    assert split_rows(inputs, 1 << 20, fixed_batch=2) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ValueError, match="batches of exactly 4 rows; the inputs hold 6"):
        split_rows(inputs, 1 << 20, fixed_batch=4)


def test_inputs_with_different_row_counts_are_refused():
    with pytest.raises(ValueError, match="different numbers of rows: 'a' 3, 'b' 2"):
        split_rows({"a": np.zeros((3, 1)), "b": np.zeros((2, 1))}, 100)
