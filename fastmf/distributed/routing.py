"""Row-wise sharding: the row -> rank map and the id/row routing over ``all_to_all_single``.

Row map (modulo): global row ``g`` lives on rank ``g % W`` at local index ``g // W``; rank
``r`` holds ``ceil((N - r) / W)`` rows (the counts differ by at most one). Recommender ids
are usually numbered by popularity or by arrival, so a contiguous range map puts the hot
head of a Zipf distribution on rank 0; modulo spreads every run of ``W`` consecutive ids over
all ranks (``benchmarks/distributed.py`` and ``tests/test_distributed.py`` show the
lookups per rank of both maps under Zipf ids).

A :class:`Route` is the plan for one set of ids on every rank (a collective: all ranks
build their routes in the same order):

1. one ``all_to_all_single`` of a small int64 matrix: per owner rank, the number of ids
   sent per segment, this rank's out-of-range flag and its batch size. Every rank learns
   every other rank's flag, so bad ids raise on all ranks before anything else is sent
   (no rank is left waiting in a collective), and the global batch size comes for free;
2. one ``all_to_all_single`` of the ids, sorted stably by (owner, segment): each owner
   receives them grouped by source rank, in each rank's original order;
3. :meth:`Route.gather`: the owner gathers its rows and one ``all_to_all_single`` sends
   them back; :meth:`Route.scatter`: gradient rows take the reverse path, and the owner
   reorders what it got to (segment, source rank, position). With each rank holding a
   contiguous slice of the global batch, that is the order of the global batch, so every
   row's gradients are summed in the order a single process sums them.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Route", "local_rows", "owner_of", "timings"]


class _Timings:
    """Seconds spent per phase of a step (route_ids, gather_rows, compute, route_grads,
    update), summed while :meth:`enabled`; the benchmark reads them. Off by default: timing
    costs a clock read per phase."""

    def __init__(self):
        self.on = False
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        if not self.on:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


timings = _Timings()


def world(group) -> tuple[int, int]:
    """(rank, world size) of ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastmf.distributed: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets the "
                           "environment for it)")
    return dist.get_rank(group), dist.get_world_size(group)


def owner_of(ids: Tensor, world_size: int) -> Tensor:
    """The rank that owns each global row id (modulo map)."""
    return torch.remainder(ids, world_size)


def local_rows(num_rows: int, rank: int, world_size: int) -> int:
    """How many rows of a ``num_rows`` table rank ``rank`` holds: ``ceil((N - r) / W)``."""
    return (num_rows - rank + world_size - 1) // world_size


def global_ids(num_local: int, rank: int, world_size: int, device=None) -> Tensor:
    """The global ids of a rank's local rows 0..num_local-1."""
    return torch.arange(num_local, device=device) * world_size + rank


def _splits(counts: Tensor) -> list[int]:
    return [int(c) for c in counts.tolist()]


