"""fastmf.plot and `fastmf plot`: real images of the expected size and content, on
generated data with titles and genres."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import matplotlib.image as mpimg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import fastmf  # noqa: E402
from fastmf import plot  # noqa: E402
from fastmf.cli import main  # noqa: E402
from fastmf.data import IdMap, Interactions, random_split  # noqa: E402

NUM_USERS, NUM_ITEMS = 90, 120
GENRES = ["Animation|Comedy", "Drama", "Comedy", "Action|Thriller", "Animation|Children"]


def ratings_frame(seed: int = 0, n: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pairs = rng.choice(NUM_USERS * NUM_ITEMS, size=n, replace=False)
    return pd.DataFrame({"userId": pairs // NUM_ITEMS + 1,
                         "movieId": (pairs % NUM_ITEMS) * 3 + 10,   # raw ids != indices
                         "rating": rng.integers(1, 11, n) / 2,
                         "timestamp": rng.integers(900_000_000, 1_000_000_000, n)})


def movies_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 1)
    raw = np.arange(NUM_ITEMS) * 3 + 10
    return pd.DataFrame({"movieId": raw, "title": [f"Movie {r} ({1950 + r % 60})" for r in raw],
                         "genres": np.array(GENRES)[rng.integers(0, len(GENRES), NUM_ITEMS)],
                         "year": 1950 + raw % 60})


@pytest.fixture(scope="module")
def data():
    df = ratings_frame()
    inter = Interactions.from_pandas(df, "userId", "movieId", "rating", "timestamp")
    assert inter.num_items == NUM_ITEMS
    return inter.with_item_metadata(movies_frame())


@pytest.fixture(scope="module")
def trained(data):
    train, valid = random_split(data, test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = fastmf.MF(data.num_users, data.num_items, dim=8)
    history = fastmf.fit(model, train, valid=valid, epochs=3, metrics=("rmse", "ndcg@10"),
                         progress=False)
    return model, history


def image(path, width: int, height: int) -> np.ndarray:
    """The image at ``path`` as (height, width, RGB) floats, checked to be a real picture of
    that size: many distinct colours, not one flat fill."""
    assert path.stat().st_size > 1000
    img = mpimg.imread(path)
    assert img.shape[:2] == (height, width), img.shape
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 20
    assert rgb.std() > 0.05
    return rgb


def reddish(rgb: np.ndarray) -> int:
    """Pixels of the highlight colour (red over white, any alpha)."""
    return int(((rgb[:, 0] > 0.7) & (rgb[:, 1] < 0.5) & (rgb[:, 2] < 0.5)).sum())


def points(fig, n: int = 0) -> np.ndarray:
    return np.asarray(fig.axes[0].collections[n].get_offsets())


# -- embeddings ----------------------------------------------------------------------------

def test_pca_png_has_the_size_and_the_model_vectors(trained, tmp_path):
    from sklearn.decomposition import PCA

    model, _ = trained
    path = tmp_path / "items.png"
    fig = plot.embeddings(model, "pca", path=path, figsize=(6, 5), dpi=80)
    assert isinstance(fig, Figure)
    rgb = image(path, 480, 400)
    assert reddish(rgb) == 0   # nothing highlighted without color_by
    want = PCA(2, random_state=0).fit_transform(model.item_factors.detach().double().numpy())
    got = points(fig)
    for column in range(2):   # components are defined up to their sign
        sign = np.sign(got[:, column] @ want[:, column])
        np.testing.assert_allclose(got[:, column], sign * want[:, column], atol=1e-6)
    assert "all 120 items" in fig.axes[0].get_title()
    assert "PC1" in fig.axes[0].get_xlabel()


def test_tsne_genre_highlight_labels_and_sample(trained, data, tmp_path):
    model, _ = trained
    path = tmp_path / "tsne.png"
    fig = plot.embeddings(model, "tsne", color_by="animation", metadata=data, labels=3,
                          sample=60, path=path, figsize=(5, 4), dpi=100)
    rgb = image(path, 500, 400)
    assert reddish(rgb) > 50
    ax = fig.axes[0]
    other, highlighted = points(fig, 0), points(fig, 1)
    assert len(other) + len(highlighted) == 60
    assert "60 of 120 items" in ax.get_title()
    animated = {i for i, g in zip(data.item_metadata.index, data.item_metadata["genres"],
                                  strict=True) if "Animation" in g.split("|")}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"other ({len(other)})", f"Animation ({len(highlighted)})"]
    assert 0 < len(highlighted) <= len(animated)
    texts = [t.get_text() for t in ax.texts]
    top3 = np.argsort(-model.item_popularity, kind="stable")[:3]
    assert texts == [model.item_titles[int(i)] for i in top3]
    assert np.isfinite(np.vstack([other, highlighted])).all()


def test_genre_flags_are_matched_by_raw_id(trained, data):
    """Metadata loaded apart from the model (another item order) still marks the right items."""
    model, _ = trained
    raw = data.item_map.raw_ids
    shuffled = IdMap(np.random.default_rng(5).permutation(raw), kind="item")
    df = ratings_frame()
    other = Interactions.from_arrays(df["userId"].to_numpy(), df["movieId"].to_numpy(),
                                     item_map=shuffled).with_item_metadata(movies_frame())
    assert not np.array_equal(other.item_map.raw_ids, raw)
    flags, name = plot._colour_values("embeddings", model, "item", "Drama", other)
    genres = movies_frame().set_index("movieId")["genres"]
    want = np.array(["Drama" in genres[r].split("|") for r in raw])
    assert name == "Drama" and flags.dtype == bool
    np.testing.assert_array_equal(flags, want)


def test_color_by_columns_arrays_and_popularity(trained, data, tmp_path):
    model, _ = trained
    fig = plot.embeddings(model, "pca", color_by="year", metadata=data)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "year"   # a colour bar
    colours = np.asarray(fig.axes[0].collections[0].get_array())
    np.testing.assert_allclose(colours, data.item_metadata["year"].to_numpy())
    fig = plot.embeddings(model, "pca", color_by="popularity")
    assert len(fig.axes) == 2
    np.testing.assert_allclose(np.asarray(fig.axes[0].collections[0].get_array()),
                               np.log10(1 + model.item_popularity))
    kinds = np.array(["a", "b", "c"])[np.arange(NUM_ITEMS) % 3]
    path = tmp_path / "kinds.svg"
    fig = plot.embeddings(model, "pca", color_by=kinds, path=path)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a (40)", "b (40)", "c (40)"]
    assert path.read_text().lstrip().startswith("<?xml")
    many = np.arange(NUM_ITEMS).astype(str)   # more categories than colours: the rest "other"
    fig = plot.embeddings(model, "pca", color_by=many.astype(object))
    assert len(fig.axes[0].get_legend().get_texts()) == 10
    mask = torch.arange(NUM_ITEMS) < 7
    fig = plot.embeddings(model, "pca", color_by=mask.numpy())
    assert len(points(fig, 1)) == 7
    with pytest.raises(ValueError, match=r"color_by must hold one value per item \(shape "
                                         r"\(120,\)\), got shape \(5,\)"):
        plot.embeddings(model, "pca", color_by=np.ones(5))
    with pytest.raises(ValueError, match=r"color_by='Western' is neither a metadata column .*"
                                         r"'Action', 'Animation'"):
        plot.embeddings(model, "pca", color_by="Western", metadata=data)
    with pytest.raises(ValueError, match=r"color_by='Drama' names a genre .* needs metadata="):
        plot.embeddings(model, "pca", color_by="Drama")


def test_labels_and_items_by_raw_id(trained):
    model, _ = trained
    raw = model.item_map.raw_ids
    fig = plot.embeddings(model, "pca", items=raw[:40], raw_ids=True, labels=[raw[50]])
    assert len(points(fig)) == 41   # a labelled item is always plotted
    assert [t.get_text() for t in fig.axes[0].texts] == [model.item_titles[50]]
    title = model.item_titles[7]
    fig = plot.embeddings(model, "pca", labels=[title, model.item_titles[9]])
    assert [t.get_text() for t in fig.axes[0].texts] == [title, model.item_titles[9]]
    fig = plot.embeddings(model, "pca", labels=torch.tensor([4, 2]))
    assert [t.get_text() for t in fig.axes[0].texts] == [model.item_titles[4],
                                                         model.item_titles[2]]
    fig = plot.embeddings(model, "pca", labels={raw[3]: "three"}, raw_ids=True)
    assert [t.get_text() for t in fig.axes[0].texts] == ["three"]
    with pytest.raises(KeyError, match=r"unknown raw item id\(s\) in items: \[11\]"):
        plot.embeddings(model, "pca", items=[raw[0], 11], raw_ids=True)
    with pytest.raises(KeyError, match=r"unknown title\(s\) in labels: \['Nope'\]"):
        plot.embeddings(model, "pca", labels=["Nope"])
    with pytest.raises(IndexError, match=r"items holds item index 120, out of range"):
        plot.embeddings(model, "pca", items=[0, 1, 120])
    with pytest.raises(ValueError, match="needs at least 3 items"):
        plot.embeddings(model, "pca", items=[0, 1])


def test_user_side_and_given_axes(trained):
    model, _ = trained
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    out = plot.embeddings(model, "pca", side="user", ax=ax)
    assert out is fig and len(ax.collections[0].get_offsets()) == NUM_USERS
    assert "user vectors" in ax.get_title()


def test_embeddings_bad_arguments(trained, tmp_path):
    model, _ = trained
    with pytest.raises(ValueError, match=r"unknown method 'umap'; expected one of"):
        plot.embeddings(model, "umap")
    with pytest.raises(ValueError, match=r"side must be 'item' or 'user', got 'items'"):
        plot.embeddings(model, side="items")
    with pytest.raises(ValueError, match=r"has extension 'pgn'; use one of"):
        plot.embeddings(model, path=tmp_path / "x.pgn")
    with pytest.raises(FileNotFoundError, match=r"the folder of .*nowhere.* does not exist"):
        plot.embeddings(model, path=tmp_path / "nowhere" / "x.png")
    with pytest.raises(ValueError, match=r"sample must be an int >= 3 or None, got 2"):
        plot.embeddings(model, sample=2)


# -- history and popularity ---------------------------------------------------------------

def test_history_png(trained, tmp_path):
    _, history = trained
    path = tmp_path / "history.png"
    fig = plot.history(history, path, dpi=50)
    image(path, 600, 160)   # three panels of 4 x 3.2 inches at 50 dpi
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["training loss", "validation rmse", "validation ndcg@10"]
    for ax, key in zip(fig.axes, ("loss", "rmse", "ndcg@10"), strict=True):
        np.testing.assert_allclose(ax.lines[0].get_ydata(), history[key])
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
        assert ax.lines[1].get_xdata()[0] == history.best_epoch + 1   # the best epoch mark
    again = plot.history(history.to_dict())   # as a fit checkpoint keeps it
    np.testing.assert_allclose(again.axes[1].lines[0].get_ydata(), history["rmse"])
    rows = plot.history([{"loss": 3.0}, {"loss": 2.5}, {"loss": 2.25}])
    assert len([ax for ax in rows.axes if ax.get_visible()]) == 1
    with pytest.raises(ValueError, match="history has no epochs"):
        plot.history(fastmf.History())
    with pytest.raises(TypeError, match="history must be a fastmf History"):
        plot.history("history.json")


def test_popularity_vs_norm_png(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "pop.png"
    fig = plot.popularity_vs_norm(model, path, figsize=(5, 4), dpi=60)
    image(path, 300, 240)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    got = points(fig)
    seen = model.item_popularity > 0
    np.testing.assert_allclose(got[:, 0], model.item_popularity[seen])
    np.testing.assert_allclose(got[:, 1], model.item_factors.detach().norm(dim=1).numpy()[seen],
                               rtol=1e-6)
    assert "Spearman rho" in ax.get_title()
    with pytest.raises(ValueError, match="has no item_popularity"):
        plot.popularity_vs_norm(fastmf.MF(5, 6, dim=2))


def test_models_beyond_mf_plot_the_vectors_they_score_with(data, tmp_path):
    """Hybrid (pooled feature vectors), not only MF's factors; a model without vectors, a
    1-D model and a history record without a loss get clear errors."""
    train, _ = random_split(data, test_fraction=0.2, seed=0)
    torch.manual_seed(1)
    model = fastmf.models.Hybrid(data.num_users, data.num_items, dim=4)
    fastmf.fit(model, train, loss="bpr", epochs=1, progress=False)
    fig = plot.embeddings(model, "pca", path=tmp_path / "h.png", figsize=(5, 4), dpi=60)
    image(tmp_path / "h.png", 300, 240)
    vectors = model.item_vectors()[0].detach().double().numpy()
    from sklearn.decomposition import PCA

    want = PCA(2, random_state=0).fit_transform(vectors)
    got = points(fig)
    for column in range(2):
        sign = np.sign(got[:, column] @ want[:, column])
        np.testing.assert_allclose(got[:, column], sign * want[:, column], atol=1e-6)
    fig = plot.popularity_vs_norm(model, tmp_path / "p.png", figsize=(5, 4), dpi=60)
    seen = model.item_popularity > 0
    np.testing.assert_allclose(points(fig)[:, 1], np.linalg.norm(vectors, axis=1)[seen],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="MLP has no item vectors to plot"):
        plot.embeddings(fastmf.models.MLP(5, 6, layers=(8, 4)))
    with pytest.raises(ValueError, match="needs vectors of at least 2 dimensions"):
        plot.embeddings(fastmf.MF(5, 6, dim=1))
    with pytest.raises(ValueError, match="epoch record 1 holds no numeric 'loss'"):
        plot.history([{"epoch": 1, "loss": 1.0}, {"epoch": 2}])


# -- optional dependencies and import cost ------------------------------------------------

def test_missing_matplotlib_says_what_to_install(trained, monkeypatch):
    model, history = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"embeddings needs matplotlib: pip install "
                                          r"fastmf\[plot\]"):
        plot.embeddings(model)
    with pytest.raises(ImportError, match=r"history needs matplotlib: pip install"):
        plot.history(history)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"needs matplotlib and scikit-learn"):
        plot.embeddings(model)


def test_import_stays_light_and_no_window_opens():
    code = (
        "import sys, fastmf\n"
        "heavy = {'matplotlib', 'sklearn', 'pandas', 'scipy', 'numba'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "fastmf.plot\n"
        "assert not {'matplotlib', 'sklearn'} & set(sys.modules)\n"
        "fig = fastmf.plot.embeddings(fastmf.MF(5, 30, dim=4), 'pca')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert type(fig.canvas).__name__ == 'FigureCanvasAgg'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command --------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ml") / "ml-small"
    folder.mkdir()
    ratings_frame().to_csv(folder / "ratings.csv", index=False)
    movies_frame().to_csv(folder / "movies.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def saved_model(movielens, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model"
    assert main(["train", "--data", str(movielens), "--out", str(out), "--epochs", "1",
                 "--dim", "4", "--quiet", "--device", "cpu", "--test-fraction", "0"]) == 0
    return out


def test_cli_pca_with_genre_and_labels(capsys, movielens, saved_model, tmp_path):
    out = tmp_path / "items.png"
    code, stdout, err = run(capsys, "plot", "--model", saved_model, "--kind", "pca",
                            "--color-by", "Animation", "--data", movielens, "--label", 4,
                            "--out", out)
    assert code == 0, err
    assert stdout.strip() == f"saved {out} (pca, 800x700 px)"
    assert reddish(image(out, 800, 700)) > 50
    code, _, err = run(capsys, "plot", "--model", saved_model, "--kind", "pca", "--out", out)
    assert code == 2 and f"--out {out} exists; pass --force" in err
    frequent = int((fastmf.load(saved_model).item_popularity >= 25).sum())
    assert 3 <= frequent < NUM_ITEMS
    code, _, err = run(capsys, "plot", "--model", saved_model, "--kind", "pca", "--out", out,
                       "--force", "--min-count", 25)
    assert code == 0, err
    assert f"--min-count 25: {frequent} of {NUM_ITEMS} items" in err
    code, _, err = run(capsys, "plot", "--model", saved_model, "--kind", "popularity",
                       "--out", out, "--force")
    assert code == 0, err
    image(out, 700, 500)


def test_cli_history_needs_a_fit_checkpoint(capsys, data, saved_model, tmp_path):
    out = tmp_path / "history.png"
    code, _, err = run(capsys, "plot", "--model", saved_model, "--kind", "history",
                       "--out", out)
    assert code == 2 and "holds no training history" in err and "checkpoint=DIR" in err
    assert not out.exists()
    train, valid = random_split(data, test_fraction=0.2, seed=1)
    torch.manual_seed(1)
    model = fastmf.MF(data.num_users, data.num_items, dim=4)
    fastmf.fit(model, train, valid=valid, epochs=2, progress=False,
               checkpoint=tmp_path / "ck")
    code, stdout, err = run(capsys, "plot", "--model", tmp_path / "ck", "--kind", "history",
                            "--out", out)
    assert code == 0, err
    assert "(history, 1200x320 px)" in stdout
    image(out, 1200, 320)


@pytest.mark.parametrize("argv, message", [
    (["--kind", "history", "--color-by", "Drama"], "--color-by applies to --kind pca and tsne"),
    (["--kind", "popularity", "--sample", "5"], "--sample applies to --kind pca and tsne"),
    (["--kind", "history", "--seed", "3"], "--seed applies to --kind pca and tsne"),
    (["--kind", "pca", "--data", "x"], "--data gives the item metadata for --color-by"),
    (["--kind", "pca", "--out", "items.jpgx"], "has extension 'jpgx'"),
    (["--kind", "pca", "--color-by", "Western", "--data", "ML"],
     "color_by='Western' is neither a metadata column"),
    (["--kind", "tsne", "--sample", "2"], "sample must be an int >= 3"),
    (["--kind", "lda"], "invalid choice: 'lda'"),
])
def test_cli_errors_are_one_line(capsys, movielens, saved_model, tmp_path, argv, message):
    argv = [str(movielens) if a == "ML" else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    code, _, err = run(capsys, "plot", "--model", saved_model, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("history, message", [
    ({"epochs": [{"loss": 1.0, "epoch": float("inf")}, {"loss": 0.5, "epoch": 2}],
      "monitor": None, "best_epoch": None, "stopped_early": False},
     "epoch record 0's epoch must be an int >= 0"),
    ({"epochs": 5, "monitor": None, "best_epoch": None, "stopped_early": False},
     "epochs must be a list"),
    ({"epochs": [{"loss": 1.0, "epoch": "x"}], "monitor": None, "best_epoch": None,
      "stopped_early": False}, "epoch must be an int"),
    ({"epochs": [{"loss": 1.0}], "monitor": None, "best_epoch": "a", "stopped_early": False},
     r"best_epoch must be null or an int in \[0, 1\)"),
    ({"epochs": [{"loss": "low"}], "monitor": None, "best_epoch": None,
      "stopped_early": False}, "epoch record 0 must hold a numeric loss"),
    ([1, 2], "expected an object"),
])
def test_cli_history_checks_the_stored_history(capsys, tmp_path, history, message):
    """The history plot read a checkpoint's stored history as it found it: an infinite
    epoch number ended in an OverflowError (status 1), other values in messages such as
    "'int' object is not iterable". Now one message, status 2, nothing written."""
    fastmf.checkpoint.save(fastmf.MF(30, 20, dim=4), tmp_path / "ck",
                           extra={"history": history})
    out = tmp_path / "h.png"
    code, _, err = run(capsys, "plot", "--model", tmp_path / "ck", "--kind", "history",
                       "--out", out)
    assert code == 2 and "its stored history is not in the format fastmf.fit writes" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ValueError, match=message):
        fastmf.train.History.from_dict(history)
