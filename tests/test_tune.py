"""``fastmf.tune`` and ``fastmf tune``: the search finds better settings, prunes, repeats
itself under a seed, never sees test rows, and hands its best settings to ``fastmf train
--config`` through a checked JSON file.

Small synthetic data and few short trials keep the file fast."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fastmf
from fastmf.cli import main
from fastmf.data import random_split

optuna = pytest.importorskip("optuna")
from fastmf.tune import (  # noqa: E402
    DEFAULT_SEARCH_SPACE,
    read_config,
    trials_table,
    validation_rows,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]
COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


def ratings(seed: int, **kw):
    kw = dict(num_users=120, num_items=80, num_interactions=3000, dim=4, seed=seed) | kw
    return fastmf.datasets.synthetic(**kw)


def pairs(data) -> set[tuple]:
    """(raw user, raw item) of every row: comparable across subsets and re-indexings."""
    return set(zip(data.user_map.raw_ids[data.users].tolist(),
                   data.item_map.raw_ids[data.items].tolist(), strict=True))


# -- the search ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explicit_study():
    """A space where most of the lr range (down to 1e-5) barely moves the model."""
    train, _ = random_split(ratings(11), test_fraction=0.2, seed=3)
    space = {"dim": 8, "epochs": 6, "batch_size": 512, "reg": 0.01, "lr": (1e-5, 0.3)}
    result = fastmf.tune(train, loss="mse", n_trials=12, search_space=space, seed=5)
    return train, space, result


def test_tune_beats_a_bad_default(explicit_study):
    train, space, result = explicit_study
    # The same training with the bad setting fixed: one trial, the same split and seed.
    bad = fastmf.tune(train, loss="mse", n_trials=1, search_space=space | {"lr": 1e-5},
                      seed=5)
    assert result.metric == "rmse" and result.study.direction.name == "MINIMIZE"
    assert result.best_value < bad.best_value - 0.1, (result.best_value, bad.best_value)
    assert result.best_params["lr"] > 1e-3
    # Fixed knobs are part of the best settings; the value is the best complete trial's.
    assert {k: result.best_params[k] for k in ("dim", "epochs", "batch_size", "reg")} == {
        "dim": 8, "epochs": 6, "batch_size": 512, "reg": 0.01}
    done = [t.value for t in result.study.trials if t.state == COMPLETE]
    assert result.best_value == min(done)
    assert result.config() == {"loss": "mse", **result.best_params}


def test_median_pruner_stops_bad_trials_after_the_warmup(explicit_study):
    _, _, result = explicit_study
    trials = result.study.trials
    pruned = [t for t in trials if t.state == PRUNED]
    assert pruned, trials_table(result.study)
    # Pruned after an epoch past the 2 warm-up steps and before the last of the 6 epochs.
    assert all(3 <= len(t.intermediate_values) < 6 for t in pruned)
    assert all(len(t.intermediate_values) == 6 for t in trials if t.state == COMPLETE)
    # The first 5 trials (the pruner's startup) always run to the end.
    assert all(t.state == COMPLETE for t in trials[:5])
    for t in trials:  # the value is the last epoch's validation metric
        if t.state == COMPLETE:
            assert t.value == t.intermediate_values[5]
    table = trials_table(result.study).splitlines()
    assert table[0].split()[:3] == ["trial", "state", "value"] and len(table) == 13
    assert sum("PRUNED" in line for line in table) == len(pruned)


@pytest.mark.parametrize("loss", ["mse", "huber", "bce", "bpr"])
def test_every_loss_tunes(loss):
    implicit = loss in ("bce", "bpr")
    data = ratings(20 + len(loss), implicit=implicit)
    space = {"dim": 4, "epochs": (1, 2), "batch_size": 1024}
    result = fastmf.tune(data, loss=loss, n_trials=2, search_space=space, seed=1)
    assert result.metric == ("ndcg@10" if implicit else "rmse")
    assert math.isfinite(result.best_value)
    keys = {"dim", "lr", "reg", "epochs", "batch_size"}
    if implicit:
        keys |= {"num_negatives", "negative_distribution"}
        assert 1 <= result.best_params["num_negatives"] <= 16
        assert result.best_params["negative_distribution"] in ("uniform", "popularity")
        assert 0 < result.best_value <= 1
    assert set(result.best_params) == keys
    assert 1e-3 <= result.best_params["lr"] <= 0.3 and 1e-5 <= result.best_params["reg"] <= 0.3


def test_same_seed_same_trials_other_seed_others():
    data = ratings(31, implicit=True)
    space = {"dim": 4, "epochs": 2, "batch_size": 1024}

    def run(seed):
        result = fastmf.tune(data, loss="bpr", metric="Hit@5", n_trials=3, search_space=space,
                             seed=seed)
        return [(t.state, t.params, t.value) for t in result.study.trials], result

    first, result = run(4)
    again, _ = run(4)
    assert first == again
    assert result.metric == "hr@5" and result.study.direction.name == "MAXIMIZE"
    other, _ = run(5)
    assert [p for _, p, _ in other] != [p for _, p, _ in first]


def test_trials_see_only_the_data_passed_never_the_test_rows(monkeypatch):
    """Every fit call trains on and validates against rows of ``data`` (the training side
    of a split), never the held-out test rows; the two parts partition ``data``."""
    data = ratings(41)
    train, test = random_split(data, test_fraction=0.25, seed=2)
    import fastmf.train as train_module

    seen = []
    real_fit = train_module.fit

    def recording_fit(model, fit_part, **kw):
        seen.append((fit_part, kw["valid"]))
        return real_fit(model, fit_part, **kw)

    monkeypatch.setattr(train_module, "fit", recording_fit)
    result = fastmf.tune(train, loss="mse", n_trials=2, valid_fraction=0.2, seed=7,
                         search_space={"dim": 4, "epochs": 2, "batch_size": 1024})
    assert len(seen) == 4  # 2 trials x 2 epochs
    rows = np.concatenate([result.train_rows, result.valid_rows])
    assert np.array_equal(np.sort(rows), np.arange(len(train)))
    assert len(np.intersect1d(result.train_rows, result.valid_rows)) == 0
    test_pairs, fit_pairs = pairs(test), pairs(train.subset(result.train_rows))
    valid_pairs = pairs(train.subset(result.valid_rows))
    for fit_part, valid in seen:
        assert pairs(fit_part) == fit_pairs and pairs(valid) == valid_pairs
    assert fit_pairs.isdisjoint(test_pairs) and valid_pairs.isdisjoint(test_pairs)
    assert fit_pairs.isdisjoint(valid_pairs) and fit_pairs | valid_pairs == pairs(train)
    # About valid_fraction of the rows, and every validated user also has training rows.
    assert abs(len(result.valid_rows) / len(train) - 0.2) < 0.05
    assert set(train.users[result.valid_rows]) <= set(train.users[result.train_rows])


def test_validation_rows_per_user_rule():
    data = ratings(51, num_users=60, num_interactions=1500)
    fit_rows, valid_rows = validation_rows(data, 0.3, seed=9)
    sizes = np.bincount(data.users, minlength=data.num_users)
    held = np.bincount(data.users[valid_rows], minlength=data.num_users)
    expected = np.minimum(np.floor(0.3 * sizes + 0.5), np.maximum(sizes - 1, 0))
    assert np.array_equal(held, expected)
    again = validation_rows(data, 0.3, seed=9)
    other = validation_rows(data, 0.3, seed=10)
    assert np.array_equal(again[1], valid_rows) and not np.array_equal(other[1], valid_rows)


def test_timeout_distributions_and_dropped_knobs():
    """A timeout stops before the next trial; Optuna distributions are accepted; a knob set
    to None is left to fit's default (and dim to the rule of thumb)."""
    dist = optuna.distributions
    space = {"dim": None, "epochs": 1, "batch_size": None,
             "lr": dist.FloatDistribution(0.01, 0.1, log=True),
             "reg": dist.CategoricalDistribution([0.0, 0.01])}
    result = fastmf.tune(ratings(62), n_trials=None, timeout=1e-3, search_space=space)
    assert len(result.study.trials) == 1
    assert set(result.best_params) == {"epochs", "lr", "reg"}
    assert 0.01 <= result.best_params["lr"] <= 0.1 and result.best_params["reg"] in (0.0, 0.01)
    with pytest.raises(ValueError, match=r"search_space\['dim'\] takes integers"):
        fastmf.tune(ratings(63), search_space={"dim": dist.FloatDistribution(4, 8)})
    with pytest.raises(ValueError, match=r"search_space\['reg'\] value must be a finite"):
        fastmf.tune(ratings(63), search_space={"reg": dist.CategoricalDistribution([-1.0])})


