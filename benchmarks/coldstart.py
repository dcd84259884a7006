"""Cold start on MovieLens-latest-small: fastmf.models.Hybrid and fastmf's fold-in beside
LightFM 1.17 on identical splits (not run in CI).

Data: ratings >= 4 of ``ratings.csv`` are the positive interactions; item features are the
genres of ``movies.csv`` (multi-valued) and the tags of ``tags.csv`` (lower-cased), one
weight per (movie, name) occurrence, rows normalised, plus an identity feature per item
(LightFM's ``Dataset`` defaults), built once with ``fastmf.data.Features`` and handed to both
libraries as the same scipy matrix. Users have identity features only. dim 64 everywhere.

Scenarios (seed 0):

- cold items: 20% of the movies held out entirely (no interaction in training). For each
  user with a held-out positive: AUC and NDCG@10 over the held-out movies only (the
  user's held-out positives against the other held-out movies). Held-out movies are scored
  from their features alone (rows normalised without the untrained identity), the same
  rows for both libraries.
- warm items: a random 20% of the interactions held out; full-catalogue AUC and NDCG@10,
  training items excluded.
- cold users: 20% of the users held out entirely; ``fastmf.MF`` trained with BPR on the
  others. For each held-out user with >= 13 positives, the first n in time (n = 1, 3, 10)
  are known (n = 0: none): fold-in (``fastmf.models.coldstart.fold_in``, BPR steps, shrunk
  toward 0 and toward the mean trained user, each prior's strength picked on the inner
  split) vs the same MF retrained from scratch with those interactions added vs
  popularity; NDCG@10 on the user's later positives, the known ones excluded.
- users-synthetic: the cold-users inner tuning on a synthetic set
  (:func:`synthetic_with_features`), a second shape for fold-in's defaults.
- accumulator: Hybrid's Adagrad starting accumulator (0, 1e-6, 1e-5) on the inner
  cold-item and warm splits of ml-latest-small and of the synthetic set, BPR and WARP.
- batch: Hybrid's default batch size and learning rate (batch 1024 against 4096 at three
  learning rates, 20 or 40 epochs) on the same inner splits, BPR, BCE and WARP.
- throughput: interactions per second of training on the warm split, equal epochs,
  LightFM ``num_threads=2`` and torch limited to 2 threads.

fastmf's Hybrid runs twice, trained with BPR ("fastmf") and with WARP ("fastmf-warp", its
10 negatives per positive being WARP's candidates, LightFM's ``max_sampled``).

Tuning: each library's epochs, learning rate and loss were picked on an inner split of the
TRAINING part of each scenario (cold items: 20% of the training movies held out; warm:
10% of the training interactions; cold users: MF on 20% of the training users held out,
n = 3; fold-in: the mean over n = 1, 3, 10), never on the reported rows; the picks are
printed.

Install LightFM 1.17 (its setup.py fails under modern pip: ``__builtins__`` is a module
there, so ``__builtins__.__LIGHTFM_SETUP__ = True`` raises)::

    pip download --no-clean --no-deps --no-binary :all: lightfm==1.17 -d /tmp/lfm
    # the download's metadata step fails on that line; --no-clean keeps the unpacked
    # source under /tmp/pip-download-*/lightfm_*/ (or unpack lightfm-1.17.tar.gz)
    # in <dir>/setup.py replace the line  __builtins__.__LIGHTFM_SETUP__ = True  with
    #     import builtins; builtins.__LIGHTFM_SETUP__ = True
    pip install --no-build-isolation <dir>

Run: ``python benchmarks/coldstart.py [--data /work/shared/data/ml-latest-small] [--quick]
[--scenarios cold,warm,users,throughput,users-synthetic,accumulator,batch]``.
On a shared machine set ``OMP_WAIT_POLICY=PASSIVE``: with spinning OpenMP threads every
parallel region of a training step spins while another job holds a core (see
benchmarks/README.md, "Cold start").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import fastmf
from fastmf.data import Features, Interactions
from fastmf.models import coldstart
from fastmf.models.hybrid import Hybrid

DIM = 64
SEED = 0


# ------------------------------------------------------------------ data
def log(what, lib, cfg, result):
    print(f"  [{time.strftime('%H:%M:%S')}] {what} {lib} {cfg}: {result}", flush=True)
    return result


def load(path: Path):
    ratings = pd.read_csv(path / "ratings.csv")
    pos = ratings[ratings.rating >= 4.0]
    data = Interactions.from_arrays(pos.userId.to_numpy(), pos.movieId.to_numpy(),
                                    timestamps=pos.timestamp.to_numpy())
    movies = pd.read_csv(path / "movies.csv")
    tags = pd.read_csv(path / "tags.csv")
    table = pd.concat([
        movies[["movieId", "genres"]].assign(tag=None),
        tags[["movieId"]].assign(genres=None, tag=tags.tag.astype(str).str.strip().str.lower()),
    ], ignore_index=True)
    features = Features.from_pandas(table, "movieId", id_map=data.item_map, multi="genres",
                                    categorical="tag")
    return data, features


def subset(data: Interactions, mask: np.ndarray) -> Interactions:
    return data.subset(np.flatnonzero(mask))


def features_only(features: Features, rows: np.ndarray) -> sp.csr_matrix:
    """Final rows (features normalised, identity columns present but zero) for ``rows``."""
    raw = features.raw[rows]
    sums = np.asarray(raw.sum(1)).ravel()
    raw = sp.diags(np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)) @ raw
    pad = sp.csr_matrix((len(rows), features.num_rows), dtype=np.float32)
    return sp.hstack([raw, pad], format="csr", dtype=np.float32)


# ------------------------------------------------------------------ metrics
def evaluate(scores: np.ndarray, test: sp.csr_matrix, exclude: sp.csr_matrix | None,
             candidates: np.ndarray | None = None, k: int = 10) -> tuple[float, float]:
    """Mean per-user (AUC, NDCG@k) over users with test items; ``scores`` (U, N) for the
    rows of ``test``; excluded items and non-candidates are out of the ranking."""
    aucs, ndcgs = [], []
    allowed = np.ones(scores.shape[1], bool) if candidates is None else np.isin(
        np.arange(scores.shape[1]), candidates)
    for u in range(scores.shape[0]):
        pos = test.indices[test.indptr[u]:test.indptr[u + 1]]
        if len(pos) == 0:
            continue
        ok = allowed.copy()
        if exclude is not None:
            ok[exclude.indices[exclude.indptr[u]:exclude.indptr[u + 1]]] = False
        ok[pos] = True
        items = np.flatnonzero(ok)
        s = scores[u, items]
        rel = np.isin(items, pos)
        if rel.all():
            continue
        order = np.argsort(-s, kind="stable")
        ranks = pd.Series(s).rank(method="average").to_numpy()
        n_pos, n_neg = rel.sum(), (~rel).sum()
        aucs.append((ranks[rel].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        gains = rel[order[:k]]
        dcg = (gains / np.log2(np.arange(2, len(gains) + 2))).sum()
        ideal = (1 / np.log2(np.arange(2, min(n_pos, k) + 2))).sum()
        ndcgs.append(dcg / ideal)
    return float(np.mean(aucs)), float(np.mean(ndcgs))


# ------------------------------------------------------------------ fastmf Hybrid
def train_hybrid(train: Interactions, features: Features, cfg: dict) -> tuple[Hybrid, float]:
    """fastmf.fit on a Hybrid (adagrad in backward); returns (model, seconds). ``cfg["seed"]``
    (default SEED) seeds the initialisation, the batch order and the negatives."""
    seed = cfg.get("seed", SEED)
    torch.manual_seed(seed)
    model = Hybrid(train.num_users, train.num_items, dim=DIM, item_features=features,
                   init_scale=cfg.get("init_scale", 0.05))
    optimizer = None
    if "accumulator" in cfg:
        # Adagrad whose accumulators start at this value (LightFM's start at 1: its first
        # steps are lr * g, where torch's Adagrad, starting at 0, steps lr * sign(g)).
        optimizer = fastmf.optim.CombinedOptimizer([fastmf.optim.apply_in_backward(
            fastmf.optim.SparseAdagrad(model.parameters(), lr=cfg["lr"],
                                       initial_accumulator_value=cfg["accumulator"]))])
    start = time.perf_counter()
    fastmf.fit(model, train, loss=cfg["loss"], epochs=cfg["epochs"], lr=cfg["lr"],
               reg=cfg["reg"], batch_size=cfg["batch_size"], num_negatives=cfg["negatives"],
               optimizer=optimizer, progress=False, seed=seed)
    return model, time.perf_counter() - start


def hybrid_scores(model: Hybrid, cold_rows: sp.csr_matrix | None = None,
                  cold: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        p, bu = model.user_vectors(torch.arange(model.num_users))
        q, bi = model.item_vectors()
        if cold is not None:
            vec, bias = coldstart.item_vectors_from_features(
                model, cold_rows[:, :model.items.num_features])
            q, bi = q.clone(), bi.clone()
            q[torch.as_tensor(cold)], bi[torch.as_tensor(cold)] = vec, bias
        return (p @ q.T + bi + bu[:, None]).numpy()


# ------------------------------------------------------------------ LightFM
def train_lightfm(train: Interactions, features: Features, cfg: dict):
    from lightfm import LightFM

    model = LightFM(no_components=DIM, loss=cfg["loss"], learning_rate=cfg["lr"],
                    random_state=SEED)
    matrix = train.to_csr(binary=True).tocoo()
    item_features = features.with_identity().matrix
    start = time.perf_counter()
    model.fit(matrix, item_features=item_features, epochs=cfg["epochs"], num_threads=2)
    return model, time.perf_counter() - start


def lightfm_scores(model, features: Features, cold_rows=None, cold=None) -> np.ndarray:
    item_features = features.with_identity().matrix
    if cold is not None:
        n = item_features.shape[0]
        keep = sp.diags((~np.isin(np.arange(n), cold)).astype(np.float32))
        place = sp.csr_matrix((np.ones(len(cold), np.float32), (cold, np.arange(len(cold)))),
                              shape=(n, len(cold)))
        item_features = sp.csr_matrix(keep @ item_features + place @ cold_rows)
    bi, q = model.get_item_representations(item_features)
    bu, p = model.get_user_representations()
    return p @ q.T + bi + bu[:, None]


# ------------------------------------------------------------------ scenarios
def hold_out_items(data: Interactions, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    present = np.unique(data.items)
    cold = rng.choice(present, int(round(fraction * len(present))), replace=False)
    mask = np.isin(data.items, cold)
    return subset(data, ~mask), subset(data, mask), np.sort(cold)


def cold_items(data, features, grids, quick):
    train, test, cold = hold_out_items(data, 0.2, SEED)
    inner_train, inner_test, inner_cold = hold_out_items(train, 0.2, SEED + 1)

    def run(lib, tr, te, c, cfg):
        rows = features_only(features, c)
        if lib.startswith("fastmf"):
            model, _ = train_hybrid(tr, features, cfg)
            scores = hybrid_scores(model, rows, c)
        else:
            model, _ = train_lightfm(tr, features, cfg)
            scores = lightfm_scores(model, features, rows, c)
        return evaluate(scores, te.to_csr(binary=True), None, candidates=c)

    out = {}
    for lib, grid in grids.items():
        best = max(grid, key=lambda cfg: log("cold items inner", lib, cfg, run(
            lib, inner_train, inner_test, inner_cold, cfg))[1])
        out[lib] = (best, run(lib, train, test, cold, best))
    return out


def warm_items(data, features, grids, quick):
    train, test = fastmf.data.random_split(data, 0.2, seed=SEED)
    inner_train, inner_test = fastmf.data.random_split(train, 0.1, seed=SEED + 1)

    def run(lib, tr, te, cfg):
        if lib.startswith("fastmf"):
            model, seconds = train_hybrid(tr, features, cfg)
            scores = hybrid_scores(model)
        else:
            model, seconds = train_lightfm(tr, features, cfg)
            scores = lightfm_scores(model, features)
        return evaluate(scores, te.to_csr(binary=True), tr.to_csr(binary=True)), seconds

    out = {}
    for lib, grid in grids.items():
        best = max(grid, key=lambda cfg: log("warm inner", lib, cfg, run(
            lib, inner_train, inner_test, cfg))[0][1])
        metrics, _ = run(lib, train, test, best)
        out[lib] = (best, metrics)
    return out, train


def throughput(train, features, epochs: int, repeats: int = 3):
    """Interactions per second of training (BPR, one negative per positive), fastmf's
    Hybrid at batch 1024 and at its default batch (4096) beside LightFM."""
    torch.set_num_threads(2)
    cfg_f = dict(lr=0.05, epochs=epochs, batch_size=1024, loss="bpr", negatives=1, reg=0.0)
    runs = {"fastmf": (train_hybrid, cfg_f),
            "fastmf-4096": (train_hybrid, dict(cfg_f, batch_size=4096)),
            "lightfm": (train_lightfm, dict(lr=0.05, epochs=epochs, loss="bpr"))}
    best = dict.fromkeys(runs, np.inf)
    for _ in range(repeats):  # interleaved, best of: the machine is shared
        for lib, (train_fn, cfg) in runs.items():
            best[lib] = min(best[lib], train_fn(train, features, cfg)[1])
    return {lib: len(train) * epochs / s for lib, s in best.items()}


def train_mf(train: Interactions, cfg: dict):
    torch.manual_seed(SEED)
    model = fastmf.MF(train.num_users, train.num_items, dim=DIM)
    fastmf.fit(model, train, loss="bpr", epochs=cfg["epochs"], lr=cfg["lr"], reg=cfg["reg"],
               num_negatives=cfg["negatives"], progress=False, seed=SEED)
    model.attach_data(train)
    return model


def mf_scores(model, users) -> np.ndarray:
    p, q, _, bi = model.tables()
    return (p.detach()[users] @ q.detach().T + bi.detach()).numpy()


def cold_users(data, grid, fold_grid, ns=(0, 1, 3, 10), min_positives=13):
    def split_users(d, seed):
        rng = np.random.default_rng(seed)
        users = np.unique(d.users)
        held = rng.choice(users, int(round(0.2 * len(users))), replace=False)
        mask = np.isin(d.users, held)
        return subset(d, ~mask), subset(d, mask), held

    def known_and_rest(part, n):
        """Per held-out user with enough positives: (known item indices, later ones)."""
        df = pd.DataFrame({"u": part.users, "i": part.items, "t": part.timestamps})
        df = df.sort_values(["u", "t", "i"], kind="stable")
        out = {}
        for u, g in df.groupby("u"):
            if len(g) >= min_positives:
                out[u] = (g.i.to_numpy()[:n], g.i.to_numpy()[n:])
        return out

    def rows(base: Interactions, users, extra: dict) -> Interactions:
        """``base`` plus the known interactions of ``extra``."""
        eu = np.concatenate([np.full(len(k), u) for u, (k, _) in extra.items()])
        ei = np.concatenate([k for k, _ in extra.values()])
        return Interactions(np.concatenate([base.users, eu]), np.concatenate([base.items, ei]),
                            user_map=base.user_map, item_map=base.item_map)

    def score_all(model, cases, how, fold):
        ndcgs = []
        popularity = np.bincount(model_train.items, minlength=data.num_items).astype(float)
        if how == "fold-in":
            fold = dict(fold)
            if fold.get("prior") == "mean":
                # The mean over the users the model was trained on (the held-out users
                # have rows too, left at their random start).
                fold["prior"] = coldstart.user_prior(model, np.unique(model_train.users))
        for u, (known, rest) in cases.items():
            if how == "fold-in":
                vec, _ = coldstart.fold_in(model, known, loss="bpr", **fold)
                _, q, _, bi = model.tables()
                s = (q.detach() @ vec + bi.detach()).numpy()
            elif how == "retrained":
                s = mf_scores(model, [u])[0]
            else:
                s = popularity
            test = sp.csr_matrix((np.ones(len(rest)), (np.zeros(len(rest), int), rest)),
                                 shape=(1, data.num_items))
            ex = sp.csr_matrix((np.ones(len(known)), (np.zeros(len(known), int), known)),
                               shape=(1, data.num_items))
            ndcgs.append(evaluate(s[None, :], test, ex)[1])
        return float(np.mean(ndcgs))

    # Inner tuning: MF settings (n = 3, retrained) and fold-in settings (mean over n = 1, 3,
    # 10: no retraining needed) on users held out of the training part.
    train, held_part, _ = split_users(data, SEED)
    inner_train, inner_part, _ = split_users(train, SEED + 1)
    inner_cases = known_and_rest(inner_part, 3)
    model_train = inner_train
    scored = []
    for cfg in grid:
        retrained = train_mf(rows(inner_train, None, inner_cases), cfg)
        scored.append((log("cold users inner", "MF", cfg,
                           score_all(retrained, inner_cases, "retrained", None)), cfg))
    mf_cfg = max(scored, key=lambda x: x[0])[1]
    inner_model = train_mf(inner_train, mf_cfg)
    inner_by_n = {n: known_and_rest(inner_part, n) for n in ns if n > 0}

    def inner_fold(f):
        per_n = [score_all(inner_model, c, "fold-in", f) for c in inner_by_n.values()]
        return log("cold users inner", "fold-in", f,
                   f"{np.mean(per_n):.4f} (n = {list(inner_by_n)}: "
                   f"{', '.join(f'{x:.4f}' for x in per_n)})"), float(np.mean(per_n))

    inner_scores = [(inner_fold(f)[1], i) for i, f in enumerate(fold_grid)]
    # The best setting of each prior, and which prior wins on the inner split.
    fold_cfgs = {}
    for prior in dict.fromkeys(f["prior"] for f in fold_grid):
        best = max((s, i) for s, i in inner_scores if fold_grid[i]["prior"] == prior)
        fold_cfgs[prior] = (fold_grid[best[1]], best[0])

    model_train = train
    base = train_mf(train, mf_cfg)
    table = {}
    for n in ns:
        cases = known_and_rest(held_part, n)
        row = dict(users=len(cases))
        for prior, (f, _) in fold_cfgs.items():
            row[f"fold_in_{prior}"] = (score_all(base, cases, "fold-in", f)
                                       if n > 0 or prior != "zero" else None)
        if n > 0:
            retrained = train_mf(rows(train, None, cases), mf_cfg)
            row["retrained"] = score_all(retrained, cases, "retrained", None)
        else:
            row["retrained"] = None
        row["popularity"] = score_all(base, cases, "popularity", None)
        table[n] = row
    return mf_cfg, fold_cfgs, table


def synthetic_with_features(seed: int = SEED):
    """A second, differently shaped set: fastmf.datasets.synthetic implicit data (3,000 users
    x 1,500 items, 60,000 positives, rank 8) with genre-like item features correlated with
    the planted item factors: each item has its three closest of 24 random genre directions
    (affinity plus N(0, 0.5²) noise) and one of 300 random tags (no signal)."""
    data, truth = fastmf.datasets.synthetic(3000, 1500, 60_000, dim=8, implicit=True,
                                            seed=seed, return_truth=True)
    rng = np.random.default_rng(seed)
    genres = rng.normal(size=(24, 8))
    affinity = truth.item_factors @ genres.T + rng.normal(0, 0.5, (1500, 24))
    top3 = np.argsort(-affinity, axis=1)[:, :3]
    raw_items = data.item_map.raw_ids
    index = data.item_map.lookup(raw_items)
    rows = [(raw, f"g{g}") for raw, i in zip(raw_items, index) for g in top3[i]]
    rows += [(raw, f"t{rng.integers(300)}") for raw in raw_items]
    table = pd.DataFrame(rows, columns=["item", "name"])
    features = Features.from_pandas(table, "item", id_map=data.item_map, categorical="name")
    return data, features


def inner_runs(sets: dict, configs, what: str):
    """Hybrid trained with each of ``configs`` on the inner splits only (cold items: 20% of
    the training items held out; warm: 10% of the training interactions) of each data set;
    returns {(set name, index of the config): dict(cold=(AUC, NDCG@10), warm=(...),
    seconds=training seconds of both)}."""
    results = {}
    for name, (data, features) in sets.items():
        train_c, _, _ = hold_out_items(data, 0.2, SEED)
        inner_train_c, inner_test_c, inner_cold = hold_out_items(train_c, 0.2, SEED + 1)
        rows = features_only(features, inner_cold)
        train_w, _ = fastmf.data.random_split(data, 0.2, seed=SEED)
        inner_train_w, inner_test_w = fastmf.data.random_split(train_w, 0.1, seed=SEED + 1)
        for index, cfg in enumerate(configs):
            model, cold_s = train_hybrid(inner_train_c, features, cfg)
            cold = evaluate(hybrid_scores(model, rows, inner_cold),
                            inner_test_c.to_csr(binary=True), None, candidates=inner_cold)
            model, warm_s = train_hybrid(inner_train_w, features, cfg)
            warm = evaluate(hybrid_scores(model), inner_test_w.to_csr(binary=True),
                            inner_train_w.to_csr(binary=True))
            results[name, index] = log(f"{what} inner", name, cfg,
                                       dict(cold=cold, warm=warm, seconds=cold_s + warm_s))
    return results


def accumulator(sets: dict, values=(0.0, 1e-6, 1e-5)):
    """Hybrid's default Adagrad starting accumulator, picked on the inner splits of each
    data set, Hybrid's defaults otherwise (BPR; WARP with 10 candidates)."""
    configs = [dict(loss=loss, epochs=20, lr=0.05, reg=1e-4, batch_size=1024,
                    negatives=10 if loss == "warp" else 4, accumulator=value)
               for loss in ("bpr", "warp") for value in values]
    runs = inner_runs(sets, configs, "accumulator")
    return {(name, configs[i]["loss"], configs[i]["accumulator"]): r
            for (name, i), r in runs.items()}


