"""SVD++ and timeSVD++ on MovieLens ml-latest-small: accuracy and fit time.

    python benchmarks/accuracy_svdpp.py [--data PATH] [--quick] [--json OUT]
    python benchmarks/accuracy_svdpp.py --tune      # the inner-validation grid of the defaults

1. 5-fold cross-validation (``fastmf.data.kfold``, seed 0, the folds of
   benchmarks/accuracy.py): ``fastmf.models.SVDpp`` and ``TimeSVDpp`` with their class
   defaults, fastmf ``MF`` with ``fit``'s defaults, and Surprise's ``SVDpp`` (library
   defaults) on the same rows: RMSE and fit time. TimeSVDpp predicts each test rating at
   its own timestamp.
2. A global temporal split (``fastmf.data.temporal_split``, the latest 20% of ratings held
   out): TimeSVDpp against SVDpp and MF, overall and split by test user (users new to the
   training rows, users in them).

Single-threaded (Surprise is), wall-clock fit times; one untimed warm-up fit first.
``--quick``: one fold and no Surprise. ``--tune [--trials N]`` reruns the optuna search
the class defaults were picked from (optuna is not a fastmf dependency), on two inner
validation splits of fold 0's TRAINING rows only (never a reported test row): "dense" (20%
of the rows held out at random; every user has >= 20 ratings) and "sparse" (each user's
ratings cut to at most 15 at random, then the latest 20% of each user's held out). Each
trial is scored per epoch by the mean of the two validation RMSEs; its epochs stop where a
fit on a fold's training rows would pass FIT_CPU_BUDGET (estimated from the cheapest epoch
so far on the dense split, validation excluded). The search starts from the current class
defaults (trial 0); ``--tune-seed`` seeds TPE (the first search used 0).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastmf  # noqa: E402
import fastmf.models  # noqa: E402
from fastmf.data import kfold, temporal_split  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (  # noqa: E402
    DEFAULT_DATA,
    DEFAULTS,
    DIM,
    FOLDS,
    SEED,
    fit_fastmf_explicit,
    load_avg,
    machine,
    mf_curves,
    round_setting,
    surprise_sets,
    timed,
    try_import,
)
from accuracy import inner_splits as all_inner_splits  # noqa: E402


class Batch:
    """The fields of a training batch the models read."""

    def __init__(self, users, items, targets, timestamps):
        self.users, self.items, self.targets, self.timestamps = users, items, targets, timestamps
        self.negatives = self.weights = None


def train_model(cls, train, *, lr=None, reg=None, batch_size=None, epochs=None, seed=SEED,
                on_epoch=None, **model_kwargs):
    """Build ``cls`` for ``train`` and train it with its defaults (overridable): shuffled
    batches, the model's own optimizer and training_step."""
    settings = dict(cls.defaults["explicit"])
    for key, value in (("lr", lr), ("reg", reg), ("batch_size", batch_size),
                       ("epochs", epochs)):
        if value is not None:
            settings[key] = value
    torch.manual_seed(seed)
    model = cls.from_interactions(train, **model_kwargs)
    optimizer = model.make_optimizer("adagrad", settings["lr"])
    users, items, ratings = train.to_torch()
    stamps = None if train.timestamps is None else torch.as_tensor(train.timestamps)
    gen = torch.Generator().manual_seed(seed)
    size = settings["batch_size"]
    for epoch in range(settings["epochs"]):
        order = torch.randperm(len(users), generator=gen)
        for lo in range(0, len(users), size):
            rows = order[lo:lo + size]
            model.training_step(Batch(users[rows], items[rows], ratings[rows],
                                      None if stamps is None else stamps[rows]),
                                optimizer, loss="mse", reg=settings["reg"])
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model