def test_no_completed_trial_is_an_error():
    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    with pytest.raises(RuntimeError, match=r"fastmf.tune: no trial completed \(2 run: 2 pruned"):
        fastmf.tune(ratings(61), n_trials=2, pruner=AlwaysPrune(),
                    search_space={"dim": 4, "epochs": 2})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(search_space={"depth": 3}), ValueError, "unknown search_space key(s) ['depth']"),
    (dict(search_space={"num_negatives": 4}), ValueError, "implicit losses"),
    (dict(search_space={"lr": (0.3, 1e-3)}), ValueError, "low 0.3 > high 0.001"),
    (dict(search_space={"lr": (0, 0.1)}), ValueError, "range bound must be a finite number > 0"),
    (dict(search_space={"reg": {"low": 0.0, "high": 0.1, "log": True}}), ValueError,
     "a log range needs low > 0"),
    (dict(search_space={"dim": (8.5, 20)}), ValueError, "must be an integer >= 1, got 8.5"),
    (dict(search_space={"dim": [8, 16, 32]}), ValueError, "use {'choices': [...]}"),
    (dict(search_space={"batch_size": {"choices": []}}), ValueError, "non-empty list"),
    (dict(search_space={"epochs": 0}), ValueError, "(a fixed value) must be an integer >= 1"),
    (dict(search_space={"lr": {"lo": 1}}), ValueError, "must have the keys"),
    (dict(search_space=[("lr", 1)]), TypeError, "search_space must be a dict"),
    (dict(loss="bpr", search_space={"negative_distribution": ("a", "b")}), ValueError,
     "range (low, high) of two numbers"),
    (dict(loss="bpr", search_space={"negative_distribution": {"choices": ["zipf"]}}),
     ValueError, "must be 'uniform' or 'popularity', got 'zipf'"),
    (dict(metric="ndcg@x"), ValueError, "cut-off after '@' must be a positive integer"),
    (dict(metric="accuracy"), ValueError, "unknown metric 'accuracy'; valid names"),
    (dict(loss="bpr", metric="rmse"), ValueError, "measures rating predictions"),
    (dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    (dict(n_trials=0), ValueError, "n_trials must be a positive int"),
    (dict(timeout=-1), ValueError, "timeout must be"),
    (dict(valid_fraction=1.0), ValueError, "valid_fraction must be in (0, 1)"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match="fastmf.tune") as info:
        fastmf.tune(ratings(71), **kwargs)
    assert message in str(info.value)


def test_bad_data_is_named():
    data = ratings(72)
    with pytest.raises(TypeError, match="fastmf.tune: data must be fastmf.data.Interactions"):
        fastmf.tune(pd.DataFrame({"u": [1]}))
    implicit = ratings(73, implicit=True)
    with pytest.raises(ValueError, match="fastmf.tune: loss 'mse' needs ratings"):
        fastmf.tune(implicit)
    one_each = data.subset(np.unique(data.users, return_index=True)[1])  # 1 row per user
    with pytest.raises(ValueError, match="holds out no interaction"):
        fastmf.tune(one_each, search_space={"dim": 4, "epochs": 1})


def test_optuna_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without it sees
    with pytest.raises(ImportError, match=r"pip install fastmf\[tune\]"):
        fastmf.tune(ratings(81), search_space={"dim": 4, "epochs": 1})
    assert read_config is not None  # the config helpers need no Optuna


def test_import_stays_light_and_fastmf_tune_is_callable_either_way():
    code = ("import sys, fastmf; assert 'optuna' not in sys.modules; "
            "heavy = {'pandas', 'scipy', 'numba', 'optuna'} & set(sys.modules); "
            "assert not heavy, heavy; "
            "from fastmf.tune import trials_table; "  # the module bound first ...
            "assert callable(fastmf.tune) and fastmf.TuneResult.__name__ == 'TuneResult'; "
            "assert 'optuna' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert callable(fastmf.tune) and fastmf.tune.__module__ == "fastmf.tune"


# -- the config file and the command line --------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def csv_ratings(tmp_path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    n, users, items = 1200, 60, 50
    chosen = rng.choice(users * items, size=n, replace=False)
    path = tmp_path / "ratings.csv"
    pd.DataFrame({"userId": chosen // items + 1, "movieId": chosen % items + 1,
                  "rating": rng.integers(1, 11, n) / 2,
                  "timestamp": rng.integers(900_000_000, 1_000_000_000, n)}).to_csv(
        path, index=False)
    return path


def test_cli_round_trip_tune_then_train_with_the_config(tmp_path, capsys, monkeypatch):
    path = csv_ratings(tmp_path, 91)
    best = tmp_path / "best.json"
    seen = []
    module = sys.modules["fastmf.tune"]
    real_tune = module.tune

    def recording_tune(data, **kw):
        seen.append(data)
        return real_tune(data, **kw)

    monkeypatch.setattr(module, "tune", recording_tune)
    code, out, err = run(capsys, "tune", "--data", path, "--trials", "3", "--seed", "4",
                         "--space", '{"epochs": [1, 2], "dim": 4, "batch_size": 512}',
                         "--out", best, "--quiet", "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "state"])
    assert len([line for line in lines[header + 1:header + 4] if "COMPLETE" in line]) == 3
    assert "best: trial" in out and "validation rmse=" in out
    config = json.loads(best.read_text())
    assert config == read_config(best)
    assert config["loss"] == "mse" and config["dim"] == 4 and config["batch_size"] == 512
    assert config["seed"] == 4 and config["split"] == "random" and config["test_fraction"] == 0.2
    assert config["tuned"]["metric"] == "rmse" and config["tuned"]["trials"] == 3
    shown = out.split("validation rmse=")[1].split(",")[0]
    assert abs(config["tuned"]["value"] - float(shown)) < 1e-3

    split_dir = tmp_path / "split"
    code, out, err = run(capsys, "train", "--data", path, "--config", best, "--out",
                         tmp_path / "m", "--save-split", split_dir, "--quiet", "--device", "cpu")
    assert code == 0 and "rmse=" in out, err
    assert f"--config {best}: using loss=mse dim=4" in err
    model = fastmf.load(tmp_path / "m")
    assert model.dim == 4
    # tune held out the very rows train tested on: the trials never saw them.
    test = pd.read_csv(split_dir / "test.csv")
    test_pairs = set(zip(test.userId, test.movieId, strict=True))
    assert len(seen) == 1 and len(test_pairs) == 240
    assert pairs(seen[0]).isdisjoint(test_pairs)
    assert len(pairs(seen[0])) + len(test_pairs) == 1200

    # Options on the command line win over the file, the split options as a whole.
    code, out, err = run(capsys, "train", "--data", path, "--config", best, "--dim", "6",
                         "--test-fraction", "0", "--out", tmp_path / "m", "--quiet",
                         "--device", "cpu")
    assert code == 0 and "trained on all data (dim=6" in out, err
    assert fastmf.load(tmp_path / "m").dim == 6 and "split=" not in err


def test_cli_implicit_config_reaches_fit(tmp_path, capsys, monkeypatch):
    path = csv_ratings(tmp_path, 92)
    best = tmp_path / "best.json"
    write_config(best, {"loss": "bpr", "dim": 4, "epochs": 1, "num_negatives": 3,
                        "negative_distribution": "popularity"})
    import fastmf.train as train_module

    calls = []
    real_fit = train_module.fit
    monkeypatch.setattr(train_module, "fit",
                        lambda *a, **kw: calls.append(kw) or real_fit(*a, **kw))
    code, out, err = run(capsys, "train", "--data", path, "--config", best, "--quiet",
                         "--device", "cpu")
    assert code == 0 and "ndcg@10=" in out, err
    assert calls[0]["loss"] == "bpr" and calls[0]["num_negatives"] == 3
    assert calls[0]["negative_distribution"] == "popularity" and calls[0]["epochs"] == 1
    # An explicit loss on the command line: the implicit-only settings are set aside.
    code, out, err = run(capsys, "train", "--data", path, "--config", best, "--loss", "mse",
                         "--quiet", "--device", "cpu")
    assert code == 0 and "num_negatives, negative_distribution ignored" in err
    assert "holds settings for loss bpr; training with --loss mse" in err
    assert "num_negatives" not in calls[-1]
    # The command line's --num-negatives / --negative-distribution win over the file's.
    code, out, err = run(capsys, "train", "--data", path, "--config", best, "--quiet",
                         "--device", "cpu", "--num-negatives", "2",
                         "--negative-distribution", "uniform")
    assert code == 0, err
    assert calls[-1]["num_negatives"] == 2 and calls[-1]["negative_distribution"] == "uniform"
    code, out, err = run(capsys, "train", "--data", path, "--loss", "mse", "--quiet",
                         "--device", "cpu", "--epochs", "1", "--num-negatives", "2")
    assert code == 0 and "--num-negatives ignored" in err and "num_negatives" not in calls[-1]
    code, out, err = run(capsys, "train", "--data", path, "--num-negatives", "0")
    assert code == 2 and "--num-negatives: must be an integer > 0" in err


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "holds an array, not a JSON object"),
    ('"dim"', "holds a string, not a JSON object"),
    ("3", "holds a number, not a JSON object"),
    ("null", "holds null, not a JSON object"),
    ("{dim: 4}", "not valid JSON"),
    ('{"lr": NaN}', "NaN is not a valid JSON value"),
    ('{"dim": 4, "depth": 2}', "unknown key(s) ['depth']; valid keys: ['loss'"),
    ('{"dim": 0}', "'dim' must be an integer >= 1, got 0"),
    ('{"dim": 2.5}', "'dim' must be an integer >= 1, got 2.5"),
    ('{"dim": true}', "'dim' must be an integer >= 1, got True"),
    ('{"lr": -0.1}', "'lr' must be a finite number > 0"),
    ('{"reg": "0.1"}', "'reg' must be a finite number >= 0, got '0.1'"),
    ('{"loss": "hinge"}', "'loss' must be one of 'mse', 'huber', 'bce', 'bpr', got 'hinge'"),
    ('{"negative_distribution": "zipf"}', "must be 'uniform' or 'popularity'"),
    ('{"seed": -1}', "'seed' must be an integer >= 0"),
    ('{"test_fraction": 1}', "'test_fraction' must be a number in [0, 1)"),
    ('{"split": "loo", "test_fraction": 0.1}', "'test_fraction' does not apply"),
    ('{"split": "random", "test_fraction": 0}', "'split' does not apply"),
    ('{"tuned": 3}', "'tuned' must be an object"),
])
def test_train_rejects_bad_configs_before_reading_data(tmp_path, capsys, text, message):
    config = tmp_path / "best.json"
    config.write_text(text)
    code, out, err = run(capsys, "train", "--data", tmp_path / "absent.csv", "--config", config)
    assert code == 2 and out == ""
    line = last_error(err)
    assert line.startswith(f"fastmf train: error: --config {config}: ") and message in line


