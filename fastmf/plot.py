"""Plots of a trained model: the item (or user) space in 2-D (PCA or t-SNE), the training
history, and item popularity against vector norm.

Needs matplotlib and scikit-learn (``pip install fastmf[plot]``); t-SNE uses openTSNE
instead of scikit-learn's when it is installed. Figures are built on matplotlib's Agg
canvas without pyplot, so no window ever opens and no global figure state is touched;
each function returns the :class:`matplotlib.figure.Figure` and saves it when ``path`` is
given (the format follows the extension: ``.png``, ``.svg``, ``.pdf``, ...).

>>> fig = fastmf.plot.embeddings(model, "tsne", color_by="Animation",  # doctest: +SKIP
...                              metadata=data, labels=10, path="items.png")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fastmf.data.interactions import IdMap, Interactions

INSTALL_HINT = "pip install fastmf[plot]"
METHODS = ("pca", "tsne")
# Epoch records that are bookkeeping, not validation metrics.
_NOT_METRICS = ("epoch", "loss", "seconds", "samples_per_s")
_HIGHLIGHT, _OTHER, _FALLBACK = "#d62728", "#c7c7c7", "#1f77b4"
_MAX_CATEGORIES = 10


def _require(op: str, sklearn: bool = False) -> None:
    """Import the optional dependencies or say how to install them."""
    missing = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib")
    if sklearn:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            missing.append("scikit-learn")
    if missing:
        raise ImportError(f"fastmf.plot.{op} needs {' and '.join(missing)}: "
                          f"{INSTALL_HINT}")


def _figure(figsize, dpi, ax, ncols: int = 1, nrows: int = 1):
    """(figure, axes) on a fresh Agg canvas, or ``ax``'s figure when one is given."""
    if ax is not None:
        return ax.figure, [ax]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def check_path(path, where: str = "fastmf.plot") -> Path | None:
    """``path`` as a Path after checking that its folder exists and that matplotlib can
    write its extension: done before any work, so a typo does not cost a t-SNE run.
    ``where`` starts the error message."""
    if path is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(f"{where}: {str(path)!r} has extension {suffix!r}; use one of "
                         f"{sorted(formats)}")
    if not path.absolute().parent.is_dir():
        raise FileNotFoundError(f"{where}: the folder of {str(path)!r} does not exist")
    return path


def _save(fig, path: Path | None) -> None:
    if path is not None:
        # No bbox_inches="tight": the image keeps the size figsize x dpi says.
        fig.savefig(path, dpi=fig.dpi)


# -- ids ---------------------------------------------------------------------------------------

def _side_map(model, side: str) -> IdMap | None:
    return getattr(model, f"{side}_map", None)


def _indices(op: str, model, side: str, ids, raw_ids: bool, what: str) -> np.ndarray:
    """Indices of ``ids`` (raw ids with ``raw_ids``); unknown or out-of-range ids raise."""
    count = getattr(model, f"num_{side}s")
    values = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
    values = values.reshape(-1)
    if raw_ids:
        id_map = _side_map(model, side)
        if id_map is None:
            raise ValueError(f"fastmf.plot.{op}: raw_ids=True but the model holds no {side} "
                             "id map (train it with fastmf.fit or call attach_data)")
        index = id_map.lookup(values)
        if (index < 0).any():
            raise KeyError(f"fastmf.plot.{op}: unknown raw {side} id(s) in {what}: "
                           f"{values[index < 0][:5].tolist()}")
        return index
    if values.size and values.dtype.kind not in "iu":
        raise TypeError(f"fastmf.plot.{op}: {what} must be {side} indices (integers), got "
                        f"dtype {values.dtype}; pass raw_ids=True for raw ids")
    values = values.astype(np.int64)
    bad = (values < 0) | (values >= count)
    if bad.any():
        raise IndexError(f"fastmf.plot.{op}: {what} holds {side} index {int(values[bad][0])}, "
                         f"out of range [0, {count})")
    return values


