"""The forms in which users pass ids: what the model tests feed their scoring methods."""

from __future__ import annotations

import numpy as np
import torch

# int64 and int32 tensors, numpy arrays of both, and plain lists, from an int64 numpy array.
ID_FORMS = (torch.as_tensor, lambda a: torch.as_tensor(a, dtype=torch.int32),
            np.asarray, lambda a: a.astype(np.int32), lambda a: a.tolist())