def test_train_config_file_problems(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", "x.csv", "--config", tmp_path / "none.json")
    assert code == 2 and "no such file" in last_error(err)
    code, _, err = run(capsys, "train", "--data", "x.csv", "--config", tmp_path)
    assert code == 2 and "is a folder" in last_error(err)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    code, _, err = run(capsys, "train", "--data", "x.csv", "--config", tmp_path / "bin.json")
    assert code == 2 and "not UTF-8" in last_error(err)


@pytest.mark.parametrize("argv, message", [
    (("--metric", "ndcg@0"), "cut-off after '@' must be a positive integer"),
    (("--loss", "bpr", "--metric", "mae"), "measures rating predictions"),
    (("--space", "[1]"), "argument --space: must be a JSON object"),
    (("--space", "{"), "argument --space: must be a JSON object, not valid JSON"),
    (("--space", '{"lr": [1, 0.1]}'), "--space: search_space['lr'] range has low 1 > high 0.1"),
    (("--space", '{"k": 3}'), "unknown search_space key(s) ['k']"),
    (("--valid-fraction", "1"), "argument --valid-fraction: must be a number in (0, 1)"),
    (("--trials", "0"), "argument --trials: must be an integer > 0"),
    (("--timeout", "-5"), "argument --timeout: must be a finite number > 0"),
    (("--split", "loo", "--test-fraction", "0.1"), "--test-fraction does not apply"),
])
def test_tune_rejects_bad_options_before_reading_data(tmp_path, capsys, argv, message):
    code, out, err = run(capsys, "tune", "--data", tmp_path / "absent.csv", *argv)
    assert code == 2 and out == "" and message in last_error(err)


def test_tune_out_is_checked_before_tuning(tmp_path, capsys):
    path = csv_ratings(tmp_path, 93)
    best = tmp_path / "best.json"
    best.write_text("{}")
    code, out, err = run(capsys, "tune", "--data", path, "--out", best)
    assert code == 2 and "data:" not in out and "pass --force" in last_error(err)
    code, out, err = run(capsys, "tune", "--data", path, "--out", tmp_path / "no" / "b.json")
    assert code == 2 and "data:" not in out and "does not exist" in last_error(err)
    code, out, err = run(capsys, "tune", "--data", path, "--out", tmp_path)
    assert code == 2 and "is a folder" in last_error(err)
    assert best.read_text() == "{}"


def test_default_space_is_documented_and_checked():
    assert set(DEFAULT_SEARCH_SPACE) == {"dim", "lr", "reg", "epochs", "batch_size",
                                         "num_negatives", "negative_distribution"}
    assert DEFAULT_SEARCH_SPACE["dim"] == {"low": 8, "high": 256, "log": True}
    assert (DEFAULT_SEARCH_SPACE["epochs"]["low"], DEFAULT_SEARCH_SPACE["epochs"]["high"]) == (
        3, 40)


def test_tune_out_that_appears_while_tuning_is_not_overwritten(tmp_path, capsys, monkeypatch):
    """--out is checked before tuning, which can take hours; a file created under that name
    meanwhile was replaced without --force. Now it is kept, the config printed instead."""
    import fastmf.tune as tune_module

    path = csv_ratings(tmp_path, 93)
    best = tmp_path / "best.json"
    tuned = tune_module.tune

    def tune_then_a_file_appears(*args, **kwargs):
        result = tuned(*args, **kwargs)
        best.write_text("the user's notes")
        return result

    monkeypatch.setattr(tune_module, "tune", tune_then_a_file_appears)
    args = ("tune", "--data", path, "--out", best, "--trials", "2", "--quiet",
            "--space", '{"epochs": 1, "dim": 4}')
    code, out, err = run(capsys, *args)
    assert code == 2 and "appeared while tuning; not overwritten" in last_error(err)
    assert best.read_text() == "the user's notes"
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["dim"] == 4 and printed["epochs"] == 1
    best.unlink()
    code, out, err = run(capsys, *args, "--force")
    assert code == 0 and json.loads(best.read_text())["dim"] == 4


def test_write_config_without_overwrite_leaves_an_existing_file(tmp_path):
    config = {"loss": "bpr", "dim": 4, "epochs": 1, "num_negatives": 3, "lr": 0.05}
    best = tmp_path / "best.json"
    best.write_text("keep")
    with pytest.raises(FileExistsError):
        write_config(best, config, overwrite=False)
    assert best.read_text() == "keep" and os.listdir(tmp_path) == ["best.json"]
    write_config(tmp_path / "new.json", config, overwrite=False)
    assert json.loads((tmp_path / "new.json").read_text())["dim"] == 4
    write_config(best, config)
    assert json.loads(best.read_text())["num_negatives"] == 3


def test_tune_needs_a_trial_count_or_a_time_limit():
    """n_trials=None with timeout=None ran trials without end."""
    with pytest.raises(ValueError, match="n_trials and timeout are both None"):
        fastmf.tune(ratings(62), n_trials=None, timeout=None,
                    search_space={"dim": 4, "epochs": 1})


def test_write_config_writes_numpy_numbers(tmp_path):
    """check_config takes numpy ints and floats as numbers; write_config then failed in
    json.dumps."""
    config = {"loss": "mse", "dim": np.int64(8), "lr": np.float32(0.05), "seed": np.int32(3)}
    write_config(tmp_path / "c.json", config)
    back = json.loads((tmp_path / "c.json").read_text())
    assert back == {"loss": "mse", "dim": 8, "lr": pytest.approx(0.05), "seed": 3}
    assert type(back["dim"]) is int
