"""``fastmf.tune``: hyperparameter search with Optuna over the settings of :func:`fastmf.fit`.

Optuna is an optional dependency (``pip install fastmf[tune]``); it is imported when
:func:`tune` runs, never by ``import fastmf``. The config helpers (:func:`read_config`,
:func:`write_config`) need no Optuna: ``fastmf train --config best.json`` works without it.

>>> import fastmf
>>> from fastmf.data import random_split
>>> data = fastmf.datasets.synthetic(num_users=300, num_items=200, num_interactions=6000)
>>> train, test = random_split(data, test_fraction=0.2, seed=0)   # tune on train only
>>> result = fastmf.tune(train, loss="mse", n_trials=3,
...                      search_space={"dim": 16, "epochs": (2, 4)})  # doctest: +SKIP
>>> result.best_params  # doctest: +SKIP
{'dim': 16, 'lr': 0.05..., 'reg': ..., 'epochs': 4, 'batch_size': 1024}
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmf import metrics as metrics_module
from fastmf.data import Interactions
from fastmf.train import DEFAULTS, EXPLICIT, IMPLICIT, suggest_dim

__all__ = ["DEFAULT_SEARCH_SPACE", "TuneResult", "read_config", "trials_table", "tune",
           "write_config"]

#: The search space :func:`tune` uses for each knob unless ``search_space`` overrides it:
#: ``{"low", "high", "log"}`` is a range (integers for the integer knobs), ``{"choices"}`` a
#: categorical choice. ``num_negatives`` and ``negative_distribution`` apply to the implicit
#: losses (``"bce"``, ``"bpr"``) only.
DEFAULT_SEARCH_SPACE: dict[str, dict] = {
    "dim": {"low": 8, "high": 256, "log": True},
    "lr": {"low": 1e-3, "high": 0.3, "log": True},
    "reg": {"low": 1e-5, "high": 0.3, "log": True},
    "epochs": {"low": 3, "high": 40, "log": False},
    "batch_size": {"choices": [512, 1024, 2048, 4096, 8192]},
    "num_negatives": {"low": 1, "high": 16, "log": True},
    "negative_distribution": {"choices": ["uniform", "popularity"]},
}
_INT_KNOBS = frozenset(("dim", "epochs", "batch_size", "num_negatives"))
_IMPLICIT_KNOBS = frozenset(("num_negatives", "negative_distribution"))
_DISTRIBUTIONS = ("uniform", "popularity")

_INSTALL = "fastmf.tune needs Optuna: pip install fastmf[tune] (or pip install optuna)"


def _import_optuna():
    try:
        import optuna
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from None
    return optuna


# -- values of the knobs -----------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def _knob_error(name: str, value: Any) -> str | None:
    """Why ``value`` is no valid setting of knob ``name`` (None when it is)."""
    if name in _INT_KNOBS:
        if not _is_int(value) or value < 1:
            return f"must be an integer >= 1, got {value!r}"
    elif name == "lr":
        if not _is_number(value) or value <= 0:
            return f"must be a finite number > 0, got {value!r}"
    elif name == "reg":
        if not _is_number(value) or value < 0:
            return f"must be a finite number >= 0, got {value!r}"
    elif name == "negative_distribution":
        if value not in _DISTRIBUTIONS:
            return f"must be 'uniform' or 'popularity', got {value!r}"
    return None


def _plain(name: str, value: Any) -> Any:
    """A knob value as a plain Python int/float/str (JSON-ready)."""
    if name in _INT_KNOBS:
        return int(value)
    if name in ("lr", "reg"):
        return float(value)
    return value


# -- the search space --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Range:
    low: float
    high: float
    log: bool


@dataclass(frozen=True)
class _Choices:
    choices: tuple


@dataclass(frozen=True)
class _Fixed:
    value: Any


def _spec(name: str, spec: Any, where: str):
    """One knob's entry of ``search_space`` as _Fixed, _Range, _Choices or an Optuna
    distribution; every value checked."""
    default = DEFAULT_SEARCH_SPACE[name]

    def bad(message: str) -> ValueError:
        return ValueError(f"{where}: search_space[{name!r}] {message}")

    if type(spec).__module__.startswith("optuna.distributions"):
        return _check_distribution(name, spec, bad)
    if isinstance(spec, dict):
        keys = set(spec)
        if keys == {"choices"}:
            return _spec(name, _Choices(tuple(spec["choices"]) if isinstance(
                spec["choices"], list | tuple) else spec["choices"]), where)
        if keys in ({"low", "high"}, {"low", "high", "log"}):
            log = spec.get("log", default.get("log", False))
            if not isinstance(log, bool):
                raise bad(f"'log' must be true or false, got {log!r}")
            return _spec(name, _Range(spec["low"], spec["high"], log), where)
        raise bad(f"must have the keys 'low', 'high' (and optionally 'log') or 'choices', got "
                  f"{sorted(keys)}")
    if isinstance(spec, list | tuple):
        if len(spec) != 2 or not all(_is_number(v) for v in spec):
            raise bad(f"a list or tuple is a range (low, high) of two numbers, got {spec!r}; "
                      "use {'choices': [...]} for a categorical choice")
        return _spec(name, _Range(spec[0], spec[1], default.get("log", False)), where)
    if isinstance(spec, _Range):
        if name == "negative_distribution":
            raise bad("takes choices, not a range")
        for value in (spec.low, spec.high):
            if (error := _knob_error(name, value)) is not None:
                raise bad(f"range bound {error}")
        if spec.low > spec.high:
            raise bad(f"range has low {spec.low!r} > high {spec.high!r}")
        if spec.log and spec.low <= 0:
            raise bad(f"a log range needs low > 0, got {spec.low!r}")
        if spec.low == spec.high:
            return _Fixed(_plain(name, spec.low))
        return _Range(_plain(name, spec.low), _plain(name, spec.high), spec.log)
    if isinstance(spec, _Choices):
        if not isinstance(spec.choices, tuple) or not spec.choices:
            raise bad(f"choices must be a non-empty list, got {spec.choices!r}")
        for value in spec.choices:
            if (error := _knob_error(name, value)) is not None:
                raise bad(f"choice {error}")
        return _Choices(tuple(_plain(name, v) for v in spec.choices))
    if (error := _knob_error(name, spec)) is not None:
        raise bad(f"(a fixed value) {error}")
    return _Fixed(_plain(name, spec))


def _check_distribution(name: str, dist, bad):
    """An Optuna distribution whose values are all valid settings of knob ``name``."""
    d = _import_optuna().distributions
    if isinstance(dist, d.CategoricalDistribution):
        values = dist.choices
    elif isinstance(dist, d.IntDistribution | d.FloatDistribution):
        if name == "negative_distribution":
            raise bad("takes choices, not a range")
        if name in _INT_KNOBS and isinstance(dist, d.FloatDistribution):
            raise bad("takes integers: use optuna.distributions.IntDistribution")
        values = (dist.low, dist.high)
    else:
        raise bad(f"unsupported distribution {type(dist).__name__}")
    for value in values:
        if (error := _knob_error(name, value)) is not None:
            raise bad(f"value {error}")
    return dist


def _search_space(search_space: Any, implicit: bool, where: str) -> dict:
    """The knobs to search or fix: the defaults (the implicit-only ones for implicit losses),
    updated by ``search_space``; a knob set to None is left out (fit's default applies)."""
    if search_space is None:
        search_space = {}
    if not isinstance(search_space, dict):
        raise TypeError(f"{where}: search_space must be a dict, got "
                        f"{type(search_space).__name__}")
    unknown = [k for k in search_space if k not in DEFAULT_SEARCH_SPACE]
    if unknown:
        raise ValueError(f"{where}: unknown search_space key(s) {unknown}; valid keys: "
                         f"{list(DEFAULT_SEARCH_SPACE)}")
    if not implicit:
        given = sorted(k for k in search_space
                       if k in _IMPLICIT_KNOBS and search_space[k] is not None)
        if given:
            raise ValueError(f"{where}: search_space key(s) {given} apply to the implicit "
                             "losses ('bce', 'bpr') only")
    space = {}
    for name, default in DEFAULT_SEARCH_SPACE.items():
        if name in _IMPLICIT_KNOBS and not implicit:
            continue
        spec = search_space.get(name, default)
        if spec is not None:
            space[name] = _spec(name, spec, where)
    return space


def _suggest(trial, name: str, spec) -> Any:
    optuna = _import_optuna()
    d = optuna.distributions
    if isinstance(spec, _Fixed):
        return spec.value
    if isinstance(spec, _Choices):
        return trial.suggest_categorical(name, list(spec.choices))
    if isinstance(spec, _Range):
        if name in _INT_KNOBS:
            return trial.suggest_int(name, spec.low, spec.high, log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    if isinstance(spec, d.IntDistribution):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, d.FloatDistribution):
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, d.CategoricalDistribution):
        return trial.suggest_categorical(name, list(spec.choices))
    raise TypeError(f"fastmf.tune: search_space[{name!r}]: unsupported distribution "
                    f"{type(spec).__name__}")