@torch.no_grad()
def rmse(model, test, rows=None) -> float:
    """RMSE over ``test`` (over its rows where the mask ``rows`` is set, when given)."""
    users, items, ratings = test.to_torch()
    if isinstance(model, fastmf.models.TimeSVDpp):
        pred = model(users, items, torch.as_tensor(test.timestamps))
    else:
        pred = model(users, items)
    error = (pred.double() - ratings.double()) ** 2
    if rows is not None:
        error = error[torch.from_numpy(rows)]
    return float(error.mean().sqrt())


def temporal_by_user(train, test) -> dict[str, dict[str, float]]:
    """The temporal split's RMSE split by test user: users with no training rating (a
    global temporal split holds out the newest users entirely; every model then predicts
    from mu + b_i and its untrained user terms) and users with some. The models are the
    temporal table's (same settings and seeds), refitted."""
    seen = np.zeros(train.num_users, bool)
    seen[train.users] = True
    known = seen[test.users]
    groups = {"all": np.ones(len(test), bool), "users new to the training rows": ~known,
              "users in the training rows": known}
    torch.manual_seed(SEED)
    mf = fastmf.MF(train.num_users, train.num_items, dim=DIM)
    fastmf.fit(mf, train, loss="mse", epochs=DEFAULTS["explicit"]["epochs"], seed=SEED,
               progress=False)
    models = {"fastmf SVDpp": train_model(fastmf.models.SVDpp, train),
              "fastmf TimeSVDpp": train_model(fastmf.models.TimeSVDpp, train),
              "fastmf MF (defaults)": mf}
    result = {group: {"rows": int(mask.sum()),
                      **{name: rmse(model, test, mask) for name, model in models.items()}}
              for group, mask in groups.items()}
    # What the new users' predictions rest on: mu + b_i alone (the static item bias; for
    # TimeSVDpp without its time bins), each model's own.
    new = torch.from_numpy(~known)
    items = torch.from_numpy(test.items.astype(np.int64))[new]
    ratings = torch.from_numpy(test.ratings.astype(np.float64))[new]
    bias_only = {}
    with torch.no_grad():
        for name, model in models.items():
            if isinstance(model, fastmf.MF):
                pred = model.item_bias.double()[items] + model.mu
            else:
                pred = (model.item_bias.weight.double().reshape(-1)[items]
                        + float(model.global_mean))
            bias_only[name] = float(((pred - ratings) ** 2).mean().sqrt())
    result["users new to the training rows, mu + b_i alone"] = {
        "rows": int((~known).sum()), **bias_only}
    return result


def fit_fastmf_model(cls, train, test) -> dict:
    model, wall, cpu = timed(lambda: train_model(cls, train))
    return {"rmse": rmse(model, test), "wall": wall, "cpu": cpu,
            "epochs": cls.defaults["explicit"]["epochs"]}


def fit_surprise_svdpp(train, test, fold: int) -> dict:
    from surprise import SVDpp, accuracy

    trainset, testset = surprise_sets(train, test)
    algo = SVDpp(random_state=fold)
    _, wall, cpu = timed(lambda: algo.fit(trainset))
    return {"rmse": accuracy.rmse(algo.test(testset), verbose=False), "wall": wall,
            "cpu": cpu, "epochs": algo.n_epochs}


def summary(rows: list[dict], key: str, digits: int = 4) -> str:
    v = np.array([r[key] for r in rows])
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


# ------------------------------------------------------------------------------ tuning


def inner_splits(data):
    """The two inner validation splits, both from fold 0's training rows: ``dense`` and
    ``sparse`` of benchmarks/accuracy.py's :func:`accuracy.inner_splits`."""
    splits = all_inner_splits(data)
    return {name: splits[name] for name in ("dense", "sparse")}


# Surprise SVD++'s mean fit CPU seconds on these folds (benchmarks/README.md, "SVD++ and
# timeSVD++", 2026-11-30), for --no-surprise.
SURPRISE_SVDPP_CPU = 30.27

