"""The command line: which data it reads, how it reads it, option checks, outputs, errors.

Each test calls ``fastmf.cli.main`` in-process on small random data and checks the exit
status and what is printed; two run ``python -m fastmf`` for the real exit status."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fastmf
from fastmf.cli import main

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["userId", "movieId", "rating", "timestamp"]


def random_ratings(seed: int, n: int = 900, users: int = 50, items: int = 40,
                   string_ids: bool = False) -> pd.DataFrame:
    """Distinct (user, item) pairs with half-star ratings and timestamps."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(users * items, size=n, replace=False)
    u, i = pairs // items + 1, pairs % items + 1
    df = pd.DataFrame({
        "userId": [f"u{x}" for x in u] if string_ids else u,
        "movieId": i,
        "rating": rng.integers(1, 11, n) / 2,
        "timestamp": rng.integers(900_000_000, 1_000_000_000, n),
    })
    return df


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert lines and "Traceback" not in err, err
    return lines[-1]


FAST = ("--epochs", "1", "--dim", "4", "--quiet", "--device", "cpu")


@pytest.mark.parametrize("setting", [None, "0"])
def test_training_commands_keep_freed_memory(tmp_path, capsys, monkeypatch, setting):
    # fastmf train keeps freed memory (fastmf.memory.keep_freed_memory) unless
    # FASTMF_KEEP_FREED_MEMORY=0; commands that do not train leave malloc as it is.
    calls = []
    monkeypatch.setattr(fastmf.memory, "keep_freed_memory", lambda: calls.append(1) or True)
    if setting is None:
        monkeypatch.delenv("FASTMF_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("FASTMF_KEEP_FREED_MEMORY", setting)
    path = tmp_path / "ratings.csv"
    random_ratings(3, n=200).to_csv(path, index=False)
    code, _, err = run(capsys, "train", "--data", path, *FAST)
    assert code == 0, err
    assert calls == ([1] if setting is None else [])
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "none", "--data", path)
    assert code == 2 and err  # it ran, and failed on the missing model
    assert calls == ([1] if setting is None else [])


# -- which file, how it is read ----------------------------------------------------------------

def test_train_reads_exactly_the_file_named(tmp_path, capsys):
    folder = tmp_path / "ml"
    folder.mkdir()
    small = random_ratings(1, n=300)
    small.to_csv(folder / "u.data", sep="\t", header=False, index=False)
    random_ratings(2, n=700).to_csv(folder / "ratings.csv", index=False)
    code, out, err = run(capsys, "train", "--data", folder / "u.data", *FAST)
    assert code == 0, err
    assert "data: 300 interactions" in out


def test_header_typo_is_an_error_naming_the_columns(tmp_path, capsys):
    df = random_ratings(3).rename(columns={"rating": "Rating"})
    df.to_csv(tmp_path / "r.csv", index=False)
    code, out, err = run(capsys, "train", "--data", tmp_path / "r.csv", *FAST)
    assert code == 2 and "rmse" not in out
    line = one_line_error(err)
    assert "'rating'" in line and "'Rating'" in line and "matched exactly" in line
    # No rating column at all: the columns found and the one expected are named.
    df.rename(columns={"Rating": "stars"}).to_csv(tmp_path / "s.csv", index=False)
    code, _, err = run(capsys, "train", "--data", tmp_path / "s.csv", *FAST)
    line = one_line_error(err)
    assert code == 2 and "has no ratings" in line
    assert "['userId', 'movieId', 'stars', 'timestamp']" in line and "--rating-col" in line
    code, out, err = run(capsys, "train", "--data", tmp_path / "s.csv", "--rating-col",
                         "stars", *FAST)
    assert code == 0 and "rmse=" in out, err