def _label_text(model, side: str, index: int) -> str:
    titles = getattr(model, "item_titles", None) if side == "item" else None
    if titles and index in titles:
        return str(titles[index])
    id_map = _side_map(model, side)
    return str(id_map.raw_ids[index]) if id_map is not None else str(index)


def _labels(op: str, model, side: str, labels, raw_ids: bool, pool: np.ndarray,
            norms: np.ndarray) -> dict[int, str]:
    """``{index: text}`` of the points to annotate."""
    if labels is None:
        return {}
    if isinstance(labels, bool) or isinstance(labels, int | np.integer):
        if labels < 0:
            raise ValueError(f"fastmf.plot.{op}: labels must be >= 0, got {labels}")
        popularity = getattr(model, "item_popularity", None) if side == "item" else None
        # The most popular items are the ones a reader recognises; without counts, the
        # longest vectors (the model's most confident rows).
        weight = (np.asarray(popularity, dtype=np.float64)[pool] if popularity is not None
                  else norms[pool])
        chosen = pool[np.argsort(-weight, kind="stable")[: int(labels)]]
        return {int(i): _label_text(model, side, int(i)) for i in chosen}
    if isinstance(labels, Mapping):
        index = _indices(op, model, side, list(labels), raw_ids, "labels")
        return {int(i): str(text) for i, text in zip(index, labels.values(), strict=True)}
    if hasattr(labels, "detach"):   # a tensor of ids
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, str) or not isinstance(labels, Sequence | np.ndarray):
        raise TypeError(f"fastmf.plot.{op}: labels must be an int, a list of ids or titles, "
                        f"or a {{id: text}} dict, got {type(labels).__name__}")
    values = list(labels)
    titles = getattr(model, "item_titles", None) if side == "item" else None
    if values and all(isinstance(v, str) for v in values) and not raw_ids:
        if not titles:
            raise ValueError(f"fastmf.plot.{op}: labels are titles but the model holds no "
                             "item titles (train on data with titles, or pass item ids)")
        by_title = {title: i for i, title in titles.items()}
        unknown = [v for v in values if v not in by_title]
        if unknown:
            raise KeyError(f"fastmf.plot.{op}: unknown title(s) in labels: {unknown[:5]}")
        return {by_title[v]: v for v in values}
    index = _indices(op, model, side, values, raw_ids, "labels")
    return {int(i): _label_text(model, side, int(i)) for i in index}


# -- colours -----------------------------------------------------------------------------------

def _metadata_frame(op: str, model, metadata):
    """Item metadata as a DataFrame indexed by the model's item index."""
    import pandas as pd

    if metadata is None:
        return None
    if isinstance(metadata, Interactions):
        frame = metadata.item_metadata
        if frame is None:
            raise ValueError(f"fastmf.plot.{op}: metadata (Interactions) holds no item "
                             "metadata; load it with fastmf.datasets.load_movielens or "
                             "Interactions.with_item_metadata")
        model_map = _side_map(model, "item")
        if model_map is not None:
            # Match by raw id: the data may have been loaded apart from the model.
            index = model_map.lookup(metadata.item_map.raw_ids[frame.index.to_numpy()])
            frame = frame.loc[index >= 0].set_axis(pd.Index(index[index >= 0], name="item"))
        return frame
    if isinstance(metadata, pd.DataFrame):
        return metadata
    raise TypeError(f"fastmf.plot.{op}: metadata must be Interactions or a pandas DataFrame "
                    f"indexed by item index, got {type(metadata).__name__}")


def _genres(frame) -> list[str]:
    if frame is None or "genres" not in frame.columns:
        return []
    names = set()
    for value in frame["genres"].dropna().astype(str):
        names.update(g for g in value.split("|") if g)
    return sorted(names)