# CPU seconds one default fit on a fold's training rows may take: Surprise's SVD++ takes
# ~30 s there, and the speed target is >= 20x faster (1.5 s); 1.0 leaves room for the
# estimate's error and for a loaded machine's slower CPU seconds.
FIT_CPU_BUDGET = 1.0


class _Budget(Exception):
    """A trial's fit reached FIT_CPU_BUDGET."""


def suggest(trial, cls) -> dict:
    """One point of the search space (rates and L2 coefficients on log scales)."""
    form = trial.suggest_categorical("reg_form", ["rows", "ratings"])
    # The "rows" penalty is taken once per batch, the "ratings" one once per rating.
    low, high = (0.1, 20.0) if form == "rows" else (0.002, 0.3)
    reg = trial.suggest_float("reg", low, high, log=True)
    setting = dict(
        reg_form=form, reg=reg,
        dim=trial.suggest_categorical("dim", [16, 32, 64]),
        batch_size=trial.suggest_categorical("batch_size", [2048, 4096, 8192, 16384]),
        lr=trial.suggest_float("lr", 0.01, 0.5, log=True),
        implicit_reg=reg * trial.suggest_float("implicit_reg_ratio", 0.01, 10, log=True),
        bias_reg=reg * trial.suggest_float("bias_reg_ratio", 0.001, 1, log=True),
        implicit_lr_scale=trial.suggest_float("implicit_lr_scale", 0.1, 3, log=True),
        bias_lr_scale=trial.suggest_float("bias_lr_scale", 0.1, 3, log=True),
        init_scale=trial.suggest_float("init_scale", 0.003, 0.2, log=True))
    if cls is fastmf.models.TimeSVDpp:
        setting.update(
            time_reg=reg * trial.suggest_float("time_reg_ratio", 0.001, 10, log=True),
            time_lr_scale=trial.suggest_float("time_lr_scale", 0.03, 3, log=True),
            alpha_reg=reg * trial.suggest_float("alpha_reg_ratio", 0.001, 10, log=True),
            alpha_lr_scale=trial.suggest_float("alpha_lr_scale", 0.001, 1, log=True))
    return setting


def current_point(cls) -> dict:
    """The class defaults as a point of :func:`suggest`'s space (to start a search from)."""
    init = inspect.signature(cls.__init__).parameters
    fit, reg = cls.defaults["explicit"], cls.defaults["explicit"]["reg"]
    point = dict(reg_form=init["reg_form"].default, reg=reg, dim=init["dim"].default,
                 batch_size=fit["batch_size"], lr=fit["lr"],
                 implicit_reg_ratio=init["implicit_reg"].default / reg,
                 bias_reg_ratio=cls.default_bias_reg / reg,
                 implicit_lr_scale=init["implicit_lr_scale"].default,
                 bias_lr_scale=init["bias_lr_scale"].default,
                 init_scale=init["init_scale"].default)
    if cls is fastmf.models.TimeSVDpp:
        point.update(time_reg_ratio=init["time_reg"].default / reg,
                     time_lr_scale=init["time_lr_scale"].default,
                     alpha_reg_ratio=init["alpha_reg"].default / reg,
                     alpha_lr_scale=init["alpha_lr_scale"].default)
    return point


def setting_of(params: dict, rounded: bool = False) -> dict:
    """Model and fit keywords of a point of :func:`suggest`'s space (ratios resolved)."""
    value = round_setting if rounded else float
    out = {}
    for key, v in params.items():
        if key in ("reg_form", "dim", "batch_size"):
            out[key] = v
        elif key.endswith("_ratio"):
            out[key.removesuffix("_ratio")] = value(params["reg"] * v)
        else:
            out[key] = value(v)
    return out