def test_text_that_is_not_utf8_is_refused_before_training(tmp_path, capsys):
    df = random_ratings(4, string_ids=True)
    text = df.to_csv(index=False).encode("utf-8")
    path = tmp_path / "r.csv"
    path.write_bytes(text.replace(b"u1,", b"u\xe91,", 1))
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--out", tmp_path / "m")
    assert code == 2 and "data:" not in out
    line = one_line_error(err)
    assert "not valid utf-8" in line and "column 'userId'" in line and "--encoding" in line
    assert not (tmp_path / "m").exists()
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--encoding", "latin-1",
                         "--out", tmp_path / "m")
    assert code == 0, err
    assert any(str(u).startswith("u\u00e9") for u in fastmf.load(tmp_path / "m").user_map.raw_ids)


def test_separator_and_header_follow_the_file(tmp_path, capsys):
    df = random_ratings(5)
    headerless = tmp_path / "ratings.data"  # MovieLens u.data's layout under another name
    df.to_csv(headerless, sep="\t", header=False, index=False)
    code, out, err = run(capsys, "train", "--data", headerless, *FAST)
    assert code == 0, err
    assert f"data: {len(df)} interactions" in out
    assert "no header row (detected): columns taken by position as user, item, rating, " \
           "timestamp" in err
    tsv = tmp_path / "r.tsv"
    df.to_csv(tsv, sep="\t", index=False)
    code, out, err = run(capsys, "train", "--data", tsv, *FAST)
    assert code == 0 and "rmse=" in out, err
    txt = tmp_path / "r.txt"
    df.to_csv(txt, sep=";", index=False)
    code, out, err = run(capsys, "train", "--data", txt, *FAST)
    assert code == 0 and "semicolon-separated (detected" in err, err
    wrong = tmp_path / "comma.tsv"
    df.to_csv(wrong, index=False)
    code, _, err = run(capsys, "train", "--data", wrong, *FAST)
    assert code == 2 and "--sep" in one_line_error(err)
    code, out, err = run(capsys, "train", "--data", wrong, "--sep", "comma", *FAST)
    assert code == 0, err


def test_help_says_how_files_are_read(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "a first row made only of numbers is data" in flat
    assert ".tsv, .tab, .data tab" in flat and "exact names" in flat
    assert "--test-fraction" in flat and "--save-split" in flat


# -- option checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--dim", "0", "argument --dim: must be an integer > 0, got '0'"),
    ("--dim", "-3", "must be an integer > 0"),
    ("--epochs", "0", "argument --epochs: must be an integer > 0"),
    ("--batch-size", "0", "argument --batch-size: must be an integer > 0"),
    ("--lr", "0", "argument --lr: must be a finite number > 0"),
    ("--lr", "nan", "argument --lr: must be a finite number > 0"),
    ("--lr", "inf", "argument --lr: must be a finite number > 0"),
    ("--reg", "-0.1", "argument --reg: must be a finite number >= 0"),
    ("--reg", "inf", "argument --reg: must be a finite number >= 0"),
    ("-k", "0", "argument -k: must be an integer > 0"),
    ("--test-fraction", "1", "argument --test-fraction: must be a number in [0, 1)"),
    ("--test-fraction", "-0.1", "must be a number in [0, 1)"),
    ("--early-stopping", "0", "argument --early-stopping: must be an integer > 0"),
    ("--device", "meta", "argument --device: unknown device 'meta'; valid here: cpu"),
])
def test_train_rejects_bad_numbers_before_reading(tmp_path, capsys, option, value, message):
    code, out, err = run(capsys, "train", "--data", tmp_path / "absent.csv", option, value)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_inconsistent_options_are_errors(tmp_path, capsys):
    path = tmp_path / "r.csv"
    random_ratings(6).to_csv(path, index=False)
    for extra, message in (
        (("--test", path, "--test-fraction", "0.1"), "--test gives the test set"),
        (("--split", "loo", "--test-fraction", "0.1"), "--test-fraction does not apply"),
        (("--split", "temporal", "--test-fraction", "0"), "--split does not apply"),
        (("--test-fraction", "0", "--early-stopping", "2"), "--early-stopping needs a test"),
        (("--test-fraction", "0", "--save-split", tmp_path / "s"), "no split to save"),
    ):
        code, out, err = run(capsys, "train", "--data", path, *FAST, *extra)
        assert code == 2 and "data:" not in out
        assert message in one_line_error(err)


