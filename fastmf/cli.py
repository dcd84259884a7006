"""The ``fastmf`` command: ``demo``, ``fetch``, ``tune``, ``train``, ``evaluate``,
``recommend``, ``plot``.

    fastmf demo
    fastmf fetch ml-latest-small
    fastmf tune --data ml-latest-small --loss mse --trials 20 --out best.json
    fastmf train --data ml-latest-small --config best.json --out model/ --save-split split/
    fastmf evaluate --model model/ --data split/test.csv --train split/train.csv
    fastmf recommend --model model/ --user 1 -k 10 --train split/train.csv
    fastmf plot --model model/ --kind tsne --color-by Animation --data ml-latest-small \
        --out items.png

Every error is one line on stderr and exit status 2 (1 for an unexpected failure; set
``FASTMF_TRACEBACK=1`` to see its traceback); notes go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from fastmf.recommender import FIT_LOSSES, KERNEL_LOSSES

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class CliError(Exception):
    """An error to print as one line (no traceback)."""


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# -- option types: bad values are usage errors (exit 2) before any work ------------------------

def _number(text: str, kind, what: str, ok) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "an integer > 0", lambda v: v > 0)


def nonnegative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    return _number(text, float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def valid_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


def device(text: str) -> str:
    devices = valid_devices()
    if text not in devices:
        gpu = "" if torch.cuda.is_available() else " (torch sees no CUDA GPU)"
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; valid here: {', '.join(devices)}{gpu}")
    return text


_SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|",
               "space": " "}


def separator(text: str) -> str:
    sep = _SEPARATORS.get(text.lower(), text)
    if not sep:
        raise argparse.ArgumentTypeError("must not be empty")
    return sep


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- data --------------------------------------------------------------------------------------

_MOVIELENS_FILES = ("ratings.dat", "u.data")
_PARQUET = (".parquet", ".pq")


def load_data(path: str, *, user_col: str, item_col: str, rating_col: str | None,
              time_col: str | None, sep: str | None = None, header: bool | None = None,
              encoding: str = "utf-8", require_ratings: bool = False, what: str = "--data"):
    """A MovieLens folder (any release; a bare release name is also looked for in the
    download cache), a MovieLens ratings file (read as named), a Parquet file, or any
    delimited text file with the given columns (see ``Interactions.from_csv``)."""
    from fastmf import datasets
    from fastmf.data import Interactions
    from fastmf.data.interactions import csv_layout

    p = Path(path)
    if not p.exists():
        if p.suffix == "":  # maybe a release name: say where it looked and how to get it
            try:
                return datasets.load_movielens(p)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{exc}; from the command line: fastmf fetch {p.name}") \
                    from None
        raise FileNotFoundError(f"{what}: no such file or folder: {path}")
    columns = dict(user_col=user_col, item_col=item_col, rating_col=rating_col,
                   time_col=time_col)
    found = None
    if p.is_dir() or p.name in _MOVIELENS_FILES:
        data = datasets.load_movielens(p)
    elif p.suffix.lower() in _PARQUET:
        data = Interactions.from_parquet(p, **columns)
    elif p.suffix.lower() == ".zip":
        raise CliError(f"{what} {path}: unzip it first (or use `fastmf fetch` for MovieLens)")
    else:
        layout = csv_layout(p, sep, header, encoding=encoding)
        if not layout.header or "detected from" in layout.reason:
            _note(f"{what} {path}: {layout.reason}")
        found = (f"found columns {layout.columns}" if layout.header else
                 f"found {len(layout.columns)} columns and no header row")
        data = Interactions.from_csv(p, **columns, sep=layout.sep, header=layout.header,
                                     encoding=encoding)
    if require_ratings and data.ratings is None:
        raise CliError(
            f"{what} {path} has no ratings ({found or 'no rating column'}); expected a rating "
            f"column named exactly {rating_col!r} (choose it with --rating-col NAME), or use "
            "--loss bpr or bce for data without ratings")
    return data


def _data_args(args) -> dict:
    return dict(user_col=args.user_col, item_col=args.item_col, sep=args.sep,
                header=args.header, encoding=args.encoding)


def split(data, how: str, test_fraction: float, seed: int):
    from fastmf.data import leave_one_out, random_split, temporal_split

    if how == "random":
        return random_split(data, test_fraction=test_fraction, seed=seed)
    if how == "loo":
        if data.timestamps is None:
            _note("no timestamps: leave-one-out holds out a random interaction per user")
        return leave_one_out(data, by="time" if data.timestamps is not None else "random",
                             seed=seed)
    if how == "temporal":
        return temporal_split(data, test_fraction=test_fraction)
    raise ValueError(f"unknown split {how!r}")


def default_dim(data) -> int:
    from fastmf.train import suggest_dim

    return min(128, suggest_dim(min(data.num_users, data.num_items)))


def _reindex(data, user_map, item_map, what: str):
    """``data`` re-indexed into other id maps (a model's, the training data's); rows with
    users or items the maps do not hold are dropped, with a note."""
    try:
        out = data.reindex(user_map, item_map)
    except ValueError:
        raise CliError(f"{what}: none of its users and items are in the training data") \
            from None
    dropped = len(data) - len(out)
    if dropped:
        _note(f"{what}: {dropped:,} of {len(data):,} interactions with users/items unknown "
              "to the model skipped")
    return out


def _model_space(model, data, what: str = "--data"):
    if model.user_map is None or model.item_map is None:
        raise CliError("the model holds no id maps; train it with `fastmf train` or fit()")
    return _reindex(data, model.user_map, model.item_map, what)


# -- output locations: checked before training, so a bad path costs nothing -------------------

def _probe_writable(folder: Path, what: str) -> None:
    try:
        probe = tempfile.mkdtemp(dir=folder, prefix=".fastmf-write-check-")
    except OSError as exc:
        raise CliError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.rmdir(probe)


def _is_checkpoint(folder: Path) -> bool:
    """A sharded checkpoint (its CURRENT names one of its versions) or an ordinary one (its
    config.json is a fastmf config), each file read as loading reads it. A folder that
    merely holds a file named CURRENT is neither: saving a sharded checkpoint removes the
    folders of its other versions."""
    from fastmf.checkpoint import CheckpointError, _read_config
    from fastmf.distributed.checkpoint import is_sharded_checkpoint

    if (folder / "CURRENT").is_file():
        return is_sharded_checkpoint(folder)
    try:
        _read_config(folder, "fastmf")
    except (CheckpointError, OSError):
        return False
    return True


def _check_out(path) -> Path:
    """The ``--out`` folder can be written: its parent exists and is writable, and it is
    new, empty or a fastmf checkpoint (saving replaces the folder as a whole, so any other
    folder's files would be lost)."""
    out = Path(path)
    parent = out.absolute().parent
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CliError(f"--out {path} is an existing file, not a checkpoint folder; "
                           "choose another path")
        if any(out.iterdir()) and not _is_checkpoint(out):
            raise CliError(
                f"--out {path} is a folder with other files in it, not a fastmf checkpoint; "
                "saving replaces the whole folder, so choose a new or empty folder")
    if not parent.is_dir():
        raise CliError(f"--out {path}: the folder {parent} does not exist")
    _probe_writable(parent, f"--out {path}")
    from fastmf.checkpoint import CheckpointError, check_save_target

    try:  # the rule saving itself applies, so the two cannot disagree
        return check_save_target(out)
    except CheckpointError as exc:
        raise CliError(f"--out: {exc}") from None


_SPLIT_FILES = ("train.csv", "test.csv")


def _check_split_dir(path, force: bool) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--save-split {path} is a file, not a folder")
    if folder.is_dir():
        existing = [name for name in _SPLIT_FILES if (folder / name).exists()]
        if existing and not force:
            raise CliError(f"--save-split {path} already holds {', '.join(existing)}; pass "
                           "--force to overwrite")
        _probe_writable(folder, f"--save-split {path}")
    else:
        parent = folder.absolute().parent
        if not parent.is_dir():
            raise CliError(f"--save-split {path}: the folder {parent} does not exist")
        _probe_writable(parent, f"--save-split {path}")
    return folder


def _write_split(folder: Path, parts, args, force: bool) -> None:
    """train.csv/test.csv with raw ids, under the column names the data was read with."""
    names = {"user": args.user_col, "item": args.item_col,
             "rating": args.rating_col or "rating", "timestamp": args.time_col or "timestamp"}
    folder.mkdir(exist_ok=True)
    for name, part in zip(_SPLIT_FILES, parts, strict=True):
        target = folder / name
        tmp = folder / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            part.to_pandas().rename(columns=names).to_csv(tmp, index=False)
            if target.exists() and not force:
                raise CliError(f"--save-split: {target} appeared meanwhile; not overwritten")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _is_sharded(path: Path) -> bool:
    """A sharded checkpoint's folder (`train --distributed --out`), by its files."""
    return (path / "CURRENT").is_file() and not (path / "config.json").exists()


def _load_model(path, device_name=None):
    from fastmf.checkpoint import load

    if _is_sharded(Path(path)):
        # A sharded checkpoint (`train --distributed --out`): served as one model here.
        from fastmf.distributed import load_model

        try:
            return load_model(path, device=device_name)
        except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
            raise CliError(f"--model {path}: {exc}") from None
    # fastmf.load reads config.json within its size bound and says what is wrong with it.
    return load(path, device=device_name)


def _metrics_for(loss: str, k: int) -> tuple[str, ...]:
    if loss in ("mse", "huber"):
        return ("rmse", "mae", f"hr@{k}", f"ndcg@{k}")
    return (f"hr@{k}", f"ndcg@{k}", f"recall@{k}", f"map@{k}", "coverage")


def _print_metrics(title: str, values: dict) -> None:
    shown = "  ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))
    print(f"{title}: {shown}")


# -- commands ----------------------------------------------------------------------------------

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _process_group(args):
    """``train --distributed``: the process group from torchrun's environment (NCCL on the
    rank's GPU when the device is CUDA, else gloo), or the one already initialised (a
    script calling ``main``); ranks other than 0 print nothing."""
    import torch.distributed as dist

    own = not (dist.is_available() and dist.is_initialized())
    if own:
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise CliError(f"--distributed needs the environment torchrun sets "
                           f"({', '.join(missing)} not set); launch it as `torchrun "
                           "--nproc_per_node=N -m fastmf train --distributed ...`")
        device = args.device or _default_device()
        cuda = device.startswith("cuda")
        if cuda:
            if device == "cuda":
                device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(torch.device(device))
        args.device = device
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if dist.get_rank() == 0:
            yield
        else:
            args.quiet = True
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        if own:
            dist.destroy_process_group()


def cmd_train(args) -> None:
    if args.distributed:
        with _process_group(args):
            _train(args, distributed=True)
    else:
        _train(args, distributed=False)


def _train(args, distributed: bool) -> None:
    from fastmf.evaluate import evaluate
    from fastmf.train import fit

    cls = _model_class(args.model)
    model_args = _model_args(args.model_args, cls)
    fit_options = _apply_config(args, default_loss=cls.default_loss)
    if args.loss not in cls.losses:
        raise CliError(f"--loss {args.loss}: --model {args.model} trains with "
                       f"{', '.join(cls.losses)}")
    explicit = args.loss in ("mse", "huber")
    if args.test is not None and (args.split is not None or args.test_fraction is not None):
        raise CliError("--test gives the test set; --split and --test-fraction do not apply")
    how = args.split or "random"
    test_fraction = 0.2 if args.test_fraction is None else args.test_fraction
    if how == "loo" and args.test_fraction is not None:
        raise CliError("--split loo holds out one interaction per user; --test-fraction does "
                       "not apply (--test-fraction 0 with --split random: no test set)")
    if args.split is not None and test_fraction == 0:
        raise CliError("--test-fraction 0 holds out nothing; --split does not apply")
    held_out = args.test is not None or how == "loo" or test_fraction > 0
    if not held_out and args.early_stopping:
        raise CliError("--early-stopping needs a test set; --test-fraction 0 has none")
    if args.save_split and not held_out:
        raise CliError("--save-split: --test-fraction 0 makes no split to save")
    if args.save_split and args.test is not None:
        raise CliError("--save-split: --data and --test already are the split")
    if distributed:
        import torch.distributed as dist

        import fastmf.distributed as fd
        from fastmf.distributed.fit import FitContext, check_target

        main_rank = dist.get_rank() == 0
        out = check_target(args.out, who="--out") if args.out else None
    else:
        main_rank = True
        out = _check_out(args.out) if args.out else None
    split_dir = _check_split_dir(args.save_split, args.force) if args.save_split else None

    columns = dict(_data_args(args), rating_col=args.rating_col if explicit else None,
                   time_col=args.time_col, require_ratings=explicit)
    data = load_data(args.data, **columns)
    print(f"data: {len(data):,} interactions, {data.num_users:,} users, "
          f"{data.num_items:,} items")
    if args.test is not None:
        train = data
        test = _reindex(load_data(args.test, **columns, what="--test"), data.user_map,
                        data.item_map, "--test")
        title = f"test ({args.test})"
    elif held_out:
        train, test = split(data, how, test_fraction, args.seed)
        title = f"test ({how} split)"
    else:
        train, test = data, None
        _note("--test-fraction 0: training on all interactions; no test evaluation")
    if split_dir is not None and main_rank:
        _write_split(split_dir, (train, test), args, args.force)
        print(f"split saved: {split_dir / 'train.csv'} ({len(train):,} interactions), "
              f"{split_dir / 'test.csv'} ({len(test):,})")
    torch.manual_seed(args.seed)
    model, dim = _build_model(cls, args, model_args, data, train)
    metrics = _metrics_for(args.loss, args.k)
    history = fit(model, train, loss=args.loss, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, reg=args.reg, valid=test,
                         metrics=metrics[:2] if test is not None else None, k=args.k,
                         early_stopping=args.early_stopping, seed=args.seed,
                         progress=not args.quiet, distributed=distributed, **fit_options)
    if distributed:
        model = history.model  # sharded
    results = None
    if test is not None and distributed:
        results = FitContext(model).evaluate(test, train=train, metrics=metrics, k=args.k)
        _print_metrics(f"{title}, {dim}, {dist.get_world_size()} ranks", results)
    elif test is not None:
        results = evaluate(model, test, train=train, metrics=metrics, k=args.k)
        _print_metrics(f"{title}, {dim}, backend={_backend_of(model)}", results)
    else:
        print(f"trained on all data ({dim}, backend={_backend_of(model)}); not evaluated")
    print(f"training speed: {np.mean(history['samples_per_s']) / 1e6:.2f} M samples/s")
    if out is not None and distributed:
        path = fd.save(out, model, extra={"loss": args.loss, "test": results,
                                          "model_class": cls.__name__,
                                          "model": model.get_config()})
        print(f"saved {path} (sharded: fastmf.distributed.load re-shards it to any world "
              "size)")
    elif out is not None:
        path = model.save(out, extra={"loss": args.loss, "test": results})
        print(f"saved {path}")


# Settings a config file may give `train`; an option given on the command line wins.
_CONFIG_OPTIONS = ("loss", "dim", "epochs", "batch_size", "lr", "reg", "seed")
_IMPLICIT_OPTIONS = ("num_negatives", "negative_distribution")


def _model_class(name: str):
    """The registered model class called ``name`` (class name lower-cased)."""
    import fastmf.models  # noqa: F401  (registers the models)
    from fastmf.checkpoint import MODELS
    from fastmf.recommender import Recommender

    classes = {cls.__name__.lower(): cls for cls in MODELS.values()
               if isinstance(cls, type) and issubclass(cls, Recommender)}
    cls = classes.get(name.lower())
    if cls is None:
        raise CliError(f"--model {name!r}: unknown model; choose one of "
                       f"{', '.join(sorted(classes))}")
    return cls


# Constructor arguments --model-args may not give: the data and the other options set them.
_RESERVED_MODEL_ARGS = ("num_users", "num_items", "backend", "device", "dtype")


def _model_args(text: str | None, cls) -> dict:
    """``--model-args``: a JSON object of constructor keywords of ``cls``."""
    import inspect

    if text is None:
        return {}
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise CliError(f"--model-args: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise CliError(f"--model-args: expected a JSON object such as '{{\"dim\": 32}}', "
                       f"got {type(values).__name__}")
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    knobs = [n for n, p in parameters.items() if n != "self" and n not in _RESERVED_MODEL_ARGS
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in values:
        if key in _RESERVED_MODEL_ARGS:
            raise CliError(f"--model-args: {key!r} is set from the data or the options, not "
                           "here")
        if key not in knobs and not takes_any:
            raise CliError(f"--model-args: {cls.__name__} has no argument {key!r}; it takes "
                           f"{', '.join(knobs) or 'none'}")
    return values


def _build_model(cls, args, model_args: dict, data, train):
    """The model `train` fits, and how to describe its size ("dim=32")."""
    import inspect

    kwargs = dict(model_args)
    takes_dim = "dim" in inspect.signature(cls.__init__).parameters
    if args.dim is not None and "dim" in kwargs:
        raise CliError("--dim and --model-args both give dim; give it once")
    if args.dim is not None and not takes_dim:
        raise CliError(f"--dim: --model {args.model} has no dim")
    if "dim" not in kwargs and takes_dim and (args.dim is not None or cls.__name__ == "MF"):
        kwargs["dim"] = args.dim if args.dim is not None else default_dim(data)
    device = args.device or _default_device()
    try:
        model = cls.from_interactions(train, **kwargs, backend=args.backend, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:  # a bad knob, as torch reports it
        raise CliError(f"--model {args.model}: cannot build it with {kwargs}: {exc}") from None
    dim = getattr(model, "dim", kwargs.get("dim"))
    described = f"dim={dim}" if cls.__name__ == "MF" else (
        f"model={args.model}" + (f", dim={dim}" if dim is not None else ""))
    return model, described


def _backend_of(model) -> str:
    return getattr(model, "backend", "auto")


def _apply_config(args, default_loss: str = "mse") -> dict:
    """Fill the train options not given on the command line from ``--config FILE`` (as
    ``fastmf tune --out`` writes it), then the defaults; returns the settings with no
    command-line option (``num_negatives``, ``negative_distribution``) for ``fit``."""
    config = {}
    if args.config is not None:
        from fastmf.tune import read_config

        config = read_config(args.config, where=f"--config {args.config}")
    used = {}
    for key in _CONFIG_OPTIONS:
        if getattr(args, key) is None and key in config:
            setattr(args, key, used.setdefault(key, config[key]))
    # The held-out test set is chosen as a whole: by the command line when it says
    # anything about it, else by the config (tune records the split it held out).
    if args.test is None and args.split is None and args.test_fraction is None:
        for key in ("split", "test_fraction"):
            if key in config:
                setattr(args, key, used.setdefault(key, config[key]))
    args.loss = args.loss or default_loss
    args.seed = 0 if args.seed is None else args.seed
    given = {key: getattr(args, key) for key in _IMPLICIT_OPTIONS
             if getattr(args, key) is not None}
    fit_options = {key: config[key] for key in _IMPLICIT_OPTIONS
                   if key in config and key not in given}
    if (fit_options or given) and args.loss in ("mse", "huber"):
        names = [f"--{key.replace('_', '-')}" for key in given] + (
            [f"--config {args.config}: {', '.join(fit_options)}"] if fit_options else [])
        _note(f"{'; '.join(names)} ignored (they apply to the implicit losses; the loss is "
              f"{args.loss})")
        fit_options, given = {}, {}
    used.update(fit_options)
    fit_options.update(given)
    if args.config is not None:
        tuned_for = config.get("loss")
        if tuned_for is not None and tuned_for != args.loss:
            _note(f"--config {args.config} holds settings for loss {tuned_for}; training with "
                  f"--loss {args.loss}")
        shown = " ".join(f"{k}={v}" for k, v in used.items()) or "nothing (all given as options)"
        _note(f"--config {args.config}: using {shown}")
    return fit_options


def _space(text: str) -> dict:
    """``--space``: a JSON object, parsed here; its values are checked by fastmf.tune."""
    try:
        space = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object, not valid JSON ({exc})") \
            from None
    if not isinstance(space, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return space


def _check_config_out(path, force: bool) -> Path:
    out = Path(path)
    if out.is_dir():
        raise CliError(f"--out {path} is a folder; give a file name such as best.json")
    if out.exists() and not force:
        raise CliError(f"--out {path} exists; pass --force to overwrite it")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise CliError(f"--out {path}: the folder {parent} does not exist")
    _probe_writable(parent, f"--out {path}")
    return out


def _valid_fraction(text: str) -> float:
    return _number(text, float, "a number in (0, 1)", lambda v: 0 < v < 1)


def cmd_tune(args) -> None:
    from fastmf.tune import (
        _check_metric,
        _import_optuna,
        _search_space,
        trials_table,
        tune,
        write_config,
    )

    how = args.split or "random"
    test_fraction = 0.2 if args.test_fraction is None else args.test_fraction
    if how == "loo" and args.test_fraction is not None:
        raise CliError("--split loo holds out one interaction per user; --test-fraction does "
                       "not apply")
    if args.split is not None and test_fraction == 0:
        raise CliError("--test-fraction 0 holds out nothing; --split does not apply")
    implicit = args.loss in ("bce", "bpr")
    # Every check that needs no data, before reading it: Optuna, the metric, the space.
    _import_optuna()
    metric = _check_metric(args.metric, args.loss, "--metric")
    _search_space(args.space, implicit, "--space")
    out = _check_config_out(args.out, args.force) if args.out else None

    data = load_data(args.data, **_data_args(args),
                     rating_col=None if implicit else args.rating_col, time_col=args.time_col,
                     require_ratings=not implicit)
    print(f"data: {len(data):,} interactions, {data.num_users:,} users, "
          f"{data.num_items:,} items")
    held_out = how == "loo" or test_fraction > 0
    if held_out:
        # The rows `fastmf train` holds out with the same --split/--test-fraction/--seed:
        # the trials never see them, and the config records the split for train --config.
        train, test = split(data, how, test_fraction, args.seed)
        print(f"held out {len(test):,} test interactions ({how} split, seed {args.seed}), as "
              f"`fastmf train` does with the same options; tuning on {len(train):,}")
    else:
        train = data
        _note("--test-fraction 0: --data is taken as training data only; tuning on all of it")
    start = time.perf_counter()
    try:
        result = tune(
            train, loss=args.loss, metric=metric, n_trials=args.trials, timeout=args.timeout,
            search_space=args.space, valid_fraction=args.valid_fraction, seed=args.seed,
            backend=args.backend, device=args.device or _default_device(),
            progress=not args.quiet)
    except RuntimeError as exc:  # no trial completed: say so, like any other error
        raise CliError(str(exc)) from None
    print(trials_table(result.study))
    states = [t.state.name for t in result.study.trials]
    print(f"{len(states)} trials in {time.perf_counter() - start:.1f} s: "
          f"{states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned")
    best = result.study.best_trial
    print(f"best: trial {best.number}, validation {result.metric}={result.best_value:.5g}, "
          + " ".join(f"{k}={v}" for k, v in result.best_params.items()))
    config = {**result.config(), "seed": args.seed}
    if held_out:
        config["split"] = how
        if how != "loo":
            config["test_fraction"] = test_fraction
    config["tuned"] = {"metric": result.metric, "value": result.best_value,
                       "trials": len(states), "valid_fraction": args.valid_fraction,
                       "data": str(args.data)}
    if out is not None:
        try:
            write_config(out, config, overwrite=args.force)
        except FileExistsError:
            print(json.dumps(config))
            raise CliError(f"--out {out} appeared while tuning; not overwritten (pass --force "
                           "to overwrite it); the config is printed above") from None
        print(f"wrote {out}; train with it: fastmf train --config {out} --data {args.data}")
    else:
        print(json.dumps(config))


def cmd_evaluate(args) -> None:
    from fastmf.evaluate import evaluate

    model = _load_model(args.model, args.device)
    data = load_data(args.data, **_data_args(args), rating_col=args.rating_col,
                     time_col=args.time_col)
    test = _model_space(model, data)
    metrics = ("rmse", "mae") if test.ratings is not None else ()
    metrics += (f"hr@{args.k}", f"ndcg@{args.k}", f"recall@{args.k}", "coverage")
    train = None
    if args.train:
        train = _model_space(model, load_data(
            args.train, **_data_args(args), rating_col=None, time_col=None, what="--train"),
            "--train")
    else:
        _note("the rankings include the users' training items; pass --train FILE to leave "
              "them out")
    _print_metrics(f"{args.data}", evaluate(model, test, train=train, metrics=metrics,
                                                   k=args.k))


def _raw_user(text: str, id_map):
    """The ``--user`` text as the model's raw id type (ints stay ints)."""
    kind = id_map.raw_ids.dtype.kind
    for convert, kinds in ((int, "iu"), (float, "f")):
        if kind in kinds:
            try:
                return convert(text)
            except ValueError:
                return text
    return text


def cmd_recommend(args) -> None:
    model = _load_model(args.model)
    if model.user_map is None or model.item_map is None:
        raise CliError("the model holds no id maps; train it with `fastmf train` or fit()")
    raw = _raw_user(args.user, model.user_map)
    known = bool(model.user_map.lookup(np.asarray([raw]))[0] >= 0)
    seen = None
    if args.train:
        seen = _model_space(model, load_data(args.train, **_data_args(args), rating_col=None,
                                             time_col=None, what="--train"), "--train")
    elif known:
        _note("seen items are not excluded (the model keeps no training interactions); pass "
              "--train FILE, e.g. the training data, to leave them out")
    with warnings.catch_warnings():
        # The fallback is marked in the output below; the library's warning would repeat it.
        warnings.filterwarnings("ignore", message=r".*unknown raw user id")
        items, scores = model.recommend([raw], k=args.k, raw_ids=True, exclude=seen)
    items, scores = items[0], np.asarray(scores[0], dtype=np.float64)
    real = np.array([item is not None for item in items], dtype=bool)
    items, scores = items[real], scores[real]
    if known:
        print(f"top {args.k} for user {args.user}:")
    else:
        # The cold-start answer ranks by popularity; shown by score like every list.
        order = np.argsort(-scores, kind="stable")
        items, scores = items[order], scores[order]
        basis = ("most popular items" if model.item_popularity is not None else
                 "the model keeps no item popularity counts, so these are its first items "
                 "by index, not the most popular")
        print(f"top {args.k} for user {args.user}: fallback, the user is not in the "
              f"training data: {basis}")
        if isinstance(raw, str) and model.user_map.raw_ids.dtype.kind in "iuf":
            _note(f"user {args.user!r} is not a number, but the model's user ids are "
                  f"{model.user_map.raw_ids.dtype}")
    if len(items) < args.k:
        _note(f"only {len(items)} items to recommend (the model knows {model.num_items}"
              f"{', less the seen ones' if seen is not None and known else ''})")
    titles = model.item_titles or {}
    item_index = model.item_map.lookup(np.asarray(items.tolist()))
    for rank, (item, score) in enumerate(zip(items, scores, strict=True), 1):
        title = titles.get(int(item_index[rank - 1]), "")
        print(f"{rank:3d}. {item!s:>10}  {float(score):6.3f}  {title}")


def cmd_plot(args) -> None:
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        raise CliError("plots need matplotlib and scikit-learn: pip install fastmf[plot]") \
            from None
    from fastmf import plot
    from fastmf.checkpoint import load_checkpoint
    from fastmf.train import History

    space = args.kind in ("pca", "tsne")
    for option, value in (("--color-by", args.color_by), ("--label", args.label),
                          ("--min-count", args.min_count),
                          ("--sample", args.sample is not None),
                          ("--seed", args.seed is not None)):
        if value and not space:
            raise CliError(f"{option} applies to --kind pca and tsne, not {args.kind}")
    args.sample = 2000 if args.sample is None else args.sample
    args.seed = 0 if args.seed is None else args.seed
    if args.data is not None and not args.color_by:
        raise CliError("--data gives the item metadata for --color-by; pass --color-by too")
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {args.out} is a folder; name the image file, e.g. items.png")
    if out.exists() and not args.force:
        raise CliError(f"--out {args.out} exists; pass --force to overwrite it")
    out = plot.check_path(out, "--out")
    if _is_sharded(Path(args.model)):
        from fastmf.distributed.checkpoint import _read_manifest

        model = _load_model(args.model)
        extra = _read_manifest(Path(args.model))[1].get("extra", {})
        extra = extra if isinstance(extra, dict) else {}
    else:
        saved = load_checkpoint(args.model)
        model, extra = saved.model, saved.extra
    if args.kind == "history":
        stored = extra.get("history")
        if stored is None:
            raise CliError(
                f"--model {args.model} holds no training history (`fastmf train --out` and "
                "model.save keep none); checkpoints written by fastmf.fit(..., "
                "checkpoint=DIR) keep it")
        try:
            history = History.from_dict(stored)
        except ValueError as exc:
            raise CliError(f"--model {args.model}: its stored history is not in the format "
                           f"fastmf.fit writes ({exc})") from None
        fig = plot.history(history, out)
    elif args.kind == "popularity":
        fig = plot.popularity_vs_norm(model, out)
    else:
        metadata = None
        if args.data is not None:
            metadata = load_data(args.data, **_data_args(args), rating_col=None,
                                 time_col=None)
        items = None
        if args.min_count:
            if model.item_popularity is None:
                raise CliError(f"--min-count: --model {args.model} keeps no item popularity")
            items = np.flatnonzero(np.asarray(model.item_popularity) >= args.min_count)
            _note(f"--min-count {args.min_count}: {len(items):,} of {model.num_items:,} items")
        pool = model.num_items if items is None else len(items)
        shown = min(args.sample or pool, pool)
        if args.kind == "tsne" and shown > 1000:
            _note(f"t-SNE of {shown:,} items takes a minute or more on a few cores "
                  "(--sample N plots fewer)")
        fig = plot.embeddings(model, args.kind, items=items, color_by=args.color_by,
                              labels=args.label, metadata=metadata,
                              sample=args.sample or None, seed=args.seed, path=out)
    width, height = fig.canvas.get_width_height()
    print(f"saved {out} ({args.kind}, {width}x{height} px)")


def cmd_fetch(args) -> None:
    from fastmf.datasets import fetch_movielens

    print(fetch_movielens(args.name, args.cache_dir, url=args.url, sha256=args.sha256))


def cmd_demo(args) -> None:
    from fastmf.data import random_split
    from fastmf.datasets import synthetic
    from fastmf.evaluate import evaluate
    from fastmf.layers import MF
    from fastmf.metrics import rmse as rmse_of
    from fastmf.ops import available_backends
    from fastmf.train import fit

    start = time.perf_counter()
    data = synthetic(num_users=args.users, num_items=args.items,
                                     num_interactions=args.interactions, dim=8, seed=args.seed)
    train, test = random_split(data, test_fraction=0.2, seed=args.seed)
    print(f"synthetic ratings: {len(data):,} interactions, {data.num_users:,} users, "
          f"{data.num_items:,} items (train {len(train):,} / test {len(test):,})")
    dim = args.dim

    print("\nevery backend, same seed, 2 epochs (they must agree):")
    weights = {}
    for backend in available_backends():
        torch.manual_seed(args.seed)
        model = MF(data.num_users, data.num_items, dim, backend=backend)
        history = fit(model, train, epochs=2, seed=args.seed, progress=False)
        rmse = evaluate(model, test, metrics=("rmse",))["rmse"]
        weights[backend] = model.item_factors.detach().clone()
        diff = (weights[backend] - weights["reference"]).abs().max().item()
        print(f"  {backend:>9}: {np.mean(history['samples_per_s']) / 1e6:7.2f} M samples/s  "
              f"test RMSE {rmse:.4f}  max |Δ weights| vs reference {diff:.1e}")
    worst = max((w - weights["reference"]).abs().max().item() for w in weights.values())
    if worst > 1e-3:
        raise RuntimeError(f"backends disagree: max weight difference {worst:.2e}")

    best = available_backends()[-1]
    print(f"\ntraining biased MF (dim={dim}, backend={best}):")
    torch.manual_seed(args.seed)
    model = MF(data.num_users, data.num_items, dim, backend=best)
    history = fit(model, train, valid=test, seed=args.seed, progress=not args.quiet)
    torch.manual_seed(args.seed)
    biases = MF(data.num_users, data.num_items, 1, backend=best, init_scale=0.0)
    fit(biases, train, seed=args.seed, progress=False)
    mean_rmse = rmse_of(np.full(len(test), train.ratings.mean()), test.ratings)
    results = evaluate(model, test, train=train, k=10,
                              metrics=("rmse", "mae", "hr@10", "ndcg@10", "recall@10",
                                       "coverage", "novelty"))
    print(f"\ntest RMSE: global mean {mean_rmse:.4f} | biases only "
          f"{evaluate(biases, test, metrics=('rmse',))['rmse']:.4f} | "
          f"biased MF {results['rmse']:.4f}")
    _print_metrics("ranking (full catalog, train items excluded)", results)
    print(f"training speed: {np.mean(history['samples_per_s']) / 1e6:.2f} M samples/s")
    user = int(test.users[0])
    items, scores = model.recommend([user], k=10, exclude=train)
    print(f"\ntop 10 for user {user}: " + ", ".join(
        f"{int(i)} ({float(s):.2f})" for i, s in zip(items[0], scores[0], strict=True)))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


# -- entry point -------------------------------------------------------------------------------

_DATA_HELP = (
    "a MovieLens folder (ml-100k ... ml-32m, ml-latest-small; a bare release name that is "
    "no folder here is looked for in ~/.cache/fastmf, see `fastmf fetch`), a MovieLens "
    "ratings file (ratings.csv, ratings.dat, u.data: read as named), a .parquet file, or a "
    "delimited text file (.csv, .tsv, ...; see --sep and --header)")


def _column_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "columns of a text or Parquet file",
        "Columns are matched by their exact names (case and spaces included); a column "
        "differing only in case or spaces is reported, not guessed. MovieLens folders and "
        "files need none of these.")
    g.add_argument("--user-col", default="userId", help="user id column (default: userId)")
    g.add_argument("--item-col", default="movieId", help="item id column (default: movieId)")
    g.add_argument("--rating-col", default="rating",
                   help="rating column (default: rating; required by --loss mse/huber)")
    g.add_argument("--time-col", default="timestamp",
                   help="timestamp column (default: timestamp; optional)")
    g.add_argument("--sep", type=separator, default=None,
                   help="separator of a text file; 'tab', 'comma', 'semicolon', 'pipe' or "
                        "the character. Default: by extension (.csv comma; .tsv, .tab, "
                        ".data tab), else the first of comma, tab, ';', '|' that splits the "
                        "first 20 lines into the same number (>= 2) of fields")
    g.add_argument("--header", choices=["auto", "yes", "no"], default="auto",
                   help="whether the first row names the columns. auto (default): a first "
                        "row made only of numbers is data, anything else a header. With no "
                        "header, columns are taken by position: user, item, then rating and "
                        "timestamp when there are 3 or 4 (MovieLens u.data)")
    g.add_argument("--encoding", default="utf-8",
                   help="text encoding of a text file (default: utf-8; e.g. latin-1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmf", description="Fast matrix-factorization recommenders for PyTorch.",
        epilog="Start with `fastmf demo`; each command has --help. Errors exit with status 2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train on a generated data set with every backend")
    demo.add_argument("--users", type=positive_int, default=6000)
    demo.add_argument("--items", type=positive_int, default=3000)
    demo.add_argument("--interactions", type=positive_int, default=300_000)
    demo.add_argument("--dim", type=positive_int, default=32)
    demo.add_argument("--seed", type=nonnegative_int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    fetch = sub.add_parser(
        "fetch", help="download a MovieLens release into ~/.cache/fastmf (once)",
        description="Download a MovieLens zip, check its SHA-256, unzip it into the cache "
                    "and print the folder. `--data NAME` then finds it by name.")
    fetch.add_argument("name", nargs="?", default="ml-latest-small",
                       help="release: ml-latest-small (default) or ml-100k; others need "
                            "--url and --sha256")
    fetch.add_argument("--cache-dir", default=None, help="default: ~/.cache/fastmf")
    fetch.add_argument("--url", default=None, help="the zip's http(s) address")
    fetch.add_argument("--sha256", default=None, help="the zip's SHA-256 (hex)")
    fetch.set_defaults(run=cmd_fetch)

    train = sub.add_parser(
        "train", help="train a model on a ratings file and save it",
        description="Train on --data; test on a split of it (--split, --test-fraction), on "
                    "--test FILE, or on nothing (--test-fraction 0).")
    train.add_argument("--data", required=True, help=_DATA_HELP)
    train.add_argument("--test", default=None, metavar="FILE",
                       help="a predefined test set (same format and columns); --data is then "
                            "the training set. Test rows with users/items absent from --data "
                            "are skipped, with a note")
    train.add_argument("--model", default="mf", metavar="NAME",
                       help="the model class, lower-cased: mf (default) or any registered "
                            "fastmf.models class (neumf, svdpp, ...)")
    train.add_argument("--model-args", default=None, metavar="JSON",
                       help="the model's constructor arguments as a JSON object, e.g. "
                            "'{\"layers\": [64, 32]}'")
    train.add_argument("--loss", default=None, choices=list(FIT_LOSSES),
                       help="mse/huber: ratings (explicit); bce/bpr (and warp, for models "
                            "that list it, e.g. hybrid): interactions only (implicit, "
                            "ratings ignored). Default: the model's (mf: mse)")
    train.add_argument("--dim", type=positive_int, default=None,
                       help="factors (default: fast.ai's rule of thumb, capped at 128)")
    train.add_argument("--epochs", type=positive_int, default=None)
    train.add_argument("--batch-size", type=positive_int, default=None)
    train.add_argument("--lr", type=positive_float, default=None)
    train.add_argument("--reg", type=nonnegative_float, default=None)
    train.add_argument("--num-negatives", type=positive_int, default=None,
                       help="bce/bpr: sampled negatives per positive (default: the model's, "
                            "else 4)")
    train.add_argument("--negative-distribution", default=None,
                       choices=["uniform", "popularity"],
                       help="bce/bpr: how negatives are drawn (default uniform)")
    train.add_argument("--split", default=None, choices=["random", "loo", "temporal"],
                       help="how to hold out the test set (default: random; loo: one "
                            "interaction per user, the latest if there are timestamps)")
    train.add_argument("--test-fraction", type=fraction, default=None,
                       help="share of the data held out, in [0, 1) (default 0.2); 0 trains on "
                            "all the data with no evaluation")
    train.add_argument("--save-split", default=None, metavar="DIR",
                       help="write the split as DIR/train.csv and DIR/test.csv (raw ids, the "
                            "columns named as read), for `evaluate --train` and `recommend "
                            "--train`; existing files are kept unless --force")
    train.add_argument("--force", action="store_true",
                       help="let --save-split overwrite train.csv/test.csv")
    train.add_argument("--early-stopping", type=positive_int, default=None, metavar="PATIENCE")
    train.add_argument("-k", type=positive_int, default=10,
                       help="cut-off of the ranking metrics")
    train.add_argument("--backend", default="auto",
                       choices=["auto", "native", "numba", "reference"])
    train.add_argument("--device", type=device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda if torch sees a GPU)")
    train.add_argument("--seed", type=nonnegative_int, default=None,
                       help="seeds the split, the initialization and the shuffles (default 0)")
    train.add_argument("--config", default=None, metavar="FILE",
                       help="a JSON file of settings, as `fastmf tune --out FILE` writes: "
                            "loss, dim, epochs, batch_size, lr, reg, seed, num_negatives, "
                            "negative_distribution, and the split tune held out (split, "
                            "test_fraction). Options given on the command line take precedence "
                            "over the file; --test, --split or --test-fraction replace its "
                            "split")
    train.add_argument("--out", default=None,
                       help="checkpoint folder to write; checked before training: its parent "
                            "must exist and be writable, and it must be new, empty or a "
                            "fastmf checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--distributed", action="store_true",
                       help="shard the model's tables over the ranks of `torchrun "
                            "--nproc_per_node=N -m fastmf train --distributed ...` (gloo on "
                            "CPU, NCCL on CUDA); --out then writes a sharded checkpoint")
    _column_options(train)
    train.set_defaults(run=cmd_train)

    tune = sub.add_parser(
        "tune", help="search training settings with Optuna (pip install fastmf[tune])",
        description="Hold out the test set exactly as `fastmf train` does with the same --data, "
                    "--split, --test-fraction and --seed (the defaults agree), then search dim, "
                    "lr, reg, epochs, batch size (and the negatives for bce/bpr) on a "
                    "validation split of the rest; print every trial and the best, and write "
                    "the best settings (with the split) as JSON for `fastmf train --config "
                    "FILE`. The test rows are never used.")
    tune.add_argument("--data", required=True, help=_DATA_HELP)
    tune.add_argument("--loss", default="mse", choices=list(KERNEL_LOSSES))  # tunes MF
    tune.add_argument("--metric", default=None,
                      help="validation metric to optimize (default: rmse for mse/huber, "
                           "ndcg@10 for bce/bpr); lower is better for rmse/mae, higher for "
                           "the others")
    tune.add_argument("--trials", type=positive_int, default=20, help="default 20")
    tune.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                      help="start no trial after this many seconds (a running one finishes)")
    tune.add_argument("--space", type=_space, default=None, metavar="JSON",
                      help="overrides of the search space, e.g. '{\"epochs\": [3, 10], "
                           "\"dim\": 32, \"batch_size\": {\"choices\": [1024, 4096]}}': "
                           "[low, high] a range, a single value fixed, null fit's default")
    tune.add_argument("--valid-fraction", type=_valid_fraction, default=0.1,
                      help="share of each user's training rows used for validation "
                           "(default 0.1)")
    tune.add_argument("--split", default=None, choices=["random", "loo", "temporal"],
                      help="how `fastmf train` will hold out its test set (default: random)")
    tune.add_argument("--test-fraction", type=fraction, default=None,
                      help="share `fastmf train` will hold out (default 0.2); 0 when --data "
                           "is training data only")
    tune.add_argument("--seed", type=nonnegative_int, default=0)
    tune.add_argument("--backend", default="auto",
                      choices=["auto", "native", "numba", "reference"])
    tune.add_argument("--device", type=device, default=None,
                      help="cpu, cuda or cuda:N (default: cuda if torch sees a GPU)")
    tune.add_argument("--out", default=None, metavar="FILE",
                      help="write the best settings here as JSON (checked before tuning)")
    tune.add_argument("--force", action="store_true", help="let --out overwrite a file")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    _column_options(tune)
    tune.set_defaults(run=cmd_tune)

    evaluate = sub.add_parser("evaluate", help="score a saved model on a data set")
    evaluate.add_argument("--model", required=True, help="checkpoint folder")
    evaluate.add_argument("--data", required=True, help="the test set: " + _DATA_HELP)
    evaluate.add_argument("-k", type=positive_int, default=10)
    evaluate.add_argument("--device", type=device, default=None,
                          help="cpu, cuda or cuda:N (default: where it was saved from)")
    evaluate.add_argument("--train", default=None, metavar="FILE",
                          help="the training interactions, left out of the rankings (e.g. "
                               "DIR/train.csv of `train --save-split DIR`)")
    _column_options(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    rec = sub.add_parser(
        "recommend", help="top-k items for a user (raw id)",
        description="Top-k items for a user. A user the model never saw gets the most "
                    "popular training items, marked as a fallback.")
    rec.add_argument("--model", required=True, help="checkpoint folder")
    rec.add_argument("--user", required=True, help="the user's raw id, as in the data")
    rec.add_argument("-k", type=positive_int, default=10)
    rec.add_argument("--train", default=None, metavar="FILE",
                     help="interactions whose items are left out, the user's seen items: "
                          "the training data (a MovieLens folder, DIR/train.csv of `train "
                          "--save-split DIR`, ...). Without it nothing is left out")
    _column_options(rec)
    rec.set_defaults(run=cmd_recommend)

    plot = sub.add_parser(
        "plot", help="draw a saved model: item map, training history, popularity vs norm",
        description="Draw a saved model into an image (needs pip install fastmf[plot]). "
                    "pca/tsne: the item vectors in 2-D; history: loss and validation metrics "
                    "per epoch (checkpoints of fastmf.fit(checkpoint=DIR) keep it); "
                    "popularity: training interactions against vector norm.")
    plot.add_argument("--model", required=True, help="checkpoint folder")
    plot.add_argument("--kind", required=True, choices=["pca", "tsne", "history", "popularity"])
    plot.add_argument("--out", required=True,
                      help="image file; the format follows the extension (.png, .svg, .pdf)")
    plot.add_argument("--force", action="store_true", help="overwrite an existing --out")
    plot.add_argument("--color-by", default=None, metavar="GENRE|COLUMN",
                      help="pca/tsne: highlight a genre (e.g. Animation) or colour by an item "
                           "metadata column, both read from --data; or 'popularity'")
    plot.add_argument("--data", default=None,
                      help="the item metadata for --color-by (genres, titles): " + _DATA_HELP)
    plot.add_argument("--label", type=nonnegative_int, default=0, metavar="N",
                      help="pca/tsne: annotate the N most popular plotted items with their "
                           "titles (default 0)")
    plot.add_argument("--sample", type=nonnegative_int, default=None, metavar="N",
                      help="pca/tsne: plot a random N of the items (default 2000; 0: all)")
    plot.add_argument("--min-count", type=nonnegative_int, default=0, metavar="N",
                      help="pca/tsne: only items with at least N training interactions (rare "
                           "items' vectors are mostly noise)")
    plot.add_argument("--seed", type=nonnegative_int, default=None,
                      help="pca/tsne: the seed of the sample and of t-SNE (default 0)")
    _column_options(plot)
    plot.set_defaults(run=cmd_plot)
    return parser


_HEADER = {"auto": None, "yes": True, "no": False}


# The commands that train (and so allocate and free the same tensors every step).
TRAINING_COMMANDS = ("train", "tune", "demo")


def main(argv=None) -> int:
    from fastmf.checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if hasattr(args, "header"):
        args.header = _HEADER[args.header]
    if args.command in TRAINING_COMMANDS and os.environ.get("FASTMF_KEEP_FREED_MEMORY") != "0":
        # This process is ours and trains: keep freed memory for the next step instead of
        # faulting it in again (fastmf.memory.keep_freed_memory; a NeuMF epoch about 15 %
        # faster on a 2-core VM).
        from fastmf.memory import keep_freed_memory

        keep_freed_memory()
    try:
        args.run(args)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ImportError,
            FloatingPointError, CheckpointError, CliError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fastmf {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("FASTMF_TRACEBACK"):
            raise
        print(f"fastmf {args.command}: unexpected error: {type(exc).__name__}: {exc} "
              "(FASTMF_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