def tune(data, models: str, trials: int, seed: int = 0) -> None:
    """Optuna (TPE) over :func:`suggest` on the two inner splits. A trial trains on both,
    scores every epoch by the mean of the two validation RMSEs and keeps its best epoch;
    epochs stop where a fit on a full fold's training rows would pass FIT_CPU_BUDGET
    (estimated from the dense split's CPU time per epoch)."""
    import optuna

    splits = inner_splits(data)
    rows_full = len(data) * (FOLDS - 1) / FOLDS
    max_epochs = 40
    for cls in (getattr(fastmf.models, name) for name in models.split(",")):
        def objective(trial, cls=cls):
            setting = suggest(trial, cls)
            curves = {}
            for name, (train, valid) in splits.items():
                curve, clock, size = [], [time.process_time(), None], len(train)

                def on_epoch(epoch, model, curve=curve, valid=valid, clock=clock, size=size):
                    # CPU of the epoch's training alone (the first one includes building
                    # the model), scaled to a full fold; the cheapest epoch so far counts.
                    spent = (time.process_time() - clock[0]) * rows_full / size
                    clock[1] = spent if clock[1] is None else min(clock[1], spent)
                    curve.append(rmse(model, valid))
                    clock[0] = time.process_time()
                    if (epoch + 2) * clock[1] > FIT_CPU_BUDGET or epoch + 1 >= max_epochs:
                        raise _Budget

                if name == "dense":
                    try:
                        train_model(cls, train, epochs=max_epochs, on_epoch=on_epoch,
                                    **setting)
                    except _Budget:
                        pass
                    epochs = len(curve)
                else:
                    train_model(cls, train, epochs=epochs,
                                on_epoch=lambda e, m, c=curve, v=valid: c.append(rmse(m, v)),
                                **setting)
                curves[name] = np.array(curve)
            score = np.mean([curves[n] for n in splits], axis=0)
            best = int(np.nanargmin(score)) if np.isfinite(score).any() else 0
            trial.set_user_attr("epochs", best + 1)
            for name in splits:
                trial.set_user_attr(name, float(curves[name][best]))
            return float(score[best]) if np.isfinite(score[best]) else 10.0

        # Warm-up: the first fit's one-off costs would cut trial 0's epochs short.
        train_model(cls, splits["dense"][0], epochs=1)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        # Continue from the current defaults (trial 0 rescores them).
        study.enqueue_trial(current_point(cls))
        study.optimize(objective, n_trials=trials,
                       callbacks=[lambda s, t, name=cls.__name__: print(
                           name, t.number, f"{t.value:.4f}", t.user_attrs,
                           t.params, flush=True)])
        best = study.best_trial
        print(f"{cls.__name__}: best {best.params}, epochs {best.user_attrs['epochs']}, "
              f"mean inner RMSE {best.value:.4f} {best.user_attrs}", flush=True)
        # Rescore the rounded best point next to the current defaults, and MF's defaults.
        epochs = best.user_attrs["epochs"]
        for label, setting, n in (
                ("best (rounded)", setting_of(best.params, rounded=True), epochs),
                ("current defaults", setting_of(current_point(cls)),
                 cls.defaults["explicit"]["epochs"])):
            scores = {}
            for name, (train, valid) in splits.items():
                scores[name] = rmse(train_model(cls, train, epochs=n, **setting), valid)
            print(f"{cls.__name__} rescored {label} {setting}, epochs {n}: mean "
                  f"{np.mean(list(scores.values())):.4f} {scores}", flush=True)
    mf = DEFAULTS["explicit"]
    curves = mf_curves(splits, mf["lr"], mf["reg"], mf["batch_size"], mf["epochs"])
    print(f"MF defaults {mf}: mean {np.mean([c[-1] for c in curves.values()]):.4f} "
          + " ".join(f"{n} {c[-1]:.4f}" for n, c in curves.items()), flush=True)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-models", default="SVDpp,TimeSVDpp")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--tune-seed", type=int, default=1,
                        help="TPE seed (0 was the first search; a new seed explores anew)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-surprise", action="store_true",
                        help="skip Surprise's SVD++ (~30 s a fold); the speed ratios then use "
                             "its published CPU time (SURPRISE_SVDPP_CPU)")
    args = parser.parse_args(argv)
    if not (args.data / "ratings.csv").is_file():
        print(f"benchmark skipped: no MovieLens ratings.csv in {args.data}")
        return 0
    torch.set_num_threads(1)
    data = fastmf.datasets.load_movielens(args.data)
    if args.tune:
        tune(data, args.tune_models, args.trials, args.tune_seed)
        return 0
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores); load average {load_avg()}")
    surprise = None if args.quick or args.no_surprise else try_import("surprise")
    names = ["fastmf SVDpp", "fastmf TimeSVDpp", "fastmf MF (defaults)"]
    if surprise is not None:
        names.append("Surprise SVD++")
    rows = {n: [] for n in names}
    folds = list(kfold(data, FOLDS, seed=SEED))[: 1 if args.quick else FOLDS]
    warm_train, warm_test = folds[0]
    train_model(fastmf.models.TimeSVDpp, warm_train, epochs=1)  # warm-up, untimed
    fit_fastmf_explicit(warm_train, warm_test, {"epochs": 1}, quick=False)
    for fold, (train, test) in enumerate(folds):
        results = [fit_fastmf_model(fastmf.models.SVDpp, train, test),
                   fit_fastmf_model(fastmf.models.TimeSVDpp, train, test),
                   fit_fastmf_explicit(train, test, {}, False)]
        if surprise is not None:
            results.append(fit_surprise_svdpp(train, test, fold))
        for name, result in zip(names, results, strict=True):
            rows[name].append(result)
            print(f"  fold {fold}: {name:<22} RMSE {result['rmse']:.4f}  fit "
                  f"{result['wall']:.2f} s wall, {result['cpu']:.2f} s CPU; load "
                  f"{load_avg()}", flush=True)
    print(f"\n5-fold ({len(folds)} fold(s)), machine: {info['cpu']}, load {load_avg()}\n")
    ref = rows.get("Surprise SVD++")
    ref_cpu = (np.mean([r["cpu"] for r in ref]) if ref
               else SURPRISE_SVDPP_CPU if args.no_surprise else None)
    if not ref and ref_cpu is not None:
        print(f"(Surprise SVD++ not run: ratios against its published {ref_cpu} CPU s a fold)")
    print("| model | epochs | RMSE | fit s (wall) | fit s (CPU) | Surprise SVD++ CPU / model CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        ratio = "" if ref_cpu is None else (
            f"{ref_cpu / np.mean([r['cpu'] for r in rows[name]]):.1f}×")
        print(f"| {name} | {rows[name][0]['epochs']} | {summary(rows[name], 'rmse')} | "
              f"{summary(rows[name], 'wall', 2)} | {summary(rows[name], 'cpu', 2)} | {ratio} |")

    train, test = temporal_split(data, 0.2)
    print(f"\ntemporal split: latest 20% held out ({len(train):,} train, {len(test):,} test)\n")
    temporal = {"fastmf SVDpp": fit_fastmf_model(fastmf.models.SVDpp, train, test),
                "fastmf TimeSVDpp": fit_fastmf_model(fastmf.models.TimeSVDpp, train, test),
                "fastmf MF (defaults)": fit_fastmf_explicit(train, test, {}, False)}
    print("| model | RMSE | fit s (wall) |")
    print("|---|---:|---:|")
    for name, result in temporal.items():
        print(f"| {name} | {result['rmse']:.4f} | {result['wall']:.2f} |")
    by_user = temporal_by_user(train, test)
    print("\nTemporal split, RMSE by test user:\n")
    print("| test rows of | rows | " + " | ".join(temporal) + " |")
    print("|---|---:|" + "---:|" * len(temporal))
    for group, result in by_user.items():
        print(f"| {group} | {result['rows']:,} | "
              + " | ".join(f"{result[name]:.4f}" for name in temporal) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "kfold": rows,
                                         "temporal": temporal, "temporal_by_user": by_user},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