def _colour_values(op: str, model, side: str, color_by, metadata):
    """(per-row values over all rows, legend title) for ``color_by``; boolean values mean
    "highlight these"."""
    import pandas as pd

    count = getattr(model, f"num_{side}s")
    if isinstance(color_by, str):
        if color_by == "popularity" and side == "item":
            popularity = getattr(model, "item_popularity", None)
            if popularity is None:
                raise ValueError(f"fastmf.plot.{op}: color_by='popularity' but the model has "
                                 "no item_popularity (train it with fastmf.fit or call "
                                 "attach_data)")
            return np.log10(1.0 + np.asarray(popularity, dtype=np.float64)), \
                "log10(1 + training interactions)"
        frame = _metadata_frame(op, model, metadata) if side == "item" else None
        if frame is None:
            raise ValueError(f"fastmf.plot.{op}: color_by={color_by!r} names a genre or a "
                             "metadata column, so it needs metadata= (e.g. the Interactions "
                             "of fastmf.datasets.load_movielens)")
        if color_by in frame.columns:
            column = frame[color_by]
            if column.dtype.kind == "b":
                return column.reindex(range(count), fill_value=False).to_numpy(bool), color_by
            column = column.reindex(range(count))
            if column.dtype.kind in "iuf":
                return column.to_numpy(dtype=np.float64), color_by
            return column.to_numpy(dtype=object), color_by
        genres = _genres(frame)
        match = {g.lower(): g for g in genres}.get(color_by.lower())
        if match is None:
            raise ValueError(
                f"fastmf.plot.{op}: color_by={color_by!r} is neither a metadata column "
                f"{list(frame.columns)} nor a genre"
                + (f" {genres}" if genres else " (the metadata has no 'genres' column)"))
        flags = np.zeros(count, dtype=bool)
        has = frame["genres"].astype(str).str.split("|").map(lambda gs: match in gs)
        flags[frame.index.to_numpy()[has.to_numpy(dtype=bool)]] = True
        return flags, match
    if isinstance(color_by, pd.Series):
        color_by = color_by.to_numpy()
    values = np.asarray(color_by.detach().cpu().numpy() if hasattr(color_by, "detach")
                        else color_by)
    if values.shape != (count,):
        raise ValueError(f"fastmf.plot.{op}: color_by must hold one value per {side} "
                         f"(shape ({count},)), got shape {values.shape}")
    return values, None


def _scatter(ax, xy: np.ndarray, values, legend_title):
    """Draw the points coloured by ``values`` (None, booleans, numbers or categories)."""
    size = float(np.clip(8000 / max(len(xy), 1), 5, 30))
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=_FALLBACK, alpha=0.6, linewidths=0)
        return
    if values.dtype == bool:
        on = values
        ax.scatter(xy[~on, 0], xy[~on, 1], s=size, c=_OTHER, alpha=0.5, linewidths=0,
                   label=f"other ({int((~on).sum())})")
        ax.scatter(xy[on, 0], xy[on, 1], s=size * 1.6, c=_HIGHLIGHT, alpha=0.85,
                   linewidths=0, label=f"{legend_title or 'selected'} ({int(on.sum())})")
        ax.legend(loc="best", fontsize=8, markerscale=1.5)
        return
    if values.dtype.kind in "iuf":
        values = values.astype(np.float64)
        known = np.isfinite(values)
        if (~known).any():
            ax.scatter(xy[~known, 0], xy[~known, 1], s=size, c=_OTHER, alpha=0.5,
                       linewidths=0, label="no value")
            ax.legend(loc="best", fontsize=8)
        if known.any():
            points = ax.scatter(xy[known, 0], xy[known, 1], s=size, c=values[known],
                                cmap="viridis", alpha=0.8, linewidths=0)
            bar = ax.figure.colorbar(points, ax=ax, shrink=0.8)
            if legend_title:
                bar.set_label(legend_title)
        return
    import pandas as pd

    text = pd.Series(values, dtype=object).where(pd.notna(values), "unknown").astype(str)
    ranked = text.value_counts().index.tolist()
    shown = ranked if len(ranked) <= _MAX_CATEGORIES else ranked[: _MAX_CATEGORIES - 1]
    text = text.where(text.isin(shown), "other").to_numpy()
    if len(ranked) > len(shown):
        shown = [*shown, "other"]
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    for n, name in enumerate(shown):
        on = text == name
        ax.scatter(xy[on, 0], xy[on, 1], s=size, color=palette(n % 10), alpha=0.75,
                   linewidths=0, label=f"{name} ({int(on.sum())})")
    ax.legend(loc="best", fontsize=8, markerscale=1.5, title=legend_title)


