"""Settings for the whole test process."""

from __future__ import annotations

import os

# fastmf's CLI training commands call fastmf.memory.keep_freed_memory, which changes glibc's
# malloc thresholds for the whole process. The CLI tests run those commands inside this
# process, and later tests measure how much memory it gives back
# (test_cuda_emulated.py::test_native_cpu_scratch_is_released_after_a_huge_batch), so the
# test process keeps glibc's defaults; tests/test_cli.py checks the call itself.
os.environ.setdefault("FASTMF_KEEP_FREED_MEMORY", "0")
