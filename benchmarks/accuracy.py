"""Accuracy on real data: fastmf against Surprise and implicit on MovieLens ml-latest-small.

    python benchmarks/accuracy.py [--data PATH] [--quick] [--threads N] [--json OUT]

1. Explicit ratings, 5-fold cross-validation (``fastmf.data.kfold``, seed 0). fastmf biased
   MF with ``fit``'s defaults and with tuned settings, against Surprise's ``SVD`` and
   ``SVDpp`` with their library defaults, all on the same train/test rows: RMSE, MAE and fit
   time (mean ± std over the folds).
2. Implicit feedback (every rating is a positive), leave-one-out by time
   (``fastmf.data.leave_one_out``): fastmf BPR and BCE, with defaults and tuned, against
   implicit's ``BayesianPersonalizedRanking`` and ``AlternatingLeastSquares`` (CPU,
   ``factors=64``, other settings at the library defaults). Every model is ranked over the
   full catalogue with each user's training items left out, and scored by
   ``fastmf.metrics.ranking_metrics`` (HR@10, NDCG@10); mean ± std over model seeds.

Every library runs on ``--threads`` threads (default 1: Surprise is single-threaded, and on
a shared 2-core machine two threads gained nothing and, before OMP_WAIT_POLICY=PASSIVE,
spin-waiting OpenMP runtimes made them up to 30x slower). Fit times are wall-clock and
process CPU seconds; one untimed warm-up fit first pays fastmf's one-off costs (Numba
compilation, loading the extension).

``--quick`` (a smoke check): one fold, one seed, every model's epochs/iterations divided
by 4. Without the data folder the script prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# `import fastmf` sets this too, but an OpenMP runtime reads it when it loads, and torch's
# loads with `import torch` below: set it first so that --threads 2 does not spin-wait
# (see "Training throughput on CPU" in benchmarks/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import fastmf  # noqa: E402
from fastmf.data import Interactions, kfold, leave_one_out  # noqa: E402
from fastmf.evaluate import evaluate  # noqa: E402  (fastmf.evaluate can be the submodule)
from fastmf.metrics import ranking_metrics  # noqa: E402
from fastmf.train import DEFAULTS  # noqa: E402  (fastmf loads its workflow lazily)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
SEED = 0
FOLDS = 5
IMPLICIT_SEEDS = 3
QUICK_EPOCH_DIVISOR = 4
K = 10

# Factor count of every fastmf model. Surprise's SVD uses 100 factors; 64 is close to the
# fastmf CLI's choice for this data set (min(128, suggest_dim(610)) = 58) and to the 64
# factors the implicit models get.
DIM = 64

# Explicit "tuned" settings, picked on an inner validation split (12.5% of the training
# rows of folds 0 and 1, never their test rows) from a grid over lr {0.01 .. 0.3},
# reg {0.02 .. 0.3}, batch {512 .. 16384}, dim {32, 64, 128, 256}, epochs 1..40.
EXPLICIT_TUNED = dict(lr=0.05, reg=0.1, batch_size=1024, epochs=6)

# Implicit "tuned" settings, picked on an inner leave-one-out split (each user's
# second-to-last interaction), 2-3 seeds: negatives drawn by popularity instead of
# uniformly, stronger reg, 25 epochs; the rest are the defaults.
IMPLICIT_TUNED = dict(lr=0.05, reg=1e-2, batch_size=4096, epochs=25,
                      negative_distribution="popularity")

# The work of implicit's BPR epoch for epoch: one uniform negative per positive, 100 epochs
# (its default iterations); everything else at fastmf's defaults. A speed comparison, not a
# recommended setting (4 negatives rank better for the same time).
BPR_LIKE_FOR_LIKE = dict(num_negatives=1, epochs=100)

# The implicit library's models: CPU classes, factors=64, everything else at its defaults.
IMPLICIT_FACTORS = 64


@dataclass
class Runs:
    """Per-fold (or per-seed) results of one model."""

    name: str
    settings: str
    rows: list[dict] = field(default_factory=list)

    def values(self, key: str) -> np.ndarray:
        return np.array([r[key] for r in self.rows], dtype=np.float64)

    def mean_std(self, key: str, digits: int = 4) -> str:
        v = self.values(key)
        if len(v) == 1:
            return f"{v[0]:.{digits}f}"
        return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


# ------------------------------------------------------------------------------ utilities


def timed(fn):
    """(result, wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def scaled_epochs(epochs: int, quick: bool) -> int:
    return max(1, math.ceil(epochs / QUICK_EPOCH_DIVISOR)) if quick else epochs


def limit_threads(threads: int) -> None:
    """One thread count for torch, Numba (the negative sampler) and BLAS."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        # Applies until the process ends; BLAS libraries loaded later (implicit's) are
        # limited again in implicit_models().
        threadpool_limits(threads)
    except ImportError:
        pass


def try_import(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "fastmf": fastmf.__version__,
                "torch": torch.__version__, "numpy": np.__version__}
    for module in ("numba", "surprise", "implicit"):
        mod = try_import(module)
        if mod is not None:
            versions[module] = getattr(mod, "__version__", "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions,
            "backend": fastmf.MF(2, 2, dim=1).backend}


def load_avg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------------ explicit


def fit_fastmf_explicit(train: Interactions, test: Interactions, settings: dict,
                        quick: bool) -> dict:
    kw = dict(settings)
    epochs = kw.pop("epochs", None)
    if epochs is None:
        epochs = DEFAULTS["explicit"]["epochs"]
    epochs = scaled_epochs(epochs, quick)
    torch.manual_seed(SEED)

    def run():
        model = fastmf.MF(train.num_users, train.num_items, dim=DIM)
        fastmf.fit(model, train, loss="mse", epochs=epochs, seed=SEED, progress=False, **kw)
        return model

    model, wall, cpu = timed(run)
    scores = evaluate(model, test, metrics=("rmse", "mae"))
    return {"rmse": scores["rmse"], "mae": scores["mae"], "wall": wall, "cpu": cpu,
            "epochs": epochs}


def surprise_sets(train: Interactions, test: Interactions):
    """The same rows as Surprise objects: a full trainset and a testset list."""
    from surprise import Dataset, Reader

    frame = pd.DataFrame({"user": train.users, "item": train.items,
                          "rating": train.ratings.astype(np.float64)})
    low, high = float(min(train.ratings.min(), test.ratings.min())), float(
        max(train.ratings.max(), test.ratings.max()))
    trainset = Dataset.load_from_df(frame, Reader(rating_scale=(low, high))).build_full_trainset()
    testset = list(zip(test.users.tolist(), test.items.tolist(),
                       test.ratings.astype(np.float64).tolist(), strict=True))
    assert trainset.n_ratings == len(train) and len(testset) == len(test)
    return trainset, testset


def fit_surprise(algo_cls, trainset, testset, quick: bool, fold: int) -> dict:
    from surprise import accuracy

    epochs = scaled_epochs(20, quick)  # 20: n_epochs default of SVD and SVDpp
    algo = algo_cls(n_epochs=epochs, random_state=fold) if quick else algo_cls(random_state=fold)
    _, wall, cpu = timed(lambda: algo.fit(trainset))
    predictions = algo.test(testset)
    return {"rmse": accuracy.rmse(predictions, verbose=False),
            "mae": accuracy.mae(predictions, verbose=False), "wall": wall, "cpu": cpu,
            "epochs": algo.n_epochs}


def explicit_benchmark(data: Interactions, args) -> list[Runs]:
    surprise = try_import("surprise")
    if surprise is None:
        print("  scikit-surprise is not installed: SVD/SVD++ rows skipped "
              "(pip install scikit-surprise)")
    defaults = DEFAULTS["explicit"]
    runs = [Runs("fastmf MF (defaults)", f"dim {DIM}, " + settings_text(defaults)),
            Runs("fastmf MF (tuned)", f"dim {DIM}, " + settings_text(EXPLICIT_TUNED))]
    if surprise is not None:
        runs += [Runs("Surprise SVD", "library defaults (100 factors, 20 epochs)"),
                 Runs("Surprise SVD++", "library defaults (20 factors, 20 epochs)")]
    folds = 1 if args.quick else FOLDS
    # Warm-up (untimed): Numba compilation, extension loading, first-touch allocations.
    warm_train, warm_test = next(kfold(data, FOLDS, seed=SEED))
    fit_fastmf_explicit(warm_train, warm_test, {"epochs": 1}, quick=False)
    for fold, (train, test) in enumerate(kfold(data, FOLDS, seed=SEED)):
        if fold >= folds:
            break
        results = [fit_fastmf_explicit(train, test, {}, args.quick),
                   fit_fastmf_explicit(train, test, EXPLICIT_TUNED, args.quick)]
        if surprise is not None:
            trainset, testset = surprise_sets(train, test)
            results.append(fit_surprise(surprise.SVD, trainset, testset, args.quick, fold))
            results.append(fit_surprise(surprise.SVDpp, trainset, testset, args.quick, fold))
        for run, result in zip(runs, results, strict=True):
            run.rows.append(result)
            print(f"  fold {fold}: {run.name:<22} RMSE {result['rmse']:.4f}  MAE "
                  f"{result['mae']:.4f}  fit {result['wall']:.2f} s wall, "
                  f"{result['cpu']:.2f} s CPU", flush=True)
    return runs


# ------------------------------------------------------------------------------ implicit


def top_k_fastmf(model, users: np.ndarray, train: Interactions) -> np.ndarray:
    items, _ = model.recommend(torch.as_tensor(users), k=K, exclude=train)
    return items.cpu().numpy()


def top_k_implicit(model, users: np.ndarray, user_items) -> np.ndarray:
    # recommend() takes the users' own rows: row j of user_items[users] belongs to users[j],
    # and row j of the result is users[j]'s list, in fastmf's item index space (the CSR's
    # columns are fastmf item indices).
    ids, _ = model.recommend(users, user_items[users], N=K, filter_already_liked_items=True)
    return np.asarray(ids, dtype=np.int64)


def check_top_k(top: np.ndarray, users: np.ndarray, train_csr, name: str) -> None:
    """Full lists of distinct items, none of them a training item of the user."""
    if top.shape != (len(users), K) or (top < 0).any():
        raise AssertionError(f"{name}: expected {len(users)} full top-{K} lists")
    seen = np.asarray(train_csr[np.repeat(users, K), top.reshape(-1)]).reshape(top.shape)
    if seen.any():
        raise AssertionError(f"{name}: recommended {int((seen != 0).sum())} training items")
    if (np.sort(top, axis=1)[:, 1:] == np.sort(top, axis=1)[:, :-1]).any():
        raise AssertionError(f"{name}: repeated items in a top-{K} list")


def fit_fastmf_implicit(train, test, users, train_csr, loss, settings, seed, quick, name):
    kw = dict(settings)
    epochs = kw.pop("epochs", None)
    if epochs is None:
        epochs = DEFAULTS["implicit"]["epochs"]
    epochs = scaled_epochs(epochs, quick)
    torch.manual_seed(seed)

    def run():
        model = fastmf.MF(train.num_users, train.num_items, dim=DIM)
        history = fastmf.fit(model, train, loss=loss, epochs=epochs, seed=seed,
                             progress=False, **kw)
        return model, history

    (model, history), wall, cpu = timed(run)
    top = top_k_fastmf(model, users, train)
    check_top_k(top, users, train_csr, name)
    scores = ranking_metrics(top, test, k=K, users=users)
    return {"hr": scores[f"hr@{K}"], "ndcg": scores[f"ndcg@{K}"], "wall": wall, "cpu": cpu,
            "epochs": epochs, "epoch_wall": float(np.median(history["seconds"]))}


def fit_implicit(model_cls, kwargs, train, test, users, train_csr, quick, name):
    default_iterations = model_cls().iterations
    iterations = scaled_epochs(default_iterations, quick)
    model = model_cls(iterations=iterations, **kwargs)
    _, wall, cpu = timed(lambda: model.fit(train_csr, show_progress=False))
    top = top_k_implicit(model, users, train_csr)
    check_top_k(top, users, train_csr, name)
    scores = ranking_metrics(top, test, k=K, users=users)
    return {"hr": scores[f"hr@{K}"], "ndcg": scores[f"ndcg@{K}"], "wall": wall, "cpu": cpu,
            "epochs": iterations, "epoch_wall": wall / iterations}


def implicit_models(threads: int):
    lib = try_import("implicit")
    if lib is None:
        print("  implicit is not installed: its BPR/ALS rows skipped (pip install implicit)")
        return []
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    try:
        from threadpoolctl import threadpool_limits

        # implicit's ALS warns (and slows down) when BLAS is multi-threaded; its own BLAS is
        # only loaded by the imports above.
        threadpool_limits(1, "blas")
    except ImportError:
        pass
    common = dict(factors=IMPLICIT_FACTORS, num_threads=threads)
    return [("implicit BPR", BayesianPersonalizedRanking, common,
             "factors 64, library defaults (lr 0.01, reg 0.01, 100 iterations)"),
            ("implicit ALS", AlternatingLeastSquares, common,
             "factors 64, library defaults (reg 0.01, alpha 1, 15 iterations)")]


def implicit_benchmark(data: Interactions, args) -> list[Runs]:
    train, test = leave_one_out(data, by="time")
    positives = Interactions(train.users, train.items, user_map=train.user_map,
                             item_map=train.item_map)
    train_csr = positives.to_csr(binary=True).astype(np.float32).tocsr()
    users = np.unique(test.users)
    print(f"  leave-one-out by time: {len(train):,} training interactions, {len(users)} test "
          f"users, {data.num_items:,} items")
    defaults = settings_text(DEFAULTS["implicit"])
    tuned = settings_text(IMPLICIT_TUNED)
    fastmf_rows = [
        ("fastmf BPR (defaults)", "bpr", {}, f"dim {DIM}, 4 uniform negatives, {defaults}"),
        ("fastmf BCE (defaults)", "bce", {}, f"dim {DIM}, 4 uniform negatives, {defaults}"),
        ("fastmf BPR (tuned)", "bpr", IMPLICIT_TUNED, f"dim {DIM}, 4 {tuned}"),
        ("fastmf BCE (tuned)", "bce", IMPLICIT_TUNED, f"dim {DIM}, 4 {tuned}"),
        ("fastmf BPR (1 negative)", "bpr", BPR_LIKE_FOR_LIKE,
         f"dim {DIM}, 1 uniform negative, epochs 100, other defaults"),
    ]
    others = implicit_models(args.threads)
    runs = [Runs(name, text) for name, _, _, text in fastmf_rows]
    runs += [Runs(name, text) for name, _, _, text in others]
    for loss in ("bpr", "bce"):  # warm-up (untimed)
        fit_fastmf_implicit(positives, test, users, train_csr, loss, {"epochs": 1}, SEED,
                            False, "warm-up")
    seeds = 1 if args.quick else IMPLICIT_SEEDS
    for seed in range(seeds):
        results = [fit_fastmf_implicit(positives, test, users, train_csr, loss, settings, seed,
                                       args.quick, name)
                   for name, loss, settings, _ in fastmf_rows]
        results += [fit_implicit(cls, {**kw, "random_state": seed}, positives, test, users,
                                 train_csr, args.quick, name)
                    for name, cls, kw, _ in others]
        for run, result in zip(runs, results, strict=True):
            result["positives_per_s"] = len(train) * result["epochs"] / result["cpu"]
            run.rows.append(result)
            print(f"  seed {seed}: {run.name:<22} HR@{K} {result['hr']:.4f}  NDCG@{K} "
                  f"{result['ndcg']:.4f}  fit {result['wall']:.2f} s wall, "
                  f"{result['cpu']:.2f} s CPU, {result['epochs']} epochs", flush=True)
    return runs


# ------------------------------------------------------------------------------ report


def settings_text(settings: dict) -> str:
    parts = []
    if "negative_distribution" in settings:
        parts.append(f"{settings['negative_distribution']} negatives")
    for key, label in (("lr", "lr"), ("reg", "reg"), ("batch_size", "batch"),
                       ("epochs", "epochs")):
        if key in settings:
            parts.append(f"{label} {settings[key]:g}")
    return ", ".join(parts)


def explicit_table(runs: list[Runs]) -> str:
    svd = next((r for r in runs if r.name == "Surprise SVD"), None)
    lines = ["| model | settings | RMSE | MAE | fit s (wall) | fit s (CPU) "
             "| speed-up vs SVD (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        ratio = "" if svd is None else (
            f"{svd.values('cpu').mean() / run.values('cpu').mean():.3g}×")
        lines.append(f"| {run.name} | {run.settings} | {run.mean_std('rmse')} | "
                     f"{run.mean_std('mae')} | {run.mean_std('wall', 2)} | "
                     f"{run.mean_std('cpu', 2)} | {ratio} |")
    return "\n".join(lines)


def implicit_table(runs: list[Runs]) -> str:
    lines = [f"| model | settings | HR@{K} | NDCG@{K} | fit s (wall) | fit s (CPU) | epochs | "
             "interactions/s per epoch (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        rate = run.values("positives_per_s").mean()
        lines.append(f"| {run.name} | {run.settings} | {run.mean_std('hr')} | "
                     f"{run.mean_std('ndcg')} | {run.mean_std('wall', 2)} | "
                     f"{run.mean_std('cpu', 2)} | {int(run.values('epochs')[0])} | "
                     f"{rate / 1e6:.2f} M |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"the ml-latest-small folder (default: {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 1 fold, 1 seed, a quarter of the epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch, Numba, BLAS and implicit (default 1)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)

    if not (args.data / "ratings.csv").is_file():
        print(f"accuracy benchmark skipped: no MovieLens ratings.csv in {args.data} "
              "(download ml-latest-small from https://grouplens.org/datasets/movielens/ "
              "and pass --data)")
        return 0
    limit_threads(args.threads)
    info = machine()
    start, load_before = time.perf_counter(), load_avg()
    data = fastmf.datasets.load_movielens(args.data)
    print(f"{args.data.name}: {len(data):,} ratings, {data.num_users:,} users, "
          f"{data.num_items:,} items; backend {info['backend']}, {args.threads} thread(s)"
          f"{', quick' if args.quick else ''}")
    print(f"{info['cpu']} ({info['cores']} cores); load average {load_before}")
    print(", ".join(f"{k} {v}" for k, v in info["versions"].items()))

    print("\nexplicit ratings, 5-fold cross-validation:")
    explicit = explicit_benchmark(data, args)
    print("\nimplicit feedback, leave-one-out by time:")
    implicit = implicit_benchmark(data, args)

    folds = 1 if args.quick else FOLDS
    seeds = 1 if args.quick else IMPLICIT_SEEDS
    quick = " (quick: a quarter of the epochs listed)" if args.quick else ""
    print(f"\n### Explicit: RMSE/MAE, mean ± std over {folds} fold(s) of 5{quick}\n")
    print(explicit_table(explicit))
    print(f"\n### Implicit: full-catalogue top-{K}, mean ± std over {seeds} seed(s){quick}\n")
    print(implicit_table(implicit))
    print(f"\n{time.perf_counter() - start:.0f} s in all; load average {load_before} at the "
          f"start, {load_avg()} at the end")
    if args.json is not None:
        payload = {"machine": info, "threads": args.threads, "quick": args.quick,
                   "explicit": [r.__dict__ for r in explicit],
                   "implicit": [r.__dict__ for r in implicit]}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