def test_recommend_and_evaluate_check_their_options(tmp_path, capsys):
    code, _, err = run(capsys, "recommend", "--model", tmp_path, "--user", "1", "-k", "-5")
    assert code == 2 and "argument -k: must be an integer > 0, got '-5'" in err
    code, _, err = run(capsys, "evaluate", "--model", tmp_path, "--data", "x.csv",
                       "--device", "cuda:99")
    assert code == 2 and "unknown device 'cuda:99'" in err
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps([1, 2]))
    (model / "model.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "recommend", "--model", model, "--user", "1")
    assert code == 2 and "config.json holds a JSON list, expected an object" in one_line_error(err)


# -- outputs -----------------------------------------------------------------------------------

def test_out_is_checked_before_training(tmp_path, capsys):
    path = tmp_path / "r.csv"
    random_ratings(7).to_csv(path, index=False)
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--out", "/proc/forbidden")
    assert code == 2 and "data:" not in out
    assert "cannot write in /proc" in one_line_error(err)
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--out",
                         tmp_path / "no" / "such" / "m")
    assert code == 2 and "does not exist" in one_line_error(err) and "data:" not in out
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--out", path)
    assert code == 2 and "is an existing file" in one_line_error(err)
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--out", precious)
    assert code == 2 and "not a fastmf checkpoint" in one_line_error(err)
    assert (precious / "notes.txt").read_text() == "keep me"
    # An existing checkpoint (or an empty folder) may be replaced.
    (tmp_path / "m").mkdir()
    for _ in range(2):
        code, out, err = run(capsys, "train", "--data", path, *FAST, "--out", tmp_path / "m")
        assert code == 0 and "saved" in out, err


