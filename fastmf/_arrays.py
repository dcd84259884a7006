"""NumPy arrays handed to torch: one rule for every place fastmf turns a user's array into a
tensor (:class:`fastmf.data.Interactions`, fit's weights, ``exclude``/``candidates`` of
:mod:`fastmf.retrieval`). Light on purpose: :mod:`fastmf.retrieval` imports it, and
``import fastmf`` must not pull in pandas or scipy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def array_to_tensor(a: np.ndarray, device: Any = "cpu") -> torch.Tensor:
    """``a`` as a tensor on ``device``. A read-only array (pandas' copy-on-write hands them
    out for DataFrame columns) is copied first: torch warns on such arrays, and a tensor
    sharing one would let a write through it change the caller's data."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).to(device)
