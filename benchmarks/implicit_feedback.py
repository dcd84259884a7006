"""Implicit feedback on several differently shaped data sets: fastmf BPR, BCE and ALS against
the ``implicit`` library's BPR and ALS. Not run in CI.

    python benchmarks/implicit_feedback.py [--tune] [--quick] [--threads 2] [--json OUT]
    python benchmarks/implicit_feedback.py --tune-weights --only syn-counts --seeds 3
    python benchmarks/implicit_feedback.py --bpr-speed --only ml [--repeats 3]
    python benchmarks/implicit_feedback.py --bce-speed [--repeats 5]

Data sets (``--data``: the ml-latest-small folder; the MovieLens sets are skipped without
it): every rating of ml-latest-small is a positive (``ml``), and its subsets ``ml-active``
(users with >= 100 ratings), ``ml-light`` (users with < 100) and ``ml-early`` (the ratings
before the median timestamp); ``fastmf.datasets.synthetic`` implicit data ``syn-sparse``
(4 000 users x 4 000 items, 60 000 interactions, Zipf 1.2 popularity) and ``syn-dense``
(1 000 x 500, 60 000, Zipf 0.5); ``syn-counts`` (2 000 x 2 000, 60 000), whose rows carry
play counts that grow with the planted affinity (``counts_for``); ``syn-plays`` (3 000 x
1 500, 60 000, Zipf 0.8), counts the same way and each pair's timestamp its last play
(``last_play_times``), so the held-out latest pair leans to the heavily played ones.

Splits: each data set's outer split holds out every user's latest interaction (``fastmf.data
.leave_one_out(by="time")``): those rows are the reported ones. ``--tune`` chooses settings
on an inner leave-one-out split of the outer training rows only (each user's second-latest
interaction), never on the reported rows, and prints the per-data-set curves and the chosen
values; the values then live in ``CHOSEN`` below (fit's ``DEFAULTS["implicit"]`` for
BPR/BCE, :class:`fastmf.models.ALS`'s constructor defaults for ALS).

Every model ranks the full catalogue with each user's training items left out, from its
factors (``topk``: the same ranking code for every library), scored by
``fastmf.metrics.ranking_metrics`` (HR@10, NDCG@10 over the users with a held-out item).
``implicit`` runs with factors 64 and its defaults otherwise; on ``syn-counts`` its ALS
also gets the confidence ``log(1 + count)`` as the matrix values. Speed: training
interactions (positives) x epochs / fit wall seconds, per epoch, ``--threads`` threads for
every library (torch, Numba, BLAS, implicit's ``num_threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastmf  # noqa: E402
from fastmf.data import Interactions, leave_one_out  # noqa: E402
from fastmf.metrics import ranking_metrics  # noqa: E402
from fastmf.models.als import ALS  # noqa: E402
from fastmf.train import DEFAULTS  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
K = 10
DIM = 64
SEED = 0

# Chosen by --tune on the inner splits (benchmarks/README.md, "Implicit feedback").
# BPR and BCE share fit's DEFAULTS["implicit"]; both chose lr 0.1, reg 0.01, 40 epochs
# (--seeds 3; one seed had chosen 30 epochs on a grid that ended there).
CHOSEN = {
    "bpr": dict(lr=0.1, reg=1e-2, batch_size=4096, epochs=40, num_negatives=4),
    "bce": dict(lr=0.1, reg=1e-2, batch_size=4096, epochs=40, num_negatives=4),
    # ALS's binary defaults are the class's (reg 10, alpha 0, 12 sweeps). Count data: the
    # confidence of Interactions.with_confidence and ALS's reg, chosen at the class's 12
    # sweeps on syn-counts.
    "confidence": dict(alpha=16.0, eps=1.0),
    "confidence_reg": 1.0,
    # MF's BPR/BCE on count data: --tune-weights chose no weights (alpha 0) on the inner
    # splits of syn-counts and syn-plays; the weighted rows show alpha 1 beside them.
    "mf_confidence": 1.0,
}
# The defaults before the --seeds 3 search, for the "(previous)" rows.
PREVIOUS = dict(lr=0.1, reg=1e-2, batch_size=4096, epochs=30, num_negatives=4)

# --tune grids. MF: lr x reg at 4 negatives and dim 64, validated after every epoch up to
# MAX_EPOCHS; then negatives and dim around the best lr/reg. The first search (lr {0.05,
# 0.1} x reg {1e-4, 1e-3, 1e-2}, 30 epochs, one seed) chose lr 0.1, reg 1e-2 at 30 epochs,
# the edge of the grid in all three, so the grid now reaches past them. ALS: reg x alpha (binary
# confidence 1 + alpha) and frequency-scaled reg; the count set also tries the log
# confidence of Interactions.with_confidence.
MAX_EPOCHS = 40
MF_GRID = [dict(lr=lr, reg=reg) for lr in (0.05, 0.1, 0.2) for reg in (1e-3, 1e-2, 3e-2)]
MF_SECOND = [dict(num_negatives=n) for n in (1, 8)] + [dict(dim=128)]
ALS_EPOCHS = 20
ALS_CHECKPOINTS = (2, 4, 6, 8, 10, 12, 15, 20)
ALS_GRID = ([dict(reg=reg, alpha=alpha) for reg in (0.1, 1.0, 10.0)
             for alpha in (0.0, 2.0, 10.0, 40.0)]
            + [dict(reg=reg, alpha=10.0, reg_exponent=1.0) for reg in (1e-3, 1e-2)])
CONFIDENCE_GRID = [dict(alpha=a, eps=e) for a in (1.0, 4.0, 16.0) for e in (1.0, 4.0)]
CONFIDENCE_REGS = (0.1, 1.0, 10.0)
# --tune-weights: MF (BPR, BCE) at its chosen settings with per-positive weights
# 1 + alpha * log(1 + count) (Interactions.with_confidence, eps 1), alpha 0 = unweighted.
WEIGHT_ALPHAS = (0.0, 0.25, 1.0, 4.0)
# --tune-warp: MF's WARP (fused hinge step on the first violating candidate) over its
# candidate count (LightFM's max_sampled; 10 is LightFM's default) and lr, reg 0.01.
WARP_GRID = [dict(num_negatives=n, lr=lr) for n in (4, 10, 30) for lr in (0.05, 0.1)]


# ------------------------------------------------------------------------------ data


def counts_for(data: Interactions, truth, seed: int) -> np.ndarray:
    """Play counts: 1 + Poisson(exp(1.5 z)) with z the planted affinity of the pair
    (standardised over the observed pairs), so heavier use marks stronger preference."""
    z = truth.preference(data.users, data.items)
    z = (z - z.mean()) / z.std()
    rng = np.random.default_rng(seed)
    return 1.0 + rng.poisson(np.exp(1.5 * z))


def last_play_times(counts: np.ndarray, seed: int) -> np.ndarray:
    """A pair's timestamp as the last of its ``count`` plays, each at a uniform time of the
    user's timeline: the max of ``count`` uniforms, U^(1/count); in int64 ticks. The more a
    pair is played, the later its last play, so the held-out latest pair leans to the
    heavily played ones, as in listening logs."""
    rng = np.random.default_rng(seed)
    return (rng.random(len(counts)) ** (1.0 / counts) * 1e9).astype(np.int64)


def positives(data: Interactions, counts: np.ndarray | None = None) -> Interactions:
    return Interactions(data.users, data.items, counts, data.timestamps,
                        user_map=data.user_map, item_map=data.item_map)


def build_datasets(path: Path, quick: bool) -> dict[str, Interactions]:
    """name -> Interactions (rows: positives; ``ratings``: play counts on syn-counts)."""
    out = {}
    if (path / "ratings.csv").is_file():
        ml = fastmf.datasets.load_movielens(path)
        out["ml"] = positives(ml)
        activity = np.bincount(ml.users, minlength=ml.num_users)[ml.users]
        out["ml-active"] = positives(ml.subset(activity >= 100))
        out["ml-light"] = positives(ml.subset(activity < 100))
        out["ml-early"] = positives(ml.subset(ml.timestamps < np.median(ml.timestamps)))
    scale = 4 if quick else 1
    out["syn-sparse"] = fastmf.datasets.synthetic(
        4000 // scale, 4000 // scale, 60_000 // scale, dim=16, implicit=True, zipf=1.2, seed=1)
    out["syn-dense"] = fastmf.datasets.synthetic(
        1000 // scale, 500 // scale, 60_000 // scale, dim=8, implicit=True, zipf=0.5, seed=2)
    data, truth = fastmf.datasets.synthetic(
        2000 // scale, 2000 // scale, 60_000 // scale, dim=12, implicit=True, zipf=1.0, seed=3,
        return_truth=True)
    out["syn-counts"] = positives(data, counts_for(data, truth, seed=3))
    data, truth = fastmf.datasets.synthetic(
        3000 // scale, 1500 // scale, 60_000 // scale, dim=12, implicit=True, zipf=0.8, seed=4,
        return_truth=True)
    counts = counts_for(data, truth, seed=4)
    out["syn-plays"] = Interactions(data.users, data.items, counts,
                                    last_play_times(counts, seed=4), user_map=data.user_map,
                                    item_map=data.item_map)
    return out


def split(data: Interactions) -> tuple[Interactions, Interactions]:
    return leave_one_out(data, by="time")


# ------------------------------------------------------------------------------ ranking


def topk(user_vecs: np.ndarray, item_vecs: np.ndarray, item_bias, train: Interactions,
         users: np.ndarray) -> np.ndarray:
    """(len(users), K) best items by ``<u, v> + bias``, the user's training items left out;
    ties to the lower index (a stable sort of the negated scores)."""
    indptr, indices = train.positive_structure()
    out = np.empty((len(users), K), dtype=np.int64)
    for lo in range(0, len(users), 1024):
        rows = users[lo:lo + 1024]
        scores = user_vecs[rows].astype(np.float64) @ item_vecs.T.astype(np.float64)
        if item_bias is not None:
            scores += item_bias
        for j, u in enumerate(rows):
            scores[j, indices[indptr[u]:indptr[u + 1]]] = -np.inf
        part = np.argpartition(-scores, K, axis=1)[:, :K]
        top = np.take_along_axis(scores, part, 1)
        order = np.lexsort((part, -top), axis=1)
        out[lo:lo + len(rows)] = np.take_along_axis(part, order, 1)
    return out


def scores(top: np.ndarray, test: Interactions, users: np.ndarray) -> dict:
    m = ranking_metrics(top, test, k=K, users=users)
    return {"ndcg": m[f"ndcg@{K}"], "hr": m[f"hr@{K}"]}


def mf_vectors(model):
    bias = None if model.item_bias is None else model.item_bias.detach().numpy()
    return model.user_factors.detach().numpy(), model.item_factors.detach().numpy(), bias


# ------------------------------------------------------------------------------ models


def fit_mf(train, loss, settings, *, seed=SEED):
    """fastmf MF (biases on, as fit's implicit setting is benchmarked today) with
    ``settings`` (fit's arguments, plus ``dim``); returns (model, (fit wall s, CPU s))."""
    kw = dict(settings)
    dim = kw.pop("dim", DIM)
    torch.manual_seed(seed)
    model = fastmf.MF(train.num_users, train.num_items, dim=dim)
    start, cpu = time.perf_counter(), time.process_time()
    fastmf.fit(model, train, loss=loss, seed=seed, progress=False, **kw)
    return model, (time.perf_counter() - start, time.process_time() - cpu)


def fit_mf_curve(train, valid, loss, settings, max_epochs, seeds=(SEED,)):
    """NDCG/HR after each epoch (fit's own validation hook), the mean over one run per seed
    (initialisation, batch order and negatives all follow the seed); each point also keeps
    the per-seed NDCGs (``ndcg_seeds``) so that the choice can be checked seed by seed."""
    kw = dict(settings)
    dim = kw.pop("dim", DIM)
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = fastmf.MF(train.num_users, train.num_items, dim=dim)
        history = fastmf.fit(model, train, loss=loss, epochs=max_epochs, seed=seed,
                             valid=valid, metrics=(f"ndcg@{K}", f"hr@{K}"), k=K,
                             progress=False, **kw)
        runs.append(history.epochs)
    return [{"epochs": points[0]["epoch"],
             "ndcg": float(np.mean([r[f"ndcg@{K}"] for r in points])),
             "hr": float(np.mean([r[f"hr@{K}"] for r in points])),
             "ndcg_seeds": [r[f"ndcg@{K}"] for r in points]}
            for points in zip(*runs)]


def seed_view(results: dict, i: int) -> dict:
    """``results`` (data set -> config -> curve) with each point's NDCG that of seed ``i``."""
    return {name: {key: [{**p, "ndcg": p["ndcg_seeds"][i]} for p in points]
                   for key, points in curves.items()}
            for name, curves in results.items()}


def fit_als(train, settings, *, epochs=None, valid=None, seed=SEED):
    kw = dict(settings)
    torch.manual_seed(seed)
    model = ALS(train.num_users, train.num_items, dim=kw.pop("dim", DIM), **kw)
    users = None if valid is None else np.unique(valid.users)
    curve = []
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(model.iterations if epochs is None else epochs):
        model.fit_epoch(train)
        if valid is not None and epoch + 1 in ALS_CHECKPOINTS:
            curve.append({"epochs": epoch + 1, **scores(
                topk(*als_vectors(model), train, users), valid, users)})
    return model, curve, (time.perf_counter() - start, time.process_time() - cpu)


def als_vectors(model):
    return model.user_factors.numpy(), model.item_factors.numpy(), None


def implicit_classes(threads: int):
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
    except ImportError:
        return None
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, "blas")  # implicit's ALS asks for a single-threaded BLAS
    except ImportError:
        pass
    return BayesianPersonalizedRanking, AlternatingLeastSquares


def fit_implicit(cls, train_csr, threads, seed=SEED):
    model = cls(factors=DIM, num_threads=threads, random_state=seed)
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(train_csr, show_progress=False)
    return model, (time.perf_counter() - start, time.process_time() - cpu)


# ------------------------------------------------------------------------------ tuning


def smoothed(points: list[dict], width: int) -> list[dict]:
    """Each point's NDCG replaced by the mean over the ``width`` neighbouring points of its
    curve (fewer at the ends): one validation set's NDCG jumps by more from one epoch to
    the next than the settings change it, and a lucky epoch should not choose them."""
    half = width // 2
    return [{"epochs": p["epochs"], "ndcg": float(np.mean(
        [q["ndcg"] for q in points[max(0, j - half):j + half + 1]]))}
        for j, p in enumerate(points)]


def choose(results: dict, names: list[str], width: int = 5) -> tuple[str, int, float]:
    """(config key, epochs, mean relative NDCG) maximising the mean over ``names`` of the
    smoothed NDCG / (that data set's best smoothed NDCG)."""
    totals: dict[tuple[str, int], list[float]] = {}
    for name in names:
        curves = {key: smoothed(points, width) for key, points in results[name].items()}
        best = max(p["ndcg"] for points in curves.values() for p in points) or 1.0
        for key, points in curves.items():
            for p in points:
                totals.setdefault((key, p["epochs"]), []).append(p["ndcg"] / best)
    complete = {k: float(np.mean(v)) for k, v in totals.items() if len(v) == len(names)}
    (key, epochs), value = max(complete.items(), key=lambda kv: kv[1])
    return key, epochs, value


def tune(datasets: dict[str, Interactions], args) -> dict:
    out: dict = {"mf": {}, "als": {}, "confidence": {}}
    # ml is left out: its subsets cover it, and its rows would weigh twice.
    datasets = {k: v for k, v in datasets.items() if k != "ml"}
    seeds = tuple(range(SEED, SEED + args.seeds))
    for name, data in datasets.items():
        outer_train, _ = split(data)
        fit_rows, valid = split(outer_train)
        binary = positives(fit_rows)
        print(f"[tune] {name}: {len(fit_rows):,} rows, {len(valid):,} validation users",
              flush=True)
        for loss in ("bpr", "bce"):
            curves = out["mf"].setdefault(loss, {}).setdefault(name, {})
            for grid in MF_GRID:
                settings = {**DEFAULTS["implicit"], **grid}
                settings.pop("epochs")
                curves[json.dumps(grid)] = fit_mf_curve(binary, valid, loss, settings,
                                                        args.max_epochs, seeds)
        if args.mf_only:
            print(f"[tune] {name} done", flush=True)
            continue
        curves = out["als"].setdefault(name, {})
        for grid in ALS_GRID:
            _, curve, _ = fit_als(binary, grid, epochs=args.als_epochs, valid=valid)
            curves[json.dumps(grid)] = curve
        if fit_rows.ratings is not None:
            curves = out["confidence"].setdefault(name, {})
            for conf in CONFIDENCE_GRID:
                weighted = fit_rows.with_confidence(**conf)
                for reg in CONFIDENCE_REGS:
                    _, curve, _ = fit_als(weighted, dict(reg=reg), epochs=args.als_epochs,
                                          valid=valid)
                    curves[json.dumps({**conf, "reg": reg})] = curve
        print(f"[tune] {name} done", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1))
    names = list(datasets)
    report = {}
    for loss in ("bpr", "bce"):
        key, epochs, value = choose(out["mf"][loss], names)
        report[loss] = (key, epochs, value)
        print(f"[tune] {loss}: {key} at {epochs} epochs, mean relative NDCG {value:.3f}")
    # Second stage: negatives and dim around each loss's best lr/reg.
    for loss in ("bpr", "bce"):
        best = json.loads(report[loss][0])
        for name, data in datasets.items():
            outer_train, _ = split(data)
            fit_rows, valid = split(outer_train)
            curves = out["mf"][loss][name]
            for extra in MF_SECOND:
                settings = {**DEFAULTS["implicit"], **best, **extra}
                settings.pop("epochs")
                curves[json.dumps({**best, **extra})] = fit_mf_curve(
                    positives(fit_rows), valid, loss, settings, args.max_epochs, seeds)
        key, epochs, value = choose(out["mf"][loss], names)
        report[loss] = (key, epochs, value)
        print(f"[tune] {loss} (with negatives/dim): {key} at {epochs} epochs, "
              f"mean relative NDCG {value:.3f}")
        # What each seed alone would have chosen: a choice that moves with the seed rests
        # on noise, and the mean over seeds above is the one to take.
        if len(seeds) > 1:
            for i, seed in enumerate(seeds):
                key_i, epochs_i, value_i = choose(seed_view(out["mf"][loss], i), names)
                print(f"[tune]   {loss}, seed {seed} alone: {key_i} at {epochs_i} epochs "
                      f"({value_i:.3f})")
    if out["als"]:
        key, epochs, value = choose(out["als"], names, width=3)
        report["als"] = (key, epochs, value)
        print(f"[tune] als: {key} at {epochs} sweeps, mean relative NDCG {value:.3f}")
    if out["confidence"]:
        key, epochs, value = choose(out["confidence"], list(out["confidence"]), width=3)
        report["confidence"] = (key, epochs, value)
        print(f"[tune] count confidence: {key} at {epochs} sweeps, relative NDCG {value:.3f}")
    for kind, per_set in (("bpr", out["mf"]["bpr"]), ("bce", out["mf"]["bce"]),
                          ("als", out["als"])):
        if kind not in report:
            continue
        key, epochs, _ = report[kind]
        for name in names:
            point = next(p for p in per_set[name][key] if p["epochs"] == epochs)
            best = max(p["ndcg"] for points in per_set[name].values() for p in points)
            print(f"[tune]   {kind} {name}: chosen {point['ndcg']:.4f}, best {best:.4f}")
    out["report"] = report
    return out


