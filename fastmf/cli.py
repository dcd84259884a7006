"""The ``fastmf`` command: ``demo``, ``train``, ``evaluate``, ``recommend``.

    fastmf demo
    fastmf train --data ml-latest-small --loss mse --out model/
    fastmf evaluate --model model/ --data ml-latest-small
    fastmf recommend --model model/ --user 1 -k 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

EXIT_USAGE = 2


class CliError(Exception):
    """An error to print as one line (no traceback)."""


# -- data --------------------------------------------------------------------------------------

def load_data(path: str, *, user_col: str, item_col: str, rating_col: str | None,
              time_col: str | None):
    """A MovieLens folder (any release), or a CSV / Parquet file with the given columns."""
    from fastmf import datasets
    from fastmf.data import Interactions

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    columns = dict(user_col=user_col, item_col=item_col, rating_col=rating_col,
                   time_col=time_col)
    # A MovieLens ratings.csv is also a plain CSV with the default column names; only the
    # folder form brings the titles.
    if p.is_dir() or p.name in ("ratings.dat", "u.data"):
        return datasets.load_movielens(p)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return Interactions.from_csv(p, **columns)
    if suffix in (".parquet", ".pq"):
        return Interactions.from_parquet(p, **columns)
    raise ValueError(f"unknown data format {p.suffix!r} for {path}: give a MovieLens folder, "
                     "a .csv or a .parquet file")


def split(data, how: str, test_fraction: float, seed: int):
    from fastmf.data import leave_one_out, random_split, temporal_split

    if how == "random":
        return random_split(data, test_fraction=test_fraction, seed=seed)
    if how == "loo":
        return leave_one_out(data, by="time" if data.timestamps is not None else "random",
                             seed=seed)
    if how == "temporal":
        return temporal_split(data, test_fraction=test_fraction)
    raise ValueError(f"unknown split {how!r}")


def default_dim(data) -> int:
    from fastmf.train import suggest_dim

    return min(128, suggest_dim(min(data.num_users, data.num_items)))


def _device(name: str | None):
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU")
    return name


def _metrics_for(loss: str, k: int) -> tuple[str, ...]:
    if loss in ("mse", "huber"):
        return ("rmse", "mae", f"hr@{k}", f"ndcg@{k}")
    return (f"hr@{k}", f"ndcg@{k}", f"recall@{k}", f"map@{k}", "coverage")


def _print_metrics(title: str, values: dict) -> None:
    shown = "  ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))
    print(f"{title}: {shown}")


# -- commands ----------------------------------------------------------------------------------

def cmd_train(args) -> None:
    import fastmf

    data = load_data(args.data, user_col=args.user_col, item_col=args.item_col,
                     rating_col=None if args.loss in ("bpr", "bce") else args.rating_col,
                     time_col=args.time_col)
    print(f"data: {len(data):,} interactions, {data.num_users:,} users, "
          f"{data.num_items:,} items")
    train, test = split(data, args.split, args.test_fraction, args.seed)
    dim = args.dim or default_dim(data)
    torch.manual_seed(args.seed)
    model = fastmf.MF(data.num_users, data.num_items, dim, backend=args.backend,
                      device=_device(args.device))
    metrics = _metrics_for(args.loss, args.k)
    history = fastmf.fit(model, train, loss=args.loss, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, reg=args.reg, valid=test,
                         metrics=metrics[:2], k=args.k, early_stopping=args.early_stopping,
                         seed=args.seed, progress=not args.quiet)
    results = fastmf.evaluate(model, test, train=train, metrics=metrics, k=args.k)
    _print_metrics(f"test ({args.split} split, dim={dim}, backend={model.backend})", results)
    print(f"training speed: {np.mean(history['samples_per_s']) / 1e6:.2f} M samples/s")
    if args.out:
        model.attach_data(data)
        path = model.save(args.out, extra={"loss": args.loss, "test": results})
        print(f"saved {path}")


def _model_space(model, data):
    """``data`` re-indexed into the model's raw-id maps (unknown users/items dropped)."""
    from fastmf.data import Interactions

    if model.user_map is None or model.item_map is None:
        raise ValueError("the model holds no id maps; train it with `fastmf train` or fit()")
    users = model.user_map.lookup(data.user_map.raw_ids[data.users])
    items = model.item_map.lookup(data.item_map.raw_ids[data.items])
    keep = (users >= 0) & (items >= 0)
    if not keep.any():
        raise ValueError("none of the data's users and items are known to the model")
    dropped = int((~keep).sum())
    if dropped:
        print(f"note: {dropped:,} interactions with users/items unknown to the model skipped")
    return Interactions(users[keep], items[keep],
                        None if data.ratings is None else data.ratings[keep],
                        user_map=model.user_map, item_map=model.item_map)