# -- projections ---------------------------------------------------------------------------

def _project(op: str, x: np.ndarray, method: str, seed: int):
    """(2-D coordinates, axis names)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(x)
        share = pca.explained_variance_ratio_ * 100
        return xy, (f"PC1 ({share[0]:.1f}% of variance)", f"PC2 ({share[1]:.1f}%)")
    # Cosine distances, as similar_items ranks: vector length mostly tracks popularity.
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    try:
        import openTSNE
    except ImportError:
        openTSNE = None
    if openTSNE is not None:
        xy = np.asarray(openTSNE.TSNE(n_components=2, perplexity=perplexity, metric="cosine",
                                      random_state=seed).fit(x))
    else:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                  random_state=seed).fit_transform(x)
    return xy, ("t-SNE 1", "t-SNE 2")


def _vectors(op: str, model, side: str) -> np.ndarray:
    """The vectors a dot-product model scores with, (rows, dim) float64: ``item_vectors()``
    or ``user_vectors(all users)`` (fastmf.MF's factors; a Hybrid's pooled feature vectors;
    SVD++'s implicit-feedback sums), else ``<side>_factors``; a ValueError for models that
    score through layers (GMF, MLP, NeuMF)."""
    import torch

    if getattr(model, "has_vectors", False):
        with torch.no_grad():
            if side == "item":
                vectors = model.item_vectors()[0]
            else:
                rows = torch.arange(model.num_users, device=model._param_device())
                vectors = model.user_vectors(rows)[0]
        return vectors.detach().cpu().double().numpy()
    factors = getattr(model, f"{side}_factors", None)
    if isinstance(factors, torch.Tensor) and factors.dim() == 2:
        return factors.detach().cpu().double().numpy()
    raise ValueError(f"fastmf.plot.{op}: {type(model).__name__} has no {side} vectors to plot "
                     "(it scores through layers, not a dot product of user and item vectors)")


def embeddings(model, method: str = "pca", *, items=None, color_by=None, labels=None,
               metadata=None, raw_ids: bool = False, side: str = "item", path=None, ax=None,
               sample: int | None = 2000, seed: int = 0, figsize=(8.0, 7.0), dpi: int = 100,
               title: str | None = None):
    """The model's item (or user) vectors in 2-D: PCA, or t-SNE on cosine distances.

    Args:
        model: a dot-product model (``fastmf.MF``, ``Hybrid``, SVD++, ALS, Item2Vec):
            the vectors it scores with.
        method: ``"pca"`` (scikit-learn) or ``"tsne"`` (openTSNE when installed, else
            scikit-learn; perplexity ``min(30, (n - 1) / 3)``).
        items: the ids to plot (raw ids with ``raw_ids``); default all.
        color_by: ``None``; a genre name (``"Animation"``, case-insensitive): those items
            highlighted; a column of ``metadata``; ``"popularity"`` (log training
            interactions); or any array with one value per item index. Booleans
            highlight, numbers get a colour bar, anything else up to 10 categories.
        labels: points to annotate with their titles (raw ids when no titles): an int
            ``n`` (the ``n`` most popular plotted items), a list of ids or of titles, or
            ``{id: text}``. Labelled items are always plotted.
        metadata: item metadata for ``color_by``: the :class:`~fastmf.data.Interactions`
            of ``fastmf.datasets.load_movielens`` (matched by raw item id) or a DataFrame
            indexed by item index (a ``genres`` column holds ``|``-separated genres).
        side: ``"item"`` or ``"user"``.
        path: save the figure there (format by extension).
        ax: draw into these matplotlib axes instead of a new figure.
        sample: plot at most this many points (a uniform sample, seeded); ``None``: all.
        seed: the sample's and the projection's seed.
        figsize, dpi: the new figure's size in inches and resolution (the saved image is
            ``figsize * dpi`` pixels).

    Returns the :class:`matplotlib.figure.Figure`.
    """
    op = "embeddings"
    _require(op, sklearn=True)
    if method not in METHODS:
        raise ValueError(f"fastmf.plot.{op}: unknown method {method!r}; expected one of "
                         f"{METHODS}")
    if side not in ("item", "user"):
        raise ValueError(f"fastmf.plot.{op}: side must be 'item' or 'user', got {side!r}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)
                               or sample < 3):
        raise ValueError(f"fastmf.plot.{op}: sample must be an int >= 3 or None, got "
                         f"{sample!r}")
    path = check_path(path, f"fastmf.plot.{op}: path")
    table = _vectors(op, model, side)
    if method == "pca" and table.shape[1] < 2:
        raise ValueError(f"fastmf.plot.{op}: PCA to 2-D needs vectors of at least 2 "
                         f"dimensions; this model's are {table.shape[1]}-D")
    norms = np.linalg.norm(table, axis=1)
    pool = (np.arange(len(table)) if items is None
            else np.unique(_indices(op, model, side, items, raw_ids, "items")))
    annotate = _labels(op, model, side, labels, raw_ids, pool, norms)
    values, legend_title = (None, None) if color_by is None else _colour_values(
        op, model, side, color_by, metadata)

    chosen = pool
    if sample is not None and len(pool) > sample:
        must = np.fromiter(annotate, dtype=np.int64, count=len(annotate))
        rest = np.setdiff1d(pool, must)
        rng = np.random.default_rng(seed)
        picked = rng.choice(rest, size=max(0, sample - len(must)), replace=False)
        chosen = np.union1d(must, picked)
    else:
        chosen = np.union1d(pool, np.fromiter(annotate, dtype=np.int64, count=len(annotate)))
    if len(chosen) < 3:
        raise ValueError(f"fastmf.plot.{op}: needs at least 3 {side}s to plot, got "
                         f"{len(chosen)}")
    xy, axis_names = _project(op, table[chosen], method, seed)

    fig, (axes,) = _figure(figsize, dpi, ax)
    _scatter(axes, xy, None if values is None else values[chosen], legend_title)
    position = {int(i): n for n, i in enumerate(chosen)}
    for index, text in annotate.items():
        x, y = xy[position[index]]
        axes.scatter([x], [y], s=28, facecolors="none", edgecolors="black", linewidths=0.8)
        axes.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7,
                      alpha=0.9)
    axes.set_xlabel(axis_names[0])
    axes.set_ylabel(axis_names[1])
    total = getattr(model, f"num_{side}s")
    shown = f"{len(chosen):,} of {total:,} {side}s" if len(chosen) < total else (
        f"all {total:,} {side}s")
    axes.set_title(title or f"{side} vectors, {'PCA' if method == 'pca' else 't-SNE'} "
                            f"({shown})")
    _save(fig, path)
    return fig


# -- training history ------------------------------------------------------------------------

def _epochs(op: str, history) -> tuple[list[dict], int | None, str | None]:
    """(epoch records, best epoch, monitored metric)."""
    from fastmf.train import History

    if isinstance(history, Mapping) and "epochs" in history:
        history = History.from_dict(dict(history))
    if isinstance(history, History):
        return list(history.epochs), history.best_epoch, history.monitor
    if isinstance(history, Sequence) and all(isinstance(row, Mapping) for row in history):
        return list(history), None, None
    raise TypeError(f"fastmf.plot.{op}: history must be a fastmf History, its to_dict(), or "
                    f"a list of per-epoch dicts, got {type(history).__name__}")


def history(history, path=None, *, ax=None, figsize=None, dpi: int = 100):
    """Training loss and each validation metric per epoch, one panel each; the best epoch
    (when validation ran) is marked.

    ``history``: what :func:`fastmf.fit` returns (or its ``to_dict()``, as a ``fit``
    checkpoint keeps it, or a list of per-epoch dicts). With ``ax``, only the loss is
    drawn there.

    Returns the :class:`matplotlib.figure.Figure`.
    """
    op = "history"
    _require(op)
    rows, best_epoch, monitor = _epochs(op, history)
    if not rows:
        raise ValueError(f"fastmf.plot.{op}: history has no epochs")
    path = check_path(path, f"fastmf.plot.{op}: path")
    names = ["loss"] + [key for key in rows[0] if key not in _NOT_METRICS
                        and all(isinstance(r.get(key), int | float) for r in rows)]
    for n, row in enumerate(rows):
        if not isinstance(row.get("loss"), int | float) or isinstance(row.get("loss"), bool):
            raise ValueError(f"fastmf.plot.{op}: epoch record {n} holds no numeric 'loss' "
                             f"(keys: {sorted(row)})")
    if ax is not None:
        names = ["loss"]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    figsize = figsize or (4.0 * ncols, 3.2 * nrows)
    fig, axes = _figure(figsize, dpi, ax, ncols, nrows)
    epochs = [int(r.get("epoch", n + 1)) for n, r in enumerate(rows)]
    for panel, name in zip(axes, names, strict=False):
        values = [float(r[name]) for r in rows]
        panel.plot(epochs, values, marker="o", markersize=3)
        if best_epoch is not None and 0 <= best_epoch < len(rows):
            panel.axvline(epochs[best_epoch], color="grey", linestyle="--", linewidth=0.8,
                          label=f"best {monitor or ''} (epoch {epochs[best_epoch]})")
            if name != "loss":
                panel.legend(fontsize=8)
        panel.set_title("training loss" if name == "loss" else f"validation {name}")
        panel.set_xlabel("epoch")
        panel.xaxis.get_major_locator().set_params(integer=True)
    for panel in axes[len(names):]:
        panel.set_visible(False)
    _save(fig, path)
    return fig


# -- popularity vs norm ------------------------------------------------------------------------

def popularity_vs_norm(model, path=None, *, ax=None, figsize=(7.0, 5.0), dpi: int = 100):
    """Each item's training interactions (log x axis) against its vector's length, with
    the median length per popularity bin and Spearman's rank correlation in the title.

    Factor models tend to give popular items long vectors (a dot product then favours
    them); this view shows how strongly. Items without training interactions cannot sit
    on a log axis and are left out (the title says how many).

    Returns the :class:`matplotlib.figure.Figure`.
    """
    op = "popularity_vs_norm"
    _require(op)
    popularity = getattr(model, "item_popularity", None)
    if popularity is None:
        raise ValueError(f"fastmf.plot.{op}: the model has no item_popularity (train it with "
                         "fastmf.fit or call model.attach_data(train))")
    path = check_path(path, f"fastmf.plot.{op}: path")
    import pandas as pd

    counts = np.asarray(popularity, dtype=np.float64)
    norms = np.linalg.norm(_vectors(op, model, "item"), axis=1)
    seen = counts > 0
    if seen.sum() < 2:
        raise ValueError(f"fastmf.plot.{op}: needs at least 2 items with training "
                         f"interactions, got {int(seen.sum())}")
    x, y = counts[seen], norms[seen]
    rho = pd.Series(x).corr(pd.Series(y), method="spearman")
    fig, (axes,) = _figure(figsize, dpi, ax)
    axes.scatter(x, y, s=6, alpha=0.35, linewidths=0, c=_FALLBACK, label="items")
    edges = np.unique(np.geomspace(x.min(), x.max() * 1.000001, 16))
    bins = np.digitize(x, edges)
    centres, medians = [], []
    for b in np.unique(bins):
        on = bins == b
        if on.sum() >= 3:
            centres.append(float(np.exp(np.log(x[on]).mean())))
            medians.append(float(np.median(y[on])))
    if centres:
        axes.plot(centres, medians, color=_HIGHLIGHT, marker="o", markersize=3,
                  label="median per bin")
    axes.set_xscale("log")
    axes.set_xlabel("training interactions (log scale)")
    axes.set_ylabel("item vector norm")
    left_out = int((~seen).sum())
    note = f"; {left_out:,} items without interactions left out" if left_out else ""
    axes.set_title(f"popularity vs vector norm (Spearman rho = {rho:.2f}{note})", fontsize=10)
    axes.legend(loc="best", fontsize=8)
    _save(fig, path)
    return fig


__all__ = ["check_path", "embeddings", "history", "popularity_vs_norm"]
