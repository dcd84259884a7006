"""Sharded MF training on synthetic ratings, launched by torchrun::

    torchrun --nproc-per-node 2 -m fastmf.distributed --users 100000 --items 50000 \\
        --dim 64 --epochs 3 --checkpoint ckpt/

Every rank draws the same synthetic set (seeded), trains its slice of each global batch
with :func:`fastmf.distributed.fit_sharded` (``fastmf.fit`` on the sharded model) and,
with ``--checkpoint``, saves a sharded checkpoint after every epoch (``--resume``
continues from one, at any world size).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fastmf

from . import fit_sharded, shard

# What torchrun sets and init_process_group("env://") reads (as fastmf.cli checks them).
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastmf.distributed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--reg", type=float, default=0.01)
    parser.add_argument("--loss", default="mse", choices=["mse", "huber", "bce", "bpr"])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint <folder> (the checkpoint to continue from)")
    own = not (dist.is_available() and dist.is_initialized())
    if own:
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        if missing:
            parser.error(f"it needs the environment torchrun sets ({', '.join(missing)} not "
                         "set); launch it as `torchrun --nproc_per_node=N -m "
                         "fastmf.distributed ...`")
    if own:
        cuda = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # a script calling main() in its own process group
        cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    gen = torch.Generator().manual_seed(args.seed)
    users = torch.randint(0, args.users, (args.samples,), generator=gen)
    items = torch.randint(0, args.items, (args.samples,), generator=gen)
    truth = torch.randn(args.users, 4, generator=gen), torch.randn(args.items, 4, generator=gen)
    ratings = ((truth[0][users] * truth[1][items]).sum(1) + 3.0).clamp(1, 5)
    if args.loss in ("bce", "bpr"):  # the liked pairs are the positives
        liked = ratings > 3
        users, items = users[liked], items[liked]
    # Built on the meta device: no rank ever allocates the full tables.
    model = shard(fastmf.MF(args.users, args.items, dim=args.dim, global_mean=3.0,
                            device="meta"), device=device, seed=args.seed)
    optimizer = fastmf.optim.SparseAdagrad(model.parameters(), lr=args.lr)
    if device is not None:
        users, items, ratings = users.to(device), items.to(device), ratings.to(device)
    history = fit_sharded(model, optimizer, users, items, ratings, loss=args.loss,
                          epochs=args.epochs, batch_size=args.batch_size, reg=args.reg,
                          seed=args.seed, checkpoint=args.checkpoint,
                          resume=args.resume, verbose=True)
    if dist.get_rank() == 0:
        print(f"final loss {history[-1]:.5f} on {dist.get_world_size()} rank(s)", flush=True)
    if own:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