def cmd_evaluate(args) -> None:
    import fastmf

    model = fastmf.load(args.model, device=_device(args.device))
    data = load_data(args.data, user_col=args.user_col, item_col=args.item_col,
                     rating_col=args.rating_col, time_col=args.time_col)
    test = _model_space(model, data)
    metrics = ("rmse", "mae") if test.ratings is not None else ()
    metrics += (f"hr@{args.k}", f"ndcg@{args.k}", f"recall@{args.k}", "coverage")
    train = None
    if args.train:
        train = _model_space(model, load_data(
            args.train, user_col=args.user_col, item_col=args.item_col,
            rating_col=args.rating_col, time_col=args.time_col))
    _print_metrics(f"{args.data}", fastmf.evaluate(model, test, train=train, metrics=metrics,
                                                   k=args.k))


def cmd_recommend(args) -> None:
    import fastmf

    model = fastmf.load(args.model)
    raw = args.user
    if model.user_map is not None and model.user_map.raw_ids.dtype.kind in "iuf":
        try:
            raw = int(args.user)
        except ValueError:
            pass
    items, scores = model.recommend([raw], k=args.k, raw_ids=True)
    titles = model.item_titles or {}
    print(f"top {args.k} for user {args.user}:")
    item_index = model.item_map.lookup(items[0]) if model.item_map is not None else None
    for rank, (item, score) in enumerate(zip(items[0], scores[0], strict=True), 1):
        title = ""
        if item_index is not None:
            title = titles.get(int(item_index[rank - 1]), "")
        print(f"{rank:3d}. {item!s:>10}  {float(score):6.3f}  {title}")


def cmd_demo(args) -> None:
    import fastmf
    from fastmf.data import random_split
    from fastmf.ops import available_backends

    start = time.perf_counter()
    data = fastmf.datasets.synthetic(num_users=args.users, num_items=args.items,
                                     num_interactions=args.interactions, dim=8, seed=args.seed)
    train, test = random_split(data, test_fraction=0.2, seed=args.seed)
    print(f"synthetic ratings: {len(data):,} interactions, {data.num_users:,} users, "
          f"{data.num_items:,} items (train {len(train):,} / test {len(test):,})")
    dim = args.dim

    print("\nevery backend, same seed, 2 epochs (they must agree):")
    weights = {}
    for backend in available_backends():
        torch.manual_seed(args.seed)
        model = fastmf.MF(data.num_users, data.num_items, dim, backend=backend)
        history = fastmf.fit(model, train, epochs=2, seed=args.seed, progress=False)
        rmse = fastmf.evaluate(model, test, metrics=("rmse",))["rmse"]
        weights[backend] = model.item_factors.detach().clone()
        diff = (weights[backend] - weights["reference"]).abs().max().item()
        print(f"  {backend:>9}: {np.mean(history['samples_per_s']) / 1e6:7.2f} M samples/s  "
              f"test RMSE {rmse:.4f}  max |Δ weights| vs reference {diff:.1e}")
    worst = max((w - weights["reference"]).abs().max().item() for w in weights.values())
    if worst > 1e-3:
        raise RuntimeError(f"backends disagree: max weight difference {worst:.2e}")

    best = available_backends()[-1]
    print(f"\ntraining biased MF (dim={dim}, backend={best}):")
    torch.manual_seed(args.seed)
    model = fastmf.MF(data.num_users, data.num_items, dim, backend=best)
    history = fastmf.fit(model, train, valid=test, seed=args.seed, progress=not args.quiet)
    torch.manual_seed(args.seed)
    biases = fastmf.MF(data.num_users, data.num_items, 1, backend=best, init_scale=0.0)
    fastmf.fit(biases, train, seed=args.seed, progress=False)
    mean_rmse = fastmf.metrics.rmse(np.full(len(test), train.ratings.mean()), test.ratings)
    results = fastmf.evaluate(model, test, train=train, k=10,
                              metrics=("rmse", "mae", "hr@10", "ndcg@10", "recall@10",
                                       "coverage", "novelty"))
    print(f"\ntest RMSE: global mean {mean_rmse:.4f} | biases only "
          f"{fastmf.evaluate(biases, test, metrics=('rmse',))['rmse']:.4f} | "
          f"biased MF {results['rmse']:.4f}")
    _print_metrics("ranking (full catalog, train items excluded)", results)
    print(f"training speed: {np.mean(history['samples_per_s']) / 1e6:.2f} M samples/s")
    user = int(test.users[0])
    items, scores = model.recommend([user], k=10, exclude=train)
    print(f"\ntop 10 for user {user}: " + ", ".join(
        f"{int(i)} ({float(s):.2f})" for i, s in zip(items[0], scores[0], strict=True)))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


