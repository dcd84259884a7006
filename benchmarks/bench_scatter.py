"""scatter_rows (the dense gradient of a row gather) side by side with PyTorch's own, at the
shapes of a default NCF training step on ml-latest-small (pytest-benchmark), one thread.

Paths, every one on the same ids and rows:

- ``textbook``: autograd's gradient of ``table.index_select(0, ids)`` (its backward is
  ``zeros(...).index_add_(0, ids, rows)``), what a model on plain PyTorch pays;
- ``reference``: :func:`fastmf.ops.reference.embedding_bag.scatter_rows` (the spec:
  ``index_add_`` in the accumulation type);
- ``numba`` / ``native``: the backends' kernels (``native`` as the NCF models call it, in a
  backward pass, past the op's autograd layer).

Cases: 20,480 pairs into 8,500 distinct items (a step's item rows, widths 8 and 32: the GMF
and MLP towers), 4,096 positives into 610 users (width 32), uniform and Zipf(1.0) ids.
Each path's result must equal the reference's bit for bit before it is timed.

    pytest benchmarks/bench_scatter.py --benchmark-columns=median,iqr,rounds
    python benchmarks/bench_scatter.py --repeats 15    # interleaved rounds, a markdown table
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import numpy as np
import pytest
import torch

from fastmf import ops
from fastmf.ops import reference
from fastmf.testing import zipf_ids

CASES = {  # name: (pairs, distinct rows, width)
    "items-8": (20_480, 8_500, 8),
    "items-32": (20_480, 8_500, 32),
    "users-32": (4_096, 610, 32),
}
PATHS = ("textbook", "reference", "numba", "native")


def make_case(name: str, ids_kind: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    pairs, num_rows, width = CASES[name]
    rng = np.random.default_rng(0)
    if ids_kind == "zipf":
        ids = zipf_ids(num_rows, pairs, generator=rng)
    else:
        ids = torch.from_numpy(rng.integers(0, num_rows, pairs))
    rows = torch.from_numpy(rng.standard_normal((pairs, width)).astype(np.float32))
    return ids, rows, num_rows


def path_fn(path: str, ids: torch.Tensor, rows: torch.Tensor, num_rows: int):
    """A no-argument callable that runs ``path`` once, or None where it is not available."""
    if path == "textbook":
        table = torch.zeros(num_rows, rows.shape[1], requires_grad=True)

        def textbook():
            table.grad = None
            table.index_select(0, ids).backward(rows)
            return table.grad
        return textbook
    if path == "reference":
        return lambda: reference.scatter_rows(ids, rows, num_rows)
    if path not in ops.available_backends():
        return None
    kernels = ops.kernels(path, torch.device("cpu"), kernel="scatter_rows")

    def backend():
        with torch.no_grad():  # as in a backward pass
            return kernels.scatter_rows(ids, rows, num_rows)
    return backend


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ids_kind", ["uniform", "zipf"])
@pytest.mark.parametrize("case", list(CASES))
def test_scatter_rows(benchmark, case, ids_kind, path):
    ids, rows, num_rows = make_case(case, ids_kind)
    fn = path_fn(path, ids, rows, num_rows)
    if fn is None:
        pytest.skip(f"backend {path!r} is not available here")
    assert torch.equal(fn(), reference.scatter_rows(ids, rows, num_rows))
    benchmark(fn)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    stamp = datetime.datetime.now(datetime.UTC)
    return f"{model}, 1 thread, torch {torch.__version__}, {stamp:%Y-%m-%d %H:%M} UTC"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=30, help="calls per round and path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{machine()}; median µs per call over {args.repeats} interleaved rounds\n")
    print("| case | ids | " + " | ".join(PATHS) + " | textbook / native |")
    print("|---|---|" + "---:|" * (len(PATHS) + 1))
    for case in CASES:
        for ids_kind in ("uniform", "zipf"):
            ids, rows, num_rows = make_case(case, ids_kind)
            expected = reference.scatter_rows(ids, rows, num_rows)
            fns = {}
            for path in PATHS:
                fn = path_fn(path, ids, rows, num_rows)
                if fn is not None:
                    assert torch.equal(fn(), expected), (case, ids_kind, path)
                    fns[path] = fn
            times = {path: [] for path in fns}
            for _ in range(args.repeats):
                for path, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[path].append((time.perf_counter() - start) / args.calls * 1e6)
            med = {path: statistics.median(v) for path, v in times.items()}
            cells = [f"{med[p]:.0f}" if p in med else "–" for p in PATHS]
            ratio = (f"{med['textbook'] / med['native']:.2f}×" if "native" in med else "–")
            print(f"| {case} | {ids_kind} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