def batch_size(sets: dict, seeds: int = 3):
    """Hybrid's default batch size and learning rate, picked on the inner splits of each
    data set: batch 1024 (the earlier default) against 4096 at three learning rates and two
    lengths, for BPR and BCE (4 negatives; the "implicit" defaults serve both) and WARP (10
    candidates), reg 1e-4 as the defaults. Each split's NDCG@10 is taken relative to the
    best setting of that loss on that split and averaged over the four splits (cold and
    warm of each set). The grid runs with one seed; the earlier default and the two best
    settings of each loss then run with ``seeds - 1`` more seeds, and those finalists are
    compared by the mean over the seeds (each seed's NDCG@10 relative to the best finalist).
    Returns {loss: [(config, mean relative NDCG@10, per-seed means, training seconds of
    seed 0, per-split NDCG@10 of seed 0)]}, the finalists first; the other rows' one value
    is seed 0's, relative to the best of the whole grid."""
    losses = ("bpr", "bce", "warp")
    configs = [dict(loss=loss, epochs=e, lr=lr, reg=1e-4, batch_size=b,
                    negatives=10 if loss == "warp" else 4)
               for loss in losses
               for b, lr in ((1024, 0.05), (4096, 0.05), (4096, 0.1), (4096, 0.2))
               for e in (20, 40)]
    splits = [(name, part) for name in sets for part in ("cold", "warm")]

    def relative(runs, indices):
        best = {key: max(runs[key[0], i][key[1]][1] for i in indices) for key in splits}
        return {i: float(np.mean([runs[n, i][part][1] / best[n, part] for n, part in splits]))
                for i in indices}

    runs = inner_runs(sets, configs, "batch")
    table = {}
    for loss in losses:
        mine = [i for i, c in enumerate(configs) if c["loss"] == loss]
        first = relative(runs, mine)
        default = mine[0]  # batch 1024, lr 0.05, 20 epochs: the earlier default
        ranked = sorted(mine, key=first.get, reverse=True)
        finalists = [default] + [i for i in ranked if i != default][:2]
        per_seed = [relative(runs, finalists)]
        for seed in range(1, seeds):
            more = inner_runs(sets, [dict(configs[i], seed=seed) for i in finalists],
                              f"batch seed {seed}")
            per_seed.append(relative({(n, finalists[j]): r for (n, j), r in more.items()},
                                     finalists))
        rows = []
        for i in sorted(mine, key=lambda i: (i not in finalists, -first[i])):
            # Finalists: relative to the best finalist, per seed; the rest of the grid:
            # seed 0, relative to the best of the whole grid.
            means = [r[i] for r in per_seed] if i in finalists else [first[i]]
            rows.append((configs[i], float(np.mean(means)), means,
                         sum(runs[n, i]["seconds"] for n in sets),
                         {f"{n} {part}": runs[n, i][part][1] for n, part in splits}))
        table[loss] = rows
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/shared/data/ml-latest-small")
    parser.add_argument("--quick", action="store_true", help="one setting per library")
    parser.add_argument("--scenarios", default="cold,warm,users,throughput",
                        help="comma-separated subset of cold,warm,users,throughput,"
                        "users-synthetic,accumulator,batch")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data, features = load(Path(args.data))
    print(f"{len(data)} positives, {data.num_users} users x {data.num_items} items; "
          f"{features}")
    # Small grids: the machine is a shared 2-core CPU. LightFM trains in seconds, so it
    # gets both of its losses at two lengths (WARP at two learning rates).
    h = dict(batch_size=1024, reg=0.0, loss="bpr")
    # The third setting is Hybrid's defaults for BPR (scenario "batch").
    fastmf_grid = [dict(h, lr=0.05, epochs=10, negatives=1),
                   dict(h, lr=0.1, epochs=10, negatives=4),
                   dict(h, lr=0.05, epochs=40, negatives=4, batch_size=4096, reg=1e-4)]
    # The "accumulator" scenario's BPR settings (Adagrad's sum of squares starting at 1e-6
    # or 1e-5 instead of 0; see warp_grid below), as WARP's grid has them.
    fastmf_grid += [dict(h, lr=0.05, epochs=20, negatives=4, reg=1e-4, accumulator=a)
                    for a in (1e-6, 1e-5)]
    # WARP: the negatives are the candidates per positive (LightFM's max_sampled is 10).
    # "accumulator": Adagrad's starting sum of squares, LightFM's 1 for the gradient of a
    # batch mean (1/B of a per-sample one): 1/B^2. It damps the first steps of rarely
    # seen rows, where torch's 0 makes every first step lr * sign(g).
    warp_grid = [dict(h, loss="warp", lr=0.05, epochs=e, negatives=10, batch_size=b, **acc)
                 for b, acc in ((1024, {}), (1024, dict(accumulator=1e-6)),
                                (256, dict(accumulator=1.5e-5)))
                 for e in (10, 30)]
    # Hybrid's defaults (batch 4096, 40 epochs), with WARP's 10 candidates.
    warp_grid.append(dict(h, loss="warp", lr=0.05, epochs=40, negatives=10, batch_size=4096,
                          reg=1e-4))
    # LightFM: both losses at its default learning rate, and WARP also at twice that.
    lightfm_grid = [dict(loss=loss, lr=lr, epochs=e) for loss, lr in
                    (("warp", 0.05), ("warp", 0.1), ("bpr", 0.05)) for e in (10, 30)]
    mf_grid = [dict(lr=lr, epochs=10, reg=1e-4, negatives=4) for lr in (0.05, 0.2)]
    # Fold-in shrunk toward 0 or toward the mean trained user (fastmf.models.coldstart's
    # prior), each at three strengths.
    fold_grid = [dict(steps=s, lr=0.05, reg=r, prior=p) for p in ("zero", "mean")
                 for r in (0.1, 0.3, 1.0, 3.0) for s in (30, 100)]
    if args.quick:
        fastmf_grid, warp_grid, lightfm_grid = fastmf_grid[:1], warp_grid[:1], lightfm_grid[:1]
        mf_grid, fold_grid = mf_grid[:1], [fold_grid[0], fold_grid[8]]
    grids = {"fastmf": fastmf_grid, "fastmf-warp": warp_grid, "lightfm": lightfm_grid}
    scenarios = set(args.scenarios.split(","))

    t0 = time.perf_counter()
    if "cold" in scenarios:
        res = cold_items(data, features, grids, args.quick)
        for lib, (cfg, (auc, ndcg)) in res.items():
            print(f"cold items  {lib:11s} AUC {auc:.4f}  NDCG@10 {ndcg:.4f}  ({cfg})")
    if "warm" in scenarios or "throughput" in scenarios:
        res, warm_train = warm_items(data, features, grids if "warm" in scenarios else {},
                                     args.quick)
        for lib, (cfg, (auc, ndcg)) in res.items():
            print(f"warm items  {lib:11s} AUC {auc:.4f}  NDCG@10 {ndcg:.4f}  ({cfg})")
    if "users" in scenarios:
        mf_cfg, fold_cfgs, table = cold_users(data, mf_grid, fold_grid)
        print(f"cold users  MF {mf_cfg}")
        for prior, (cfg, inner) in fold_cfgs.items():
            print(f"cold users  fold-in, {prior} prior: {cfg} (inner mean NDCG@10 {inner:.4f})")

        def fmt(x):
            return "   -  " if x is None else f"{x:.4f}"
        for n, row in table.items():
            folds = "  ".join(f"fold-in ({p}) {fmt(row[f'fold_in_{p}'])}" for p in fold_cfgs)
            print(f"cold users  n={n:2d} ({row['users']} users)  NDCG@10 {folds}  retrained "
                  f"{fmt(row['retrained'])}  popularity {fmt(row['popularity'])}")
    if "users-synthetic" in scenarios:
        # A second shape for fold-in's defaults (prior and strength), inner rows only count.
        syn_grid = [dict(steps=50, lr=0.05, reg=r, prior=p) for p in ("zero", "mean")
                    for r in (0.1, 0.3, 1.0)]
        mf_cfg, fold_cfgs, table = cold_users(synthetic_with_features()[0], mf_grid, syn_grid)
        print(f"cold users synthetic  MF {mf_cfg}")
        for prior, (cfg, inner) in fold_cfgs.items():
            print(f"cold users synthetic  fold-in, {prior} prior: {cfg} (inner mean NDCG@10 "
                  f"{inner:.4f})")
    if "accumulator" in scenarios:
        res = accumulator({"ml-latest-small": (data, features),
                           "synthetic": synthetic_with_features()})
        for (name, loss, value), r in res.items():
            print(f"accumulator {name:15s} {loss:4s} {value:g}: cold AUC {r['cold'][0]:.4f} "
                  f"NDCG@10 {r['cold'][1]:.4f}  warm AUC {r['warm'][0]:.4f} NDCG@10 "
                  f"{r['warm'][1]:.4f}")
    if "batch" in scenarios:
        res = batch_size({"ml-latest-small": (data, features),
                          "synthetic": synthetic_with_features()})
        for loss, rows in res.items():
            for cfg, mean, means, seconds, per_split in rows:
                splits = "  ".join(f"{k} {v:.4f}" for k, v in per_split.items())
                seeds = " ".join(f"{m:.3f}" for m in means)
                print(f"batch {loss:4s} batch {cfg['batch_size']:5d} lr {cfg['lr']:<4g} "
                      f"epochs {cfg['epochs']:2d}: mean relative NDCG@10 {mean:.3f} (per "
                      f"seed {seeds}), {seconds:.1f} s  [{splits}]")
    if "throughput" in scenarios:
        rates = throughput(warm_train, features, epochs=5, repeats=2)
        print(f"throughput  fastmf {rates['fastmf']:,.0f} interactions/s (batch 1024), "
              f"{rates['fastmf-4096']:,.0f} (batch 4096)  lightfm {rates['lightfm']:,.0f} "
              "interactions/s (BPR, 1 negative, 5 epochs, 2 threads)")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