def test_save_split_then_evaluate_and_train_on_predefined_files(tmp_path, capsys):
    path = tmp_path / "r.csv"
    df = random_ratings(8, string_ids=True)
    df.to_csv(path, index=False)
    split = tmp_path / "split"
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--save-split", split,
                         "--out", tmp_path / "m")
    assert code == 0, err
    train, test = (pd.read_csv(split / name) for name in ("train.csv", "test.csv"))
    assert list(train.columns) == COLUMNS and list(test.columns) == COLUMNS
    assert len(train) + len(test) == len(df) and len(test) == round(0.2 * len(df))
    both = pd.concat([train, test]).sort_values(["userId", "movieId"]).reset_index(drop=True)
    expected = df.sort_values(["userId", "movieId"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(both, expected, check_dtype=False)
    # Existing split files are kept unless --force.
    before = (split / "train.csv").read_bytes()
    code, _, err = run(capsys, "train", "--data", path, *FAST, "--save-split", split,
                       "--seed", "3")
    assert code == 2 and "--force" in one_line_error(err)
    assert (split / "train.csv").read_bytes() == before
    code, _, err = run(capsys, "train", "--data", path, *FAST, "--save-split", split,
                       "--seed", "3", "--force")
    assert code == 0 and (split / "train.csv").read_bytes() != before, err
    # The README's evaluate command, on the files train wrote.
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "m", "--data",
                         split / "test.csv", "--train", split / "train.csv")
    assert code == 0 and "rmse=" in out and "ndcg@10=" in out, err
    # Predefined train/test files.
    code, out, err = run(capsys, "train", "--data", split / "train.csv", "--test",
                         split / "test.csv", *FAST)
    assert code == 0 and f"test ({split / 'test.csv'})" in out and "rmse=" in out, err
    # No test set at all.
    code, out, err = run(capsys, "train", "--data", path, *FAST, "--test-fraction", "0")
    assert code == 0 and "not evaluated" in out and "no test evaluation" in err, err
    assert f"data: {len(df)} interactions" in out


def test_recommend_leaves_out_seen_items_and_marks_the_fallback(tmp_path, capsys):
    path = tmp_path / "r.csv"
    df = random_ratings(9, n=600, users=30, items=40)
    df.to_csv(path, index=False)
    model = tmp_path / "m"
    code, _, err = run(capsys, "train", "--data", path, *FAST, "--test-fraction", "0",
                       "--out", model)
    assert code == 0, err
    user = int(df.userId.iloc[0])
    seen = set(df.movieId[df.userId == user].tolist())

    def listed(out):
        return [int(line.split()[1]) for line in out.strip().splitlines()[1:]]

    code, out, err = run(capsys, "recommend", "--model", model, "--user", user, "-k", "40")
    assert code == 0 and "seen items are not excluded" in err and "pass --train" in err
    assert len(listed(out)) == 40 and seen <= set(listed(out))
    code, out, err = run(capsys, "recommend", "--model", model, "--user", user, "-k", "40",
                         "--train", path)
    assert code == 0, err
    assert set(listed(out)).isdisjoint(seen) and len(listed(out)) == 40 - len(seen)
    assert f"only {40 - len(seen)} items" in err
    scores = [float(line.split()[2]) for line in out.strip().splitlines()[1:]]
    assert scores == sorted(scores, reverse=True)
    # A user the model never saw: popular items, marked, scores in descending order.
    code, out, err = run(capsys, "recommend", "--model", model, "--user", "99999", "-k", "8")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "fallback" in lines[0] and len(lines) == 9 and "Warning" not in err
    scores = [float(line.split()[2]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)
    code, out, err = run(capsys, "recommend", "--model", model, "--user", "abc", "-k", "3")
    assert code == 0 and "fallback" in out and "'abc' is not a number" in err, err
    assert "most popular items" in out
    # A model that keeps no popularity counts says what its fallback list is instead.
    bare = fastmf.load(model)
    bare.item_popularity = None
    fastmf.checkpoint.save(bare, tmp_path / "bare")
    code, out, err = run(capsys, "recommend", "--model", tmp_path / "bare", "--user", "99999",
                         "-k", "3")
    assert code == 0 and "no item popularity counts" in out and "most popular items" not in out


def test_missing_movielens_release_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--data", "ml-latest-small", *FAST)
    line = one_line_error(err)
    assert code == 2 and out == ""
    assert str(tmp_path / "ml-latest-small") in line
    assert str(tmp_path / "home" / ".cache" / "fastmf" / "ml-latest-small") in line
    assert "fetch_movielens('ml-latest-small')" in line and "fastmf fetch ml-latest-small" in line


# -- the real process --------------------------------------------------------------------------

def run_module(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fastmf", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_python_m_fastmf_exit_status(tmp_path):
    done = run_module("train", "--data", tmp_path / "r.csv", "--dim", "0", cwd=tmp_path)
    assert done.returncode == 2 and "must be an integer > 0" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_module("recommend", "--model", tmp_path / "nothing", "--user", "1",
                      cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("fastmf recommend: error:")


def test_fetch_then_train_by_release_name(tmp_path, monkeypatch, capsys):
    """`fastmf fetch` (from a server on 127.0.0.1) and `--data ml-latest-small` finding it."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    df = random_ratings(10)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-latest-small/ratings.csv", df.to_csv(index=False))
        z.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n" + "".join(
            f"{i},Film {i} (2001),Drama\n" for i in sorted(set(df.movieId))))
    body = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ml-latest-small.zip"
        code, out, err = run(capsys, "fetch", "ml-latest-small", "--url", url, "--sha256",
                             hashlib.sha256(body).hexdigest())
    finally:
        server.shutdown()
        server.server_close()
    folder = tmp_path / "home" / ".cache" / "fastmf" / "ml-latest-small"
    assert code == 0 and out.strip() == str(folder), err
    code, out, err = run(capsys, "train", "--data", "ml-latest-small", *FAST)
    assert code == 0 and f"data: {len(df)} interactions" in out, err
    code, _, err = run(capsys, "fetch", "ml-latest-small", "--cache-dir", tmp_path / "c2",
                       "--url", url, "--sha256", "0" * 64)
    assert code == 2 and "cannot download" in one_line_error(err)  # the server is gone