# -- the validation split ----------------------------------------------------------------------

def validation_rows(data: Interactions, valid_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): sorted row indices into ``data``. Each user's
    ``floor(valid_fraction * n_u + 0.5)`` random rows (at most ``n_u - 1``) are validation
    rows, so every validated user has training rows too (``random_split(by_user=True)``'s
    rule)."""
    rng = np.random.default_rng(seed)
    users = np.asarray(data.users)
    n = len(users)
    order = np.lexsort((rng.random(n), users))  # by user, random within a user
    sizes = np.bincount(users, minlength=data.num_users)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    take = np.minimum(np.floor(valid_fraction * sizes + 0.5), np.maximum(sizes - 1, 0))
    valid = rank < take[users]
    return np.flatnonzero(~valid), np.flatnonzero(valid)


# -- results -----------------------------------------------------------------------------------

@dataclass
class TuneResult:
    """What :func:`tune` found.

    - ``best_params``: the best trial's settings, the fixed ones of ``search_space``
      included: keyword arguments of :func:`fastmf.fit` plus ``dim`` for the model;
    - ``best_value``: its validation ``metric`` after its last epoch;
    - ``study``: the ``optuna.Study`` (every trial, its state, per-epoch values in
      ``trial.intermediate_values``);
    - ``train_rows``, ``valid_rows``: the row indices of ``data`` the trials trained and
      validated on (disjoint, together all rows).
    """

    best_params: dict
    best_value: float
    study: Any
    loss: str
    metric: str
    train_rows: np.ndarray = field(repr=False)
    valid_rows: np.ndarray = field(repr=False)

    def config(self) -> dict:
        """``{"loss": ..., **best_params}``: what :func:`write_config` writes for
        ``fastmf train --config``."""
        return {"loss": self.loss, **self.best_params}


def _check_metric(metric: str | None, loss: str, where: str) -> str:
    """The canonical name of the metric to optimize (the loss kind's default for None)."""
    implicit = loss in IMPLICIT
    if metric is None:
        return "ndcg@10" if implicit else "rmse"
    base, cut = metrics_module._parse_metric(metric, where)
    if implicit and base in ("rmse", "mae"):
        raise ValueError(f"{where}: metric {metric!r} measures rating predictions; the "
                         f"implicit loss {loss!r} learns rankings (use e.g. 'ndcg@10')")
    return base if cut is None else f"{base}@{cut}"


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def tune(
    data: Interactions,
    *,
    loss: str = "mse",
    metric: str | None = None,
    n_trials: int | None = 20,
    timeout: float | None = None,
    search_space: dict | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    sampler=None,
    pruner=None,
    backend: str = "auto",
    device=None,
    progress: bool = False,
) -> TuneResult:
    """Search :func:`fastmf.fit`'s settings with Optuna; returns a :class:`TuneResult`.

    ``data`` must be **training data only**: hold out your test set first (e.g.
    ``train, test = random_split(data, 0.2)`` and ``tune(train)``). Each trial trains on
    ``data`` less a validation split carved from it (``valid_fraction`` of each user's
    rows, see :func:`validation_rows`) and is scored on that split, so no test row is ever
    seen. Then train the final model on all of ``data`` with ``best_params``.

    - ``loss``: any loss of :func:`fastmf.fit` (``"mse"``, ``"huber"``, ``"bce"``, ``"bpr"``).
    - ``metric``: the validation metric to optimize (any name of :func:`fastmf.evaluate`;
      default ``"rmse"`` for the explicit losses, ``"ndcg@10"`` for the implicit ones); the
      direction follows :func:`fastmf.metrics.higher_is_better`.
    - ``search_space``: overrides :data:`DEFAULT_SEARCH_SPACE` per knob (``dim``, ``lr``,
      ``reg``, ``epochs``, ``batch_size``, and for implicit losses ``num_negatives``,
      ``negative_distribution``). A value is a range ``(low, high)`` (keeping the knob's
      log or linear scale) or ``{"low": .., "high": .., "log": bool}``; ``{"choices":
      [...]}``; an ``optuna.distributions`` object; a single value (fixed, not searched);
      or None (left out: fit's default, and for ``dim`` the CLI's rule of thumb).
    - Each trial trains epoch by epoch (one :func:`fastmf.fit` call per epoch with one
      optimizer, so the Adagrad state carries over), reports the validation metric after
      every epoch (``trial.report``) and stops when ``pruner`` says so (default
      ``MedianPruner(n_startup_trials=5, n_warmup_steps=2)``). A trial whose metric is
      not finite (a diverging ``lr``) is pruned. Its value is the metric after its last
      epoch.
    - ``n_trials``, ``timeout`` (seconds): stop after this many trials or once this time
      has passed (a running trial finishes first); either may be None, not both (the study
      would never end).
    - ``seed``: the validation split, the model initialization, the shuffles and
      negatives, and the default sampler ``TPESampler(seed=seed)``: the same call gives the
      same trials (unless ``timeout`` cuts it short at a different point).
    - ``progress``: Optuna's progress bar and trial log (otherwise Optuna logs warnings only).

    Raises ImportError (saying ``pip install fastmf[tune]``) without Optuna, and
    RuntimeError when no trial completes.
    """
    where = "fastmf.tune"
    if not isinstance(data, Interactions):
        raise TypeError(f"{where}: data must be fastmf.data.Interactions, got "
                        f"{type(data).__name__}")
    if loss not in EXPLICIT + IMPLICIT:
        raise ValueError(f"{where}: unknown loss {loss!r}; expected one of "
                         f"{EXPLICIT + IMPLICIT}")
    implicit = loss in IMPLICIT
    if not implicit and data.ratings is None:
        raise ValueError(f"{where}: loss {loss!r} needs ratings; these interactions have none "
                         "(use loss='bpr' or 'bce' for implicit feedback)")
    metric = _check_metric(metric, loss, where)
    if n_trials is not None and (not _is_int(n_trials) or n_trials < 1):
        raise ValueError(f"{where}: n_trials must be a positive int or None, got {n_trials!r}")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise ValueError(f"{where}: timeout must be a finite number of seconds > 0 or None, "
                         f"got {timeout!r}")
    if n_trials is None and timeout is None:
        raise ValueError(f"{where}: n_trials and timeout are both None: the study would never "
                         "end; give a number of trials, a time limit in seconds, or both")
    if not _is_number(valid_fraction) or not 0 < valid_fraction < 1:
        raise ValueError(f"{where}: valid_fraction must be in (0, 1), got {valid_fraction!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"{where}: seed must be an int >= 0, got {seed!r}")
    space = _search_space(search_space, implicit, where)
    optuna = _import_optuna()

    train_rows, valid_rows = validation_rows(data, float(valid_fraction), int(seed))
    if len(valid_rows) == 0:
        raise ValueError(f"{where}: valid_fraction={valid_fraction} holds out no interaction "
                         f"({len(data)} interactions, {data.num_users} users); use a larger "
                         "valid_fraction or more data")
    fit_part, valid = data.subset(train_rows), data.subset(valid_rows)
    from fastmf.layers import MF
    from fastmf.optim import SparseAdagrad
    from fastmf.train import fit

    fixed = {name: spec.value for name, spec in space.items() if isinstance(spec, _Fixed)}
    default_dim = min(128, suggest_dim(min(data.num_users, data.num_items)))
    kind = DEFAULTS["implicit" if implicit else "explicit"]

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in space.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MF(data.num_users, data.num_items, params.get("dim", default_dim),
                       backend=backend, device=device)
        optimizer = SparseAdagrad(model.parameters(), lr=params.get("lr", kind["lr"]))
        options = {name: params[name] for name in ("batch_size", "reg", "num_negatives",
                                                    "negative_distribution") if name in params}
        value = math.nan
        for epoch in range(params.get("epochs", kind["epochs"])):
            history = fit(model, fit_part, loss=loss, epochs=1, optimizer=optimizer,
                          valid=valid, metrics=(metric,), seed=_epoch_seed(seed, epoch),
                          progress=False, **options)
            value = float(history.epochs[-1][metric])
            if not math.isfinite(value):
                trial.set_user_attr("diverged_at_epoch", epoch)
                raise optuna.TrialPruned(f"validation {metric} is {value} at epoch {epoch}")
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    verbosity = optuna.logging.get_verbosity()
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = _run_study(optuna, objective, metric, seed, sampler, pruner, n_trials, timeout,
                           progress)
        study.set_user_attr("fixed_params", fixed)
    finally:
        optuna.logging.set_verbosity(verbosity)
    states = optuna.trial.TrialState
    if not any(t.state == states.COMPLETE for t in study.trials):
        counts = {s.name.lower(): sum(t.state == s for t in study.trials)
                  for s in (states.PRUNED, states.FAIL)}
        raise RuntimeError(f"{where}: no trial completed ({len(study.trials)} run: "
                           f"{counts['pruned']} pruned, {counts['fail']} failed); allow more "
                           "trials or time, or narrow the search space (a too large lr "
                           "diverges)")
    best = study.best_trial
    return TuneResult(best_params={**fixed, **{k: _plain(k, v) for k, v in best.params.items()}},
                      best_value=float(best.value), study=study, loss=loss, metric=metric,
                      train_rows=train_rows, valid_rows=valid_rows)


def _run_study(optuna, objective, metric, seed, sampler, pruner, n_trials, timeout, progress):
    study = optuna.create_study(
        direction="maximize" if metrics_module.higher_is_better(metric) else "minimize",
        sampler=sampler if sampler is not None else optuna.samplers.TPESampler(seed=seed),
        pruner=pruner if pruner is not None else optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=2))
    study.optimize(objective, n_trials=n_trials, timeout=timeout, show_progress_bar=progress)
    return study


def trials_table(study) -> str:
    """One line per trial: number, state, value (the last reported one for a pruned
    trial), epochs run and the sampled settings."""
    names: list[str] = []
    for t in study.trials:
        names += [k for k in t.params if k not in names]
    rows = [["trial", "state", "value", "epochs run", *names]]
    for t in study.trials:
        if t.value is not None:
            value = t.value
        elif t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        else:
            value = None
        rows.append([str(t.number), t.state.name, "-" if value is None else f"{value:.5g}",
                     str(len(t.intermediate_values)),
                     *("-" if k not in t.params else _fmt(t.params[k]) for k in names)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- the config file: `fastmf tune --out` writes it, `fastmf train --config` reads it ----------

#: Keys of a config file and what each holds. ``tuned`` records how the settings were found
#: (informational; ``fastmf train`` ignores it).
CONFIG_KEYS = {
    "loss": "one of 'mse', 'huber', 'bce', 'bpr'",
    "dim": "an integer >= 1",
    "lr": "a finite number > 0",
    "reg": "a finite number >= 0",
    "epochs": "an integer >= 1",
    "batch_size": "an integer >= 1",
    "num_negatives": "an integer >= 1 (implicit losses)",
    "negative_distribution": "'uniform' or 'popularity' (implicit losses)",
    "seed": "an integer >= 0",
    "split": "'random', 'loo' or 'temporal'",
    "test_fraction": "a number in [0, 1)",
    "tuned": "an object (how the settings were found; not used)",
}
_CONFIG_MAX_BYTES = 1 << 20


def check_config(config: Any, where: str) -> dict:
    """``config`` checked against :data:`CONFIG_KEYS` (ValueError naming the key and
    value otherwise); returns it."""
    if not isinstance(config, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        raise ValueError(f"{where}: holds {kind.get(type(config), 'a number')}, not a JSON "
                         "object of settings")
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {list(CONFIG_KEYS)}")
    for key, value in config.items():
        if key in DEFAULT_SEARCH_SPACE:
            error = _knob_error(key, value)
        elif key == "loss":
            error = None if value in EXPLICIT + IMPLICIT else f"got {value!r}"
        elif key == "seed":
            error = None if _is_int(value) and value >= 0 else f"got {value!r}"
        elif key == "split":
            error = None if value in ("random", "loo", "temporal") else f"got {value!r}"
        elif key == "test_fraction":
            error = None if _is_number(value) and 0 <= value < 1 else f"got {value!r}"
        else:
            error = None if isinstance(value, dict) else f"got {type(value).__name__}"
        if error is not None:
            if not error.startswith("must"):
                error = f"must be {CONFIG_KEYS[key]}, {error}"
            raise ValueError(f"{where}: {key!r} {error}")
    if config.get("split") == "loo" and "test_fraction" in config:
        raise ValueError(f"{where}: 'split' 'loo' holds out one interaction per user; "
                         "'test_fraction' does not apply")
    if "split" in config and config.get("test_fraction", 0.2) == 0:
        raise ValueError(f"{where}: 'test_fraction' 0 holds out nothing; 'split' does not "
                         "apply")
    return config


def read_config(path: str | os.PathLike, where: str | None = None) -> dict:
    """The settings in a JSON config file (as :func:`write_config` writes), checked by
    :func:`check_config`: ValueError for a file that is no JSON object, unknown keys or
    bad values; FileNotFoundError for a missing file."""
    path = Path(path)
    where = where or f"config {path}"
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such file")
    if path.is_dir():
        raise ValueError(f"{where}: is a folder, not a JSON file")
    if path.stat().st_size > _CONFIG_MAX_BYTES:
        raise ValueError(f"{where}: larger than {_CONFIG_MAX_BYTES} bytes; not a config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text ({exc.reason})") from None
    try:
        config = json.loads(text, parse_constant=lambda name: _reject_constant(name, where))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno})") from None
    return check_config(config, where)


def _reject_constant(name: str, where: str):
    raise ValueError(f"{where}: {name} is not a valid JSON value")


def _json_scalar(value):
    """numpy scalars (check_config takes them as numbers) as the Python ones JSON writes."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_config(path: str | os.PathLike, config: dict, *, overwrite: bool = True) -> Path:
    """Write ``config`` (checked) as JSON to ``path``, atomically (a temporary file, then
    renamed into place). ``overwrite=False``: FileExistsError, and ``path`` left as it is,
    when it exists at the moment of writing (an existence check made before a long tuning
    run cannot see a file that appears during it)."""
    path = Path(path)
    text = json.dumps(check_config(config, f"fastmf.tune.write_config({str(path)!r})"),
                      indent=2, allow_nan=False, default=_json_scalar) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails, writing nothing, if path exists
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: create it exclusively
                with open(path, "x", encoding="utf-8") as f:
                    f.write(text)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _CallableModule(types.ModuleType):
    """``fastmf.tune(...)`` calls :func:`tune` even when this module, not the function, is
    bound as ``fastmf.tune``: importing ``fastmf.tune`` (``from fastmf.tune import ...``)
    before the package's lazy name is first used binds the module there."""

    def __call__(self, *args, **kwargs) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