class Route:
    """The routing of ``segments`` (a list of 1-D id tensors into one table of ``num_rows``
    rows) to their owners in ``group``. Building it is a collective (two
    ``all_to_all_single`` calls); raises IndexError on every rank when any rank has an id
    outside [0, num_rows), naming the rank(s) and, on the offending rank, the id.

    Attributes after construction: ``batch_sizes`` (every rank's ``len`` of the first
    segment: the global batch is their sum), ``local_ids`` (the owner's local row of each id
    it serves, in (segment, source rank, position) order)."""

    def __init__(self, segments: list[Tensor], num_rows: int, group, who: str):
        self.group = group
        self.rank, self.world_size = world(group)
        w = self.world_size
        flat = [s.reshape(-1) for s in segments]
        device = flat[0].device
        self.lengths = [f.numel() for f in flat]
        ids = torch.cat([f.long() for f in flat]) if len(flat) > 1 else flat[0].long()
        self.num_ids = ids.numel()
        num_segments = len(flat)
        with timings.phase("route_ids"):
            bad = (ids < 0) | (ids >= num_rows)
            any_bad = bool(bad.any())
            seg = torch.repeat_interleave(torch.arange(num_segments, device=device),
                                          torch.tensor(self.lengths, device=device))
            owner = owner_of(torch.where(bad, 0, ids), w)
            key = owner * num_segments + seg
            # Stable: each owner gets a rank's ids in their original order within a segment.
            self.order = torch.sort(key, stable=True).indices
            counts = torch.bincount(key, minlength=w * num_segments).view(w, num_segments)
            header = torch.cat([counts, torch.full((w, 1), int(any_bad), device=device),
                                torch.full((w, 1), self.lengths[0], device=device)], 1)
            received = torch.empty_like(header)
            dist.all_to_all_single(received, header.contiguous(), group=group)
            flags = received[:, num_segments]
            if bool(flags.any()):
                ranks = [int(r) for r in torch.nonzero(flags).flatten().tolist()]
                mine = ""
                if any_bad:
                    value = int(ids[bad][0])
                    mine = f"; this rank's first bad id is {value}"
                raise IndexError(f"fastmf.distributed.{who}: ids out of range [0, {num_rows}) "
                                 f"on rank(s) {ranks}{mine}")
            self.batch_sizes = [int(b) for b in received[:, num_segments + 1].tolist()]
            self.send_counts = _splits(counts.sum(1))
            recv_by_segment = received[:, :num_segments]  # (source rank, segment)
            self.recv_counts = _splits(recv_by_segment.sum(1))
            recv_ids = ids.new_empty(sum(self.recv_counts))
            dist.all_to_all_single(recv_ids, ids[self.order], self.recv_counts,
                                   self.send_counts, group=group)
        # Received layout: (source, segment, position). The update order: (segment, source,
        # position); one segment needs no reordering.
        if num_segments > 1:
            src = torch.repeat_interleave(torch.arange(w, device=device).repeat_interleave(
                num_segments), recv_by_segment.reshape(-1))
            rseg = torch.repeat_interleave(torch.arange(num_segments, device=device).repeat(w),
                                           recv_by_segment.reshape(-1))
            self.update_order = torch.sort(rseg * w + src, stable=True).indices
        else:
            self.update_order = None
        self.recv_local = torch.div(recv_ids, w, rounding_mode="floor")
        self.local_ids = (self.recv_local if self.update_order is None
                          else self.recv_local[self.update_order])

    @property
    def global_batch(self) -> int:
        return sum(self.batch_sizes)

    def gather(self, tables: list[Tensor]) -> Tensor:
        """Rows of ``tables`` (local shards, each (n,) or (n, K), same n) for this rank's ids,
        in the ids' original order (segments concatenated): (num_ids, sum of widths), one
        ``all_to_all_single``."""
        with timings.phase("gather_rows"):
            parts = [t[self.recv_local] for t in tables]
            # Widths from the shapes, not reshape(n, -1): a rank asked for no rows has
            # n = 0, where -1 is ambiguous.
            rows = torch.cat([p.reshape(p.shape[0], _width(p)) for p in parts], 1)
            back = rows.new_empty((self.num_ids, rows.shape[1]))
            dist.all_to_all_single(back, rows, self.send_counts, self.recv_counts,
                                   group=self.group)
            out = torch.empty_like(back)
            out[self.order] = back
        return out

    def scatter(self, grad_rows: Tensor) -> Tensor:
        """Send per-id gradient rows ((num_ids, C), the ids' original order) to the owners;
        returns the rows this rank owns, aligned with :attr:`local_ids`."""
        with timings.phase("route_grads"):
            grad_rows = grad_rows.reshape(self.num_ids, _width(grad_rows))
            recv = grad_rows.new_empty((sum(self.recv_counts), grad_rows.shape[1]))
            dist.all_to_all_single(recv, grad_rows[self.order].contiguous(), self.recv_counts,
                                   self.send_counts, group=self.group)
        return recv if self.update_order is None else recv[self.update_order]


def _width(rows: Tensor) -> int:
    """Values per row of (n,) or (n, ...) ``rows``, n = 0 included."""
    return math.prod(rows.shape[1:])


def split_columns(rows: Tensor, tables: list[Tensor]) -> list[Tensor]:
    """Undo the column concatenation of :meth:`Route.gather` for ``tables``' widths."""
    out, start = [], 0
    for t in tables:
        width = 1 if t.dim() == 1 else t.shape[1]
        part = rows[:, start:start + width]
        out.append(part.reshape(-1) if t.dim() == 1 else part)
        start += width
    return out


# -- balance of the row map (benchmarks/distributed.py and the tests show it) --------------

def zipf_ids(num_rows: int, count: int, exponent: float, generator=None) -> Tensor:
    """``count`` ids in [0, num_rows) with P(id = k) proportional to (k + 1)^-exponent: id 0
    is the most popular, as with ids numbered by popularity or first appearance."""
    weights = torch.arange(1, num_rows + 1, dtype=torch.float64).pow(-exponent)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def rows_per_rank(num_rows: int, world_size: int) -> Tensor:
    """Rows each rank holds under the modulo map."""
    return torch.tensor([local_rows(num_rows, r, world_size) for r in range(world_size)])


def lookups_per_rank(ids: Tensor, num_rows: int, world_size: int, row_map: str) -> Tensor:
    """How many of ``ids`` each rank serves under ``row_map``: "modulo" (fastmf's) or
    "range" (contiguous blocks of ceil(N / W) rows, for comparison)."""
    if row_map == "modulo":
        owners = owner_of(ids, world_size)
    elif row_map == "range":
        owners = torch.div(ids, -(-num_rows // world_size), rounding_mode="floor")
    else:
        raise ValueError(f"fastmf.distributed.lookups_per_rank: unknown row_map {row_map!r}; "
                         "expected 'modulo' or 'range'")
    return torch.bincount(owners, minlength=world_size)