# ------------------------------------------------------------------------------ benchmark


def benchmark(datasets: dict[str, Interactions], args) -> list[dict]:
    """One row per (data set, model): NDCG/HR the mean over ``--seeds`` runs (seeds 0..N-1:
    the model's initialisation and, for fastmf, its batch order and negatives), times the
    median run's."""
    classes = implicit_classes(args.threads)
    if classes is None:
        print("implicit is not installed: its rows are skipped (pip install implicit)")
    rows = []
    seeds = range(SEED, SEED + args.seeds)
    # Warm-up (untimed): Numba compilation, extension loading.
    warm = next(iter(datasets.values()))
    fit_mf(positives(warm), "bpr", dict(epochs=1))
    fit_als(positives(warm), {}, epochs=1)
    for name, data in datasets.items():
        benchmark_set(name, data, classes, seeds, args, rows)
    return rows


def benchmark_set(name, data, classes, seeds, args, rows) -> None:
    """The rows of one data set (see :func:`benchmark`), appended to ``rows``."""
    train, test = split(data)
    binary = positives(train)
    users = np.unique(test.users)
    csr = binary.to_csr(binary=True).astype(np.float32).tocsr()

    def add(model_name, settings, run, epochs):
        """``run(seed)`` -> (top-k, (wall s, CPU s))."""
        got = [run(seed) for seed in seeds]
        per_seed = [scores(top, test, users) for top, _ in got]
        wall, cpu = sorted((times for _, times in got), key=lambda t: t[1])[len(got) // 2]
        result = {"data": name, "model": model_name, "settings": settings,
                  "ndcg": float(np.mean([r["ndcg"] for r in per_seed])),
                  "hr": float(np.mean([r["hr"] for r in per_seed])),
                  "ndcg_seeds": [r["ndcg"] for r in per_seed],
                  "wall": wall, "cpu": cpu, "epochs": epochs,
                  "positives_per_s": len(binary) * epochs / wall,
                  "positives_per_cpu_s": len(binary) * epochs / cpu}
        rows.append(result)
        spread = (f" (seeds {min(result['ndcg_seeds']):.4f}-{max(result['ndcg_seeds']):.4f})"
                  if len(got) > 1 else "")
        print(f"  {name:<11} {model_name:<26} NDCG@{K} {result['ndcg']:.4f}{spread}  "
              f"HR@{K} {result['hr']:.4f}  {wall:.2f} s wall, {cpu:.2f} s CPU, "
              f"{result['positives_per_cpu_s'] / 1e6:.2f} M positives/CPU s per epoch",
              flush=True)

    def mf(loss, settings):
        def run(seed):
            model, times = fit_mf(binary, loss, settings, seed=seed)
            return topk(*mf_vectors(model), binary, users), times
        return run

    def mf_rows(loss, settings, rows_):
        def run(seed):
            model, times = fit_mf(rows_, loss, settings, seed=seed)
            return topk(*mf_vectors(model), binary, users), times
        return run

    def als(settings, rows_=binary):
        def run(seed):
            model, _, times = fit_als(rows_, settings, seed=seed)
            return topk(*als_vectors(model), binary, users), times
        return run

    def lib(cls, matrix):
        def run(seed):
            model, times = fit_implicit(cls, matrix, args.threads, seed=seed)
            top = topk(model.user_factors, model.item_factors, None, binary, users)
            return top, times
        return run

    for loss in ("bpr", "bce"):
        add(f"fastmf {loss.upper()} (previous)", PREVIOUS, mf(loss, PREVIOUS),
            PREVIOUS["epochs"])
        add(f"fastmf {loss.upper()} (defaults)", CHOSEN[loss], mf(loss, CHOSEN[loss]),
            CHOSEN[loss]["epochs"])
    warp = fastmf.MF.defaults["warp"]
    add("fastmf WARP (defaults)", warp, mf("warp", warp), warp["epochs"])
    if name == "ml":  # implicit BPR's work per epoch: one negative per positive
        like = dict(DEFAULTS["implicit"], num_negatives=1, epochs=100)
        add("fastmf BPR (1 negative)", like, mf("bpr", like), 100)
    add("fastmf ALS", "class defaults", als({}), ALS(1, 1).iterations)
    if train.ratings is not None:
        for loss in ("bpr", "bce"):
            rows_ = weighted_positives(train, CHOSEN["mf_confidence"])
            add(f"fastmf {loss.upper()} (1 + log counts)",
                f"weights 1 + {CHOSEN['mf_confidence']} log(1 + count)",
                mf_rows(loss, CHOSEN[loss], rows_), CHOSEN[loss]["epochs"])
        weighted = train.with_confidence(**CHOSEN["confidence"])
        add("fastmf ALS (log counts)", f"with_confidence({CHOSEN['confidence']}), reg "
            f"{CHOSEN['confidence_reg']}", als({"reg": CHOSEN["confidence_reg"]}, weighted),
            ALS(1, 1).iterations)
    if classes is None:
        return
    bpr_cls, als_cls = classes
    add("implicit BPR", "library defaults", lib(bpr_cls, csr), bpr_cls().iterations)
    add("implicit ALS", "library defaults", lib(als_cls, csr), als_cls().iterations)
    if train.ratings is not None:
        counts = train.to_csr().astype(np.float32).tocsr()
        counts.data = np.log1p(counts.data)
        add("implicit ALS (log counts)", "values log(1 + count)", lib(als_cls, counts),
            als_cls().iterations)


def weighted_positives(data: Interactions, alpha: float) -> Interactions:
    """``positives(data)`` carrying the confidence weights of ``data``'s counts (none for
    alpha 0)."""
    binary = positives(data)
    if alpha == 0:
        return binary
    return binary.with_weights(data.with_confidence(alpha=alpha, eps=1.0).weights)


def tune_warp(datasets: dict[str, Interactions], args) -> dict:
    """MF with loss="warp" on the inner splits of every data set but ml (as --tune): the
    WARP_GRID settings at reg 0.01 and batch 4096, validated every epoch up to
    --max-epochs; prints each data set's smoothed best and the setting with the best mean
    relative NDCG (the criterion of --tune)."""
    datasets = {k: v for k, v in datasets.items() if k != "ml"}
    seeds = tuple(range(SEED, SEED + args.seeds))
    curves: dict = {}
    for name, data in datasets.items():
        outer_train, _ = split(data)
        fit_rows, valid = split(outer_train)
        for grid in WARP_GRID:
            settings = dict(reg=1e-2, batch_size=4096, **grid)
            curve = fit_mf_curve(positives(fit_rows), valid, "warp", settings,
                                 args.max_epochs, seeds)
            curves.setdefault(name, {})[json.dumps(grid)] = curve
            best = max(smoothed(curve, 5), key=lambda p: p["ndcg"])
            print(f"[tune-warp] {name} {grid}: smoothed NDCG@{K} {best['ndcg']:.4f} at "
                  f"{best['epochs']} epochs", flush=True)
    key, epochs, value = choose(curves, list(datasets))
    print(f"[tune-warp] chosen {key} at {epochs} epochs, mean relative NDCG {value:.3f}")
    return {"curves": curves, "chosen": key, "epochs": epochs, "value": value}


def tune_weights(datasets: dict[str, Interactions], args) -> dict:
    """MF's BPR and BCE on the count data sets' inner splits, each positive weighted by
    ``1 + alpha * log(1 + count)`` for alpha in WEIGHT_ALPHAS (0: unweighted), at the chosen
    settings; the smoothed best NDCG@10 of each (the mean over --seeds)."""
    out: dict = {}
    seeds = tuple(range(SEED, SEED + args.seeds))
    for name, data in datasets.items():
        if data.ratings is None:
            continue
        outer_train, _ = split(data)
        fit_rows, valid = split(outer_train)
        for loss in ("bpr", "bce"):
            settings = dict(CHOSEN[loss])
            settings.pop("epochs")
            for alpha in WEIGHT_ALPHAS:
                curve = fit_mf_curve(weighted_positives(fit_rows, alpha), valid, loss,
                                     settings, args.max_epochs, seeds)
                best = max(smoothed(curve, 5), key=lambda p: p["ndcg"])
                out.setdefault(name, {}).setdefault(loss, {})[alpha] = {
                    "curve": curve, "best_ndcg": best["ndcg"], "best_epochs": best["epochs"],
                    "ndcg_at_chosen": smoothed(curve, 5)[CHOSEN[loss]["epochs"] - 1]["ndcg"]}
                print(f"[tune-weights] {name} {loss} alpha {alpha}: smoothed NDCG@{K} "
                      f"{best['ndcg']:.4f} at {best['epochs']} epochs, "
                      f"{out[name][loss][alpha]['ndcg_at_chosen']:.4f} at "
                      f"{CHOSEN[loss]['epochs']}", flush=True)
    return out


def bpr_speed(datasets: dict[str, Interactions], args) -> list[dict]:
    """BPR only, ``--repeats`` runs each (CPU seconds are the steadier figure on a shared
    machine): fastmf BPR at the chosen settings (4 negatives, 40 epochs) and with 1
    negative for 100 epochs (implicit's work per epoch), against implicit's BPR."""
    classes = implicit_classes(args.threads)
    rows = []
    fit_mf(positives(next(iter(datasets.values()))), "bpr", dict(epochs=1))  # warm-up
    for name, data in datasets.items():
        train, test = split(data)
        binary = positives(train)
        users = np.unique(test.users)
        runs = [("fastmf BPR (4 negatives)", CHOSEN["bpr"]),
                ("fastmf BPR (1 negative)", dict(CHOSEN["bpr"], num_negatives=1, epochs=100))]
        for model_name, settings in runs:
            for seed in range(args.repeats):
                model, (wall, cpu) = fit_mf(binary, "bpr", settings, seed=seed)
                rows.append({"data": name, "model": model_name, "seed": seed,
                             **scores(topk(*mf_vectors(model), binary, users), test, users),
                             "wall": wall, "cpu": cpu, "epochs": settings["epochs"],
                             "positives_per_cpu_s": len(binary) * settings["epochs"] / cpu})
                print(rows[-1], flush=True)
        if classes is None:
            continue
        csr = binary.to_csr(binary=True).astype(np.float32).tocsr()
        for seed in range(args.repeats):
            model, (wall, cpu) = fit_implicit(classes[0], csr, args.threads, seed=seed)
            rows.append({"data": name, "model": "implicit BPR", "seed": seed,
                         **scores(topk(model.user_factors, model.item_factors, None, binary,
                                       users), test, users),
                         "wall": wall, "cpu": cpu, "epochs": model.iterations,
                         "positives_per_cpu_s": len(binary) * model.iterations / cpu})
            print(rows[-1], flush=True)
    summary = []
    for key in dict.fromkeys((r["data"], r["model"]) for r in rows):
        group = [r for r in rows if (r["data"], r["model"]) == key]
        summary.append({"data": key[0], "model": key[1],
                        **{f: float(np.median([r[f] for r in group]))
                           for f in ("ndcg", "hr", "cpu", "positives_per_cpu_s")}})
    for r in summary:
        print(f"{r['data']:<8} {r['model']:<26} NDCG@{K} {r['ndcg']:.4f} HR@{K} {r['hr']:.4f} "
              f"CPU {r['cpu']:.2f} s  {r['positives_per_cpu_s'] / 1e6:.2f} M positives/CPU s "
              "per epoch (medians)")
    return rows


def bce_speed(datasets: dict[str, Interactions], args) -> list[dict]:
    """fastmf BCE fit (the chosen settings, 10 epochs) with its negatives drawn inside the
    fused op (``train_step_sampled``) against the unfused path it replaced (the sampler's
    draws, then ``train_step`` on the concatenated rows), ``--repeats`` runs each,
    alternated. Both paths train on the same rows in the same order, so the tables must
    agree bit for bit: checked first, on every data set."""
    rows = []
    fused_method = fastmf.MF.draws_negatives

    def run(binary, fused: bool, seed: int):
        fastmf.MF.draws_negatives = (fused_method if fused else
                                     (lambda self, loss: False))
        try:
            return fit_mf(binary, "bce", dict(CHOSEN["bce"], epochs=10), seed=seed)
        finally:
            fastmf.MF.draws_negatives = fused_method

    for name, data in datasets.items():
        binary = positives(split(data)[0])
        a, b = run(binary, True, 0)[0], run(binary, False, 0)[0]
        if not all(torch.equal(x, y) for x, y in zip(a.tables(), b.tables())
                   if x is not None):
            raise AssertionError(f"{name}: the fused and unfused BCE paths differ")
        times = {True: [], False: []}
        for rep in range(args.repeats):
            for fused in (True, False) if rep % 2 == 0 else (False, True):
                times[fused].append(run(binary, fused, rep)[1])
        row = {"data": name, "positives": len(binary)}
        for fused, label in ((True, "fused"), (False, "unfused")):
            row[f"{label}_wall"] = float(np.median([t[0] for t in times[fused]]))
            row[f"{label}_cpu"] = float(np.median([t[1] for t in times[fused]]))
        rows.append(row)
        print(f"{name:<10} fused {row['fused_wall']:.3f} s wall / {row['fused_cpu']:.3f} CPU, "
              f"unfused {row['unfused_wall']:.3f} / {row['unfused_cpu']:.3f}: "
              f"{row['unfused_wall'] / row['fused_wall']:.2f}x wall, "
              f"{row['unfused_cpu'] / row['fused_cpu']:.2f}x CPU (medians of {args.repeats})",
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"| data | model | NDCG@{K} | NDCG@{K} per seed | HR@{K} | fit s (wall) | "
             "fit s (CPU) | epochs | positives/s per epoch (wall / CPU) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_seed = " ".join(f"{v:.4f}" for v in r["ndcg_seeds"])
        lines.append(f"| {r['data']} | {r['model']} | {r['ndcg']:.4f} | {per_seed} | "
                     f"{r['hr']:.4f} | "
                     f"{r['wall']:.2f} | {r['cpu']:.2f} | {r['epochs']} | "
                     f"{r['positives_per_s'] / 1e6:.2f} M / "
                     f"{r['positives_per_cpu_s'] / 1e6:.2f} M |")
    return "\n".join(lines)


def limit_threads(threads: int) -> None:
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tune", action="store_true", help="choose settings on inner splits")
    parser.add_argument("--quick", action="store_true", help="smaller synthetic sets")
    parser.add_argument("--only", nargs="*", help="data set names to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=MAX_EPOCHS)
    parser.add_argument("--als-epochs", type=int, default=ALS_EPOCHS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per setting (seeds 0..N-1): --tune averages the curves, "
                             "the benchmark the scores")
    parser.add_argument("--mf-only", action="store_true", help="--tune: MF (BPR, BCE) only")
    parser.add_argument("--tune-warp", action="store_true",
                        help="choose MF's WARP settings on the inner splits")
    parser.add_argument("--tune-weights", action="store_true",
                        help="choose MF's confidence weights on the count data's inner split")
    parser.add_argument("--bpr-speed", action="store_true",
                        help="BPR speed and quality only, fastmf vs implicit")
    parser.add_argument("--bce-speed", action="store_true",
                        help="fastmf BCE fit, negatives drawn in the op against the unfused "
                             "path")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per model (--bpr-speed, --bce-speed)")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    datasets = build_datasets(args.data, args.quick)
    if args.only:
        datasets = {k: v for k, v in datasets.items() if k in args.only}
    for name, data in datasets.items():
        print(f"{name}: {len(data):,} interactions, {data.num_users:,} users, "
              f"{data.num_items:,} items{', counts' if data.ratings is not None else ''}")
    start = time.perf_counter()
    if args.tune:
        result = tune(datasets, args)
    elif args.tune_weights:
        result = tune_weights(datasets, args)
    elif args.tune_warp:
        result = tune_warp(datasets, args)
    elif args.bpr_speed:
        result = bpr_speed(datasets, args)
    elif args.bce_speed:
        result = bce_speed(datasets, args)
    else:
        result = benchmark(datasets, args)
        print(f"\n{table(result)}")
    print(f"\n{time.perf_counter() - start:.0f} s; load average {os.getloadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