# -- entry point -------------------------------------------------------------------------------

def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="a MovieLens folder (ml-100k ... ml-32m, ml-latest-small) or a "
                        ".csv/.parquet file of interactions")
    p.add_argument("--user-col", default="userId", help="user column of a CSV/Parquet file")
    p.add_argument("--item-col", default="movieId", help="item column of a CSV/Parquet file")
    p.add_argument("--rating-col", default="rating", help="rating column (CSV/Parquet)")
    p.add_argument("--time-col", default="timestamp", help="timestamp column (CSV/Parquet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmf", description="Fast matrix-factorization recommenders for PyTorch.",
        epilog="Start with `fastmf demo`; each command has --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train on a generated data set with every backend")
    demo.add_argument("--users", type=int, default=6000)
    demo.add_argument("--items", type=int, default=3000)
    demo.add_argument("--interactions", type=int, default=300_000)
    demo.add_argument("--dim", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    train = sub.add_parser("train", help="train a model on a ratings file and save it")
    _data_options(train)
    train.add_argument("--loss", default="mse", choices=["mse", "huber", "bce", "bpr"])
    train.add_argument("--dim", type=int, default=None,
                       help="factors (default: fast.ai's rule of thumb, capped at 128)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--reg", type=float, default=None)
    train.add_argument("--split", default="random", choices=["random", "loo", "temporal"])
    train.add_argument("--test-fraction", type=float, default=0.2)
    train.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE")
    train.add_argument("-k", type=int, default=10, help="cut-off of the ranking metrics")
    train.add_argument("--backend", default="auto",
                       choices=["auto", "native", "numba", "reference"])
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None, help="checkpoint folder to write")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a saved model on a data set")
    evaluate.add_argument("--model", required=True, help="checkpoint folder")
    _data_options(evaluate)
    evaluate.add_argument("-k", type=int, default=10)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--train", default=None,
                          help="the training interactions, left out of the rankings")
    evaluate.set_defaults(run=cmd_evaluate)

    rec = sub.add_parser("recommend", help="top-k items for a user (raw id)")
    rec.add_argument("--model", required=True, help="checkpoint folder")
    rec.add_argument("--user", required=True, help="the user's raw id, as in the data")
    rec.add_argument("-k", type=int, default=10)
    rec.set_defaults(run=cmd_recommend)
    return parser


def main(argv=None) -> int:
    from fastmf.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError, ImportError,
            CheckpointError, CliError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fastmf {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
