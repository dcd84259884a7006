"""Sharded MF training: per-rank memory, per-step time breakdown, bytes moved, row-map balance.

    python benchmarks/distributed.py --users 20000000 --items 1000000 --dim 64 --worlds 1 2

For each world size W, spawns W gloo ranks on this host; each builds ``fastmf.MF`` on the
meta device, shards it (allocating only its rows), and runs fused ``train_step`` steps
(row-wise Adagrad, MSE) on Zipf-distributed ids (exponent 1.05, id 0 the most popular).
Prints one JSON line per world size: RSS before/after sharding and after the steps, the
phase times (route_ids, gather_rows, compute, route_grads, update) per step, and the bytes
each rank actually sent to other ranks per sample, next to the formula
``(W-1)/W * (2*8 + 4*(K+1)*4)`` bytes (two int64 ids out, two rows of K factors + bias back,
two gradient rows out, fp32). Also prints the lookups per rank of the modulo and range maps.
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def zipf(num: int, count: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Power-law ids by inverting the continuous CDF of x^-s on [1, num + 1) (the exact
    multinomial would need a num-long weight vector on every rank)."""
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    a = 1.0 - exponent
    x = (((num + 1) ** a - 1) * u + 1) ** (1 / a)
    return (x.floor().long() - 1).clamp_(0, num - 1)


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    import datetime

    import torch.distributed as dist

    import fastmf
    import fastmf.distributed as fd

    torch.set_num_threads(max(1, os.cpu_count() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    base = rss_mib()
    start = time.perf_counter()
    model = fd.shard(fastmf.MF(args.users, args.items, dim=args.dim, device="meta"), seed=1)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05, rowwise=True)
    build_s = time.perf_counter() - start
    after_shard = rss_mib()
    gen = torch.Generator().manual_seed(100 + rank)
    b = args.batch
    batches = [(zipf(args.users, b, 1.05, gen), zipf(args.items, b, 1.05, gen),
                torch.rand(b, generator=gen) * 4 + 1) for _ in range(args.steps + 2)]
    sent_other = 0
    for step, (u, i, r) in enumerate(batches):
        if step == 2:
            fd.timings.reset()
            fd.timings.on = True
            dist.barrier()
            t0 = time.perf_counter()
        model.train_step(opt, u, i, r, reg=0.01)
        if step >= 2:
            for ids in (u, i):
                sent_other += int((fd.owner_of(ids, world) != rank).sum())
    dist.barrier()
    total = time.perf_counter() - t0
    fd.timings.on = False
    steps = args.steps
    k = args.dim
    row_bytes = (k + 1) * 4
    measured = sent_other * (8 + 2 * row_bytes) / (steps * b)
    result = {
        "world": world, "rank": rank, "users": args.users, "items": args.items, "dim": k,
        "batch_per_rank": b, "rss_base_mib": round(base), "rss_after_shard_mib":
        round(after_shard), "rss_after_steps_mib": round(rss_mib()), "build_s":
        round(build_s, 2), "step_ms": round(1e3 * total / steps, 2),
        "phases_ms": {k_: round(1e3 * v / steps, 2) for k_, v in fd.timings.seconds.items()},
        "samples_per_s_per_rank": round(b * steps / total),
        "bytes_per_sample_each_way_measured": round(measured, 1),
        "bytes_per_sample_each_way_formula":
            round((world - 1) / world * (2 * 8 + 4 * row_bytes), 1),
    }
    with open(os.path.join(out, f"{world}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def balance(num_rows: int, world: int) -> dict:
    from fastmf.distributed import routing

    gen = torch.Generator().manual_seed(0)
    ids = zipf(num_rows, 1_000_000, 1.05, gen)
    out = {"rows_per_rank": routing.rows_per_rank(num_rows, world).tolist()}
    for name in ("modulo", "range"):
        counts = routing.lookups_per_rank(ids, num_rows, world, name)
        out[f"lookups_{name}"] = counts.tolist()
        out[f"max_over_mean_{name}"] = round(float(counts.max() / counts.float().mean()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8192, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(json.dumps({"balance_W8_items": balance(args.items, 8)}), flush=True)
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(worker, args=(world, port, args, out), nprocs=world)
            for rank in range(world):
                with open(os.path.join(out, f"{world}-{rank}.json")) as f:
                    print(f.read(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
