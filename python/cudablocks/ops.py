"""Single ops on buffers, each running on the CPU reference or the CUDA backend by device.

The blocks use these ops internally; the classification pipeline builds its embedding, pooling,
head and loss from them, and they serve for testing and for building custom layers. Each op
validates its arguments (shape, dtype, device) before running and raises the matching
``cudablocks`` error; outputs remember the stream they were written on.
"""

from __future__ import annotations

import numpy as np

from cudablocks._core import (
    adamw_step,
    cross_entropy,
    dropout,
    embedding_backward,
    embedding_forward,
    gemm,
    pool_backward,
    pool_forward,
    rmsnorm_backward,
    rmsnorm_forward,
)
from cudablocks.errors import InvalidArgumentError

__all__ = [
    "adamw_step",
    "cross_entropy",
    "dropout",
    "embedding_backward",
    "embedding_backward_index",
    "embedding_forward",
    "gemm",
    "pool_backward",
    "pool_forward",
    "rmsnorm_backward",
    "rmsnorm_forward",
]


def embedding_backward_index(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group token positions by vocabulary row, for :func:`embedding_backward`.

    Args:
        ids: the token ids of a batch, any integer dtype, shape ``[T]``.

    Returns:
        ``(rows, offsets, order)``, all int32: ``rows`` ``[U]`` the distinct ids in ascending
        order, ``order`` ``[T]`` the token positions sorted by id (a stable sort, so positions
        ascend within each id) and ``offsets`` ``[U + 1]`` such that the positions of
        ``rows[u]`` are ``order[offsets[u]:offsets[u + 1]]``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"ids must be a 1-d integer array, got {ids.dtype}{list(ids.shape)}")
    order = np.argsort(ids, kind="stable")
    rows, counts = np.unique(ids, return_counts=True)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return rows.astype(np.int32), offsets.astype(np.int32), order.astype(np.int32)
