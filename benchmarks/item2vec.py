"""Item2Vec neighbour quality on MovieLens ml-latest-small (not run in CI).

Reported: genre agreement of the top-10 most similar movies (cosine on the item vectors) for
every movie with >= 20 ratings, for Item2Vec, MF's item factors (fastmf.MF trained by
fastmf.fit with its defaults, loss bpr), 10 random movies and the 10 most popular movies.
Two measures: mean Jaccard similarity of the genre sets (query vs neighbour) and the share
of neighbours sharing at least one genre with the query; each over all movies as
candidates and over the movies with >= 20 ratings only.

Item2Vec's defaults are chosen with ``--tune`` on a different criterion: next-item hit rate
(HR@10 of each user's latest movie, held out by time, ranked by the mean vector of the
user's earlier movies, their own movies excluded) on two differently shaped subsets of the
same ratings: the dense core (movies with >= 20 ratings) and the light users (users with at
most the median number of ratings, all their movies). One knob at a time from a starting
point, keeping a change when the mean HR@10 of the two subsets improves (min_count was
searched afterwards, from the first search's choice, with ``--tune-min-count``).

    python benchmarks/item2vec.py --data /work/shared/data/ml-latest-small [--tune]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fastmf
from fastmf import retrieval
from fastmf.data import leave_one_out
from fastmf.models.item2vec import Item2Vec

# The search is small because it ran on a shared 2-core machine (about 10 s per epoch of
# both subsets): epochs 1..8 are all scored in each run.
START = dict(dim=64, window=5, epochs=8, lr=0.05, num_negatives=5, subsample=1e-3,
             batch_size=4096)
GRID = dict(subsample=[None, 1e-3, 1e-4, 1e-5], window=[2, 5, 10], lr=[0.025, 0.05, 0.1],
            num_negatives=[5, 10], dim=[32, 64])
MIN_RATINGS = 20


def train_item2vec(data, *, dim, window, epochs, lr, num_negatives, subsample, batch_size,
                   min_count=1, seed=0, each_epoch=None):
    torch.manual_seed(seed)
    model = Item2Vec(data.num_items, dim=dim, window=window, subsample=subsample,
                     min_count=min_count)
    model.prepare(data)
    optimizer = model.make_optimizer("adagrad", lr)
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        for batch in model.batches(data, batch_size=batch_size, num_negatives=num_negatives,
                                   generator=gen):
            model.training_step(batch, optimizer, loss="bce")
        if each_epoch is not None:
            each_epoch(epoch + 1, model)
    return model


def hit_rate(model, train, test, k=10) -> float:
    """HR@k of the held-out items, each user ranked by <mean history vector, item vector>."""
    users = test.users
    vectors, _ = model.user_vectors(torch.as_tensor(users))
    items, _ = model.item_vectors()
    exclude = train.to_csr(binary=True)[users]
    _, top = retrieval.topk_scores(vectors, items, None, k, exclude=exclude)
    truth = np.zeros(train.num_users, dtype=np.int64)
    truth[test.users] = test.items
    return float((top.numpy() == truth[users][:, None]).any(1).mean())


def popularity_hit_rate(train, test, k=10) -> float:
    counts = torch.as_tensor(np.bincount(train.items, minlength=train.num_items),
                             dtype=torch.float64)
    exclude = train.to_csr(binary=True)[test.users]
    zeros = torch.zeros(len(test.users), 0, dtype=torch.float64)
    _, top = retrieval.topk_scores(zeros, torch.zeros(train.num_items, 0, dtype=torch.float64),
                                   counts, k, exclude=exclude)
    return float((top.numpy() == test.items[:, None]).any(1).mean())


def validation_sets(data):
    counts = np.bincount(data.items, minlength=data.num_items)
    per_user = np.bincount(data.users, minlength=data.num_users)
    dense = data.subset(counts[data.items] >= MIN_RATINGS)
    light = data.subset(per_user[data.users] <= np.median(per_user[per_user > 0]))
    return {"dense core": leave_one_out(dense, by="time"),
            "light users": leave_one_out(light, by="time")}


def tune(data) -> dict:
    sets = validation_sets(data)
    for name, (train, test) in sets.items():
        print(f"{name}: {len(train)} train rows, {len(test)} held out, "
              f"{len(np.unique(train.items))} movies; popularity HR@10 "
              f"{popularity_hit_rate(train, test):.4f}")
    tried: dict[tuple, tuple[float, int]] = {}

    def score(config):
        """Mean HR@10 over the sets at the best epoch count <= config's epochs (every
        epoch is evaluated, so the epoch count is tuned along)."""
        key = tuple(sorted(config.items(), key=lambda kv: kv[0]))
        key = tuple((k, v) for k, v in key if k != "epochs")
        if key in tried:
            return tried[key]
        curves = []
        start = time.perf_counter()
        for train, test in sets.values():
            curve = []
            train_item2vec(train, **config,
                           each_epoch=lambda e, m, c=curve, tr=train, te=test:
                           c.append(hit_rate(m, tr, te)))
            curves.append(curve)
        mean = np.mean(curves, axis=0)
        best = int(np.argmax(mean))
        tried[key] = (float(mean[best]), best + 1)
        cells = " ".join(f"{c[best]:.4f}" for c in curves)
        print(f"  {config} -> HR@10 {cells} mean {mean[best]:.4f} at {best + 1} epochs "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return tried[key]

    config = dict(START)
    best, best_epochs = score(config)
    for knob, values in GRID.items():
        for value in values:
            if value == config[knob]:
                continue
            candidate = dict(config, **{knob: value})
            result, epochs = score(candidate)
            if result > best:
                best, best_epochs, config = result, epochs, candidate
    config["epochs"] = best_epochs
    print(f"chosen: {config} (mean HR@10 {best:.4f})")
    return config


def genre_sets(data) -> list[frozenset]:
    genres = [frozenset()] * data.num_items
    for index, text in data.item_metadata["genres"].items():
        names = frozenset(text.split("|")) - {"(no genres listed)"}
        genres[int(index)] = names
    return genres


def agreement(neighbours: np.ndarray, queries: np.ndarray, genres) -> tuple[float, float]:
    """(mean Jaccard of genre sets, share of neighbours sharing a genre) over all
    (query, neighbour) pairs."""
    jaccard, shared = [], []
    for q, row in zip(queries, neighbours, strict=True):
        g = genres[q]
        for n in row:
            h = genres[n]
            jaccard.append(len(g & h) / len(g | h) if g | h else 0.0)
            shared.append(bool(g & h))
    return float(np.mean(jaccard)), float(np.mean(shared))


def cosine_neighbours(vectors: torch.Tensor, queries, k=10, candidates=None) -> np.ndarray:
    vectors = vectors.detach().float()
    if candidates is None:
        return retrieval.similar(vectors, torch.as_tensor(queries), k)[1].numpy()
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q = torch.as_tensor(queries)
    exclude = (torch.arange(len(q) + 1), q)  # each query leaves itself out
    return retrieval.topk_scores(unit[q], unit, None, k, exclude=exclude,
                                 candidates=torch.as_tensor(candidates))[1].numpy()


def random_neighbours(rng, queries, pool, k=10) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for row, q in enumerate(queries):
        picks = rng.choice(pool, size=k + 1, replace=False)
        out[row] = picks[picks != q][:k]
    return out


def popular_neighbours(counts, queries, pool, k=10) -> np.ndarray:
    ranked = pool[np.argsort(-counts[pool], kind="stable")][:k + 1]
    return np.stack([ranked[ranked != q][:k] for q in queries])


def report(data, config) -> None:
    genres = genre_sets(data)
    counts = np.bincount(data.items, minlength=data.num_items)
    queries = np.flatnonzero((counts >= MIN_RATINGS) & np.array([bool(g) for g in genres]))
    frequent = np.flatnonzero(counts >= MIN_RATINGS)
    everything = np.arange(data.num_items)
    print(f"{len(queries)} query movies (>= {MIN_RATINGS} ratings, with genres)")

    torch.manual_seed(0)
    item2vec = Item2Vec.from_interactions(
        data, dim=config["dim"], window=config["window"], subsample=config["subsample"],
        min_count=config.get("min_count", 1))
    start = time.perf_counter()
    fastmf.fit(item2vec, data, epochs=config["epochs"], lr=config["lr"],
               batch_size=config["batch_size"], num_negatives=config["num_negatives"],
               progress=False)
    i2v_seconds = time.perf_counter() - start
    torch.manual_seed(0)
    mf = fastmf.MF(data.num_users, data.num_items)
    start = time.perf_counter()
    fastmf.fit(mf, data, loss="bpr", progress=False)
    mf_seconds = time.perf_counter() - start

    rows = []
    for name, seconds, vectors in (
            (f"Item2Vec (dim {config['dim']}, window {config['window']}, min_count "
             f"{config.get('min_count', 1)})", i2v_seconds,
             item2vec.item_vectors()[0]),
            ("MF item factors (bpr, fit defaults, dim 64)", mf_seconds,
             mf.item_factors)):
        cells = []
        for pool in (None, frequent):
            cells += agreement(cosine_neighbours(vectors, queries, candidates=pool), queries,
                               genres)
        rows.append((name, cells, f"{seconds:.0f}"))
    rng = np.random.default_rng(0)
    random_cells = np.mean([agreement(random_neighbours(rng, queries, everything), queries,
                                      genres)
                            + agreement(random_neighbours(rng, queries, frequent), queries,
                                        genres) for _ in range(5)], axis=0)
    cells_random = [random_cells[0], random_cells[1], random_cells[2], random_cells[3]]
    rows.append(("random (mean of 5 draws)", cells_random, "-"))
    rows.append(("most popular", list(agreement(popular_neighbours(counts, queries, everything),
                                                queries, genres))
                 + list(agreement(popular_neighbours(counts, queries, frequent), queries,
                                  genres)), "-"))
    print("\n| neighbours | Jaccard (all) | share a genre (all) | Jaccard (>= 20) "
          "| share a genre (>= 20) | train s |")
    print("|---|---|---|---|---|---|")
    for name, cells, seconds in rows:
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {seconds} |")

    titles = data.item_titles
    examples = ["Toy Story (1995)", "Matrix, The (1999)", "Godfather, The (1972)",
                "Notting Hill (1999)", "Shining, The (1980)"]
    by_title = {t: i for i, t in titles.items()}
    print()
    for title in examples:
        if title not in by_title:
            continue
        q = by_title[title]
        for label, vectors in (("Item2Vec", item2vec.item_vectors()[0]),
                               ("MF", mf.item_factors)):
            top = cosine_neighbours(vectors, [q], k=5)[0]
            print(f"- {title} [{label}]: " + "; ".join(titles.get(int(i), str(i)) for i in top))


def default_config() -> dict:
    """Item2Vec's defaults: the constructor's knobs and its fit defaults."""
    import inspect

    knobs = inspect.signature(Item2Vec).parameters
    config = {name: knobs[name].default for name in ("dim", "window", "subsample", "min_count")}
    # num_negatives included: Item2Vec.defaults holds the searched value (5).
    config.update({k: v for k, v in Item2Vec.defaults["implicit"].items() if k != "reg"})
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/ml-latest-small")
    parser.add_argument("--tune", action="store_true", help="choose the defaults first")
    parser.add_argument("--tune-min-count", action="store_true",
                        help="search min_count (and negatives 4/5) from the first search's "
                             "choice")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = fastmf.datasets.load_movielens(args.data)
    if args.tune_min_count:
        global START, GRID
        START = dict(dim=64, window=2, epochs=8, lr=0.05, num_negatives=5, subsample=1e-3,
                     batch_size=4096, min_count=1)
        GRID = dict(min_count=[1, 3, 5, 10], num_negatives=[4, 5])
    config = tune(data) if args.tune or args.tune_min_count else default_config()
    report(data, config)


if __name__ == "__main__":
    main()
