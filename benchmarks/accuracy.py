"""Accuracy on real data: fastmf against Surprise and implicit on MovieLens ml-latest-small.

    python benchmarks/accuracy.py [--data PATH] [--quick] [--threads N] [--json OUT]
        [--explicit-only] [--no-svdpp]
    python benchmarks/accuracy.py --tune [--trials N]   # how fit's explicit defaults were chosen

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
by 4. Without the data folder the script prints why and exits 0. ``--tune`` chooses
``fit``'s ``DEFAULTS["explicit"]`` for MF on inner validation splits of fold 0's training
rows and a synthetic set (:func:`inner_splits`, :func:`tune_mf`; needs optuna), never on
the rows reported here.
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
from fastmf.data import (  # noqa: E402
    Interactions,
    kfold,
    leave_one_out,
    random_split,
    temporal_split,
)
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
        runs.append(Runs("Surprise SVD", "library defaults (100 factors, 20 epochs)"))
        if not args.no_svdpp:
            runs.append(Runs("Surprise SVD++", "library defaults (20 factors, 20 epochs)"))
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
            if not args.no_svdpp:
                results.append(fit_surprise(surprise.SVDpp, trainset, testset, args.quick,
                                            fold))
        for run, result in zip(runs, results, strict=True):
            run.rows.append(result)
            print(f"  fold {fold}: {run.name:<22} RMSE {result['rmse']:.4f}  MAE "
                  f"{result['mae']:.4f}  fit {result['wall']:.2f} s wall, "
                  f"{result['cpu']:.2f} s CPU", flush=True)
    return runs


# ------------------------------------------------------------------------------ tuning


def inner_splits(data: Interactions) -> dict[str, tuple[Interactions, Interactions]]:
    """Inner validation splits, built from fold 0's TRAINING rows only (never a reported
    test row), each a differently shaped problem:

    - ``dense``: 20 % of the rows held out at random (every user has >= 20 ratings);
    - ``sparse``: each user cut to at most 15 random ratings, then each user's latest 20 %
      held out (little history, predicting forward in time);
    - ``temporal``: the latest 20 % of the rows held out (a global cut by time: later
      ratings, some by users or of items with few or no training ratings);
    - ``synthetic``: ``fastmf.datasets.synthetic`` with many users and few items
      (8,000 x 1,500, 120,000 ratings, Zipf 1.2 popularity), 20 % held out at random.

    ``benchmarks/accuracy_svdpp.py --tune`` uses ``dense`` and ``sparse``.
    """
    outer_train, _ = next(kfold(data, FOLDS, seed=SEED))
    rng = np.random.default_rng(1)
    keep = np.zeros(len(outer_train), dtype=bool)
    seen = np.zeros(outer_train.num_users, dtype=np.int64)
    for row in rng.permutation(len(outer_train)):  # at most 15 random ratings per user
        u = outer_train.users[row]
        if seen[u] < 15:
            keep[row], seen[u] = True, seen[u] + 1
    synthetic = fastmf.datasets.synthetic(num_users=8_000, num_items=1_500,
                                          num_interactions=120_000, zipf=1.2, seed=1)
    return {"dense": random_split(outer_train, 0.2, seed=1),
            "sparse": temporal_split(outer_train.subset(keep), 0.2, by_user=True),
            "temporal": temporal_split(outer_train, 0.2),
            "synthetic": random_split(synthetic, 0.2, seed=1)}


# What a default MF fit on a fold's training rows may cost, in epochs at batch 4096: 6
# such epochs take ~0.07 s CPU on a quiet core, against Surprise SVD's ~0.41 s (the target
# is >= 5x faster). Counted in epochs rather than seconds because the ratio of two batch
# sizes' epoch costs varies far less with the machine's load than either cost does.
MF_FIT_BUDGET_EPOCHS_4096 = 6
MF_MAX_EPOCHS = 40
MF_BATCHES = (1024, 2048, 4096, 8192, 16384)


def mf_epoch_cpu(train: Interactions) -> dict[int, float]:
    """CPU seconds of one MF epoch on ``train`` per batch size (best of three 3-epoch fits,
    after a warm-up), which caps a trial's epochs at MF_FIT_BUDGET_EPOCHS_4096."""
    model = fastmf.MF(train.num_users, train.num_items, dim=DIM)
    fastmf.fit(model, train, loss="mse", epochs=1, seed=SEED, progress=False)
    cost = {}
    for batch in MF_BATCHES:
        times = []
        for _ in range(3):
            model = fastmf.MF(train.num_users, train.num_items, dim=DIM)
            _, _, cpu = timed(lambda m=model, b=batch: fastmf.fit(
                m, train, loss="mse", epochs=3, batch_size=b, seed=SEED, progress=False))
            times.append(cpu / 3)
        cost[batch] = min(times)
    return cost


def mf_curves(splits: dict, lr: float, reg: float, batch_size: int, epochs: int,
              seed: int = SEED) -> dict[str, np.ndarray]:
    """Validation RMSE after every epoch of MF (dim DIM) on each inner split."""
    curves = {}
    for name, (train, valid) in splits.items():
        torch.manual_seed(seed)
        model = fastmf.MF(train.num_users, train.num_items, dim=DIM)
        history = fastmf.fit(model, train, valid=valid, loss="mse", epochs=epochs, lr=lr,
                             reg=reg, batch_size=batch_size, seed=seed, progress=False)
        curves[name] = np.array(history["rmse"], dtype=np.float64)
    return curves


def round_setting(value: float) -> float:
    """Two significant digits, so that a default reads as a choice, not a search artefact."""
    return float(f"{value:.2g}")


def tune_mf(data: Interactions, trials: int, seed: int = 0) -> dict:
    """Choose MF's explicit defaults (``fit``'s ``DEFAULTS["explicit"]``) on the inner
    splits: Optuna TPE over lr, reg and batch size, each trial validated after every epoch
    up to the epochs that cost no more than MF_FIT_BUDGET_EPOCHS_4096 epochs at batch 4096.
    The final criterion is the mean over the splits of RMSE / (that split's best RMSE over
    every trial and epoch); the best five (trial, epoch) points are rounded and rescored (3
    seeds), next to the current defaults, and the best rescored one is returned."""
    import optuna

    splits = inner_splits(data)
    for name, (train, valid) in splits.items():
        print(f"[tune] {name}: {len(train):,} training, {len(valid):,} validation rows, "
              f"{train.num_users:,} users, {train.num_items:,} items", flush=True)
    cost = mf_epoch_cpu(next(kfold(data, FOLDS, seed=SEED))[0])
    budget = MF_FIT_BUDGET_EPOCHS_4096 * cost[4096]
    cap = {b: max(1, min(MF_MAX_EPOCHS, int(budget / c + 1e-9))) for b, c in cost.items()}
    print("[tune] CPU s per epoch on a fold:", {b: round(c, 4) for b, c in cost.items()},
          "-> epoch cap", cap, flush=True)
    old = DEFAULTS["explicit"]
    old_curves = mf_curves(splits, old["lr"], old["reg"], old["batch_size"], old["epochs"])
    # During the search each split's RMSE is taken relative to the current defaults' (the
    # best over all trials is only known at the end).
    reference = {n: float(c[-1]) for n, c in old_curves.items()}
    print("[tune] current defaults:", {n: round(v, 4) for n, v in reference.items()})

    def objective(trial):
        batch = trial.suggest_categorical("batch_size", list(MF_BATCHES))
        lr = trial.suggest_float("lr", 0.01, 0.5, log=True)
        reg = trial.suggest_float("reg", 0.005, 1.0, log=True)
        curves = mf_curves(splits, lr, reg, batch, cap[batch])
        for name, curve in curves.items():
            trial.set_user_attr(name, [float(x) for x in curve])
        score = np.mean([curves[n] / reference[n] for n in splits], axis=0)
        score = np.where(np.isfinite(score), score, 10.0)
        trial.set_user_attr("epochs", int(np.argmin(score)) + 1)
        return float(score.min())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"batch_size": old["batch_size"], "lr": old["lr"], "reg": old["reg"]})
    study.optimize(objective, n_trials=trials, callbacks=[lambda s, t: print(
        f"[tune] MF {t.number} {t.value:.4f} epochs {t.user_attrs['epochs']} {t.params}",
        flush=True)])
    done = [t for t in study.trials if t.value is not None and t.value < 10]
    best = {n: min(min(t.user_attrs[n]) for t in done) for n in splits}
    print("[tune] best RMSE per split over all trials:",
          {n: round(v, 4) for n, v in best.items()})

    def relative(curves):
        return np.mean([np.asarray(curves[n]) / best[n] for n in splits], axis=0)

    scored = [(float(relative(t.user_attrs).min()), int(relative(t.user_attrs).argmin()) + 1, t)
              for t in done]
    scored.sort(key=lambda row: row[0])
    for value, epochs, t in scored[:5]:
        print(f"[tune] top: {value:.4f} epochs {epochs} {t.params} "
              + " ".join(f"{n} {t.user_attrs[n][epochs - 1]:.4f}" for n in splits))
    # The top trials differ by less than one seed's noise: rescore the five best, rounded,
    # over 3 seeds (and the current defaults next to them) and keep the best of those.
    candidates = []
    for _, epochs, t in scored[:5]:
        setting = dict(lr=round_setting(t.params["lr"]), reg=round_setting(t.params["reg"]),
                       batch_size=t.params["batch_size"], epochs=epochs)
        if setting not in candidates:
            candidates.append(setting)
    results = []
    for label, setting in [("candidate", c) for c in candidates] + [("current", dict(old))]:
        runs = [mf_curves(splits, setting["lr"], setting["reg"], setting["batch_size"],
                          setting["epochs"], seed=s) for s in range(3)]
        last = {n: float(np.mean([r[n][-1] for r in runs])) for n in splits}
        value = float(np.mean([last[n] / best[n] for n in splits]))
        print(f"[tune] rescored {label} {setting}: mean relative RMSE {value:.4f} "
              + " ".join(f"{n} {v:.4f}" for n, v in last.items()), flush=True)
        if label == "candidate":
            results.append((value, setting))
    chosen = min(results, key=lambda row: row[0])[1]
    return chosen


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
    parser.add_argument("--explicit-only", action="store_true",
                        help="skip the implicit-feedback part")
    parser.add_argument("--no-svdpp", action="store_true",
                        help="skip Surprise's SVD++ (~30 s a fold)")
    parser.add_argument("--tune", action="store_true",
                        help="choose MF's explicit defaults on inner validation splits")
    parser.add_argument("--trials", type=int, default=60, help="optuna trials for --tune")
    args = parser.parse_args(argv)

    if not (args.data / "ratings.csv").is_file():
        print(f"accuracy benchmark skipped: no MovieLens ratings.csv in {args.data} "
              "(download ml-latest-small from https://grouplens.org/datasets/movielens/ "
              "and pass --data)")
        return 0
    limit_threads(args.threads)
    if args.tune:
        print("chosen:", tune_mf(fastmf.datasets.load_movielens(args.data), args.trials))
        return 0
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
    implicit = []
    if not args.explicit_only:
        print("\nimplicit feedback, leave-one-out by time:")
        implicit = implicit_benchmark(data, args)

    folds = 1 if args.quick else FOLDS
    seeds = 1 if args.quick else IMPLICIT_SEEDS
    quick = " (quick: a quarter of the epochs listed)" if args.quick else ""
    print(f"\n### Explicit: RMSE/MAE, mean ± std over {folds} fold(s) of 5{quick}\n")
    print(explicit_table(explicit))
    if implicit:
        print(f"\n### Implicit: full-catalogue top-{K}, mean ± std over {seeds} seed(s)"
              f"{quick}\n")
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
