"""Neural collaborative filtering on MovieLens ml-latest-small, the NCF paper's protocol.

    python benchmarks/ncf.py [--data PATH] [--threads N] [--epochs-scale F] [--json OUT]
    python benchmarks/ncf.py --tune     # the inner-validation runs that chose the defaults
    python benchmarks/ncf.py --speed 9  # epoch times only: NeuMF, MLP, textbook, alternated

Protocol (He et al. 2017): every rating is a positive; each user's latest interaction is
the test item (``fastmf.data.leave_one_out(by="time")``); it is ranked among 99 items the
user never interacted with (sampled once, seed 0); HR@10 and NDCG@10 by
``fastmf.metrics.sampled_rank_metrics`` (ties count against the model).

Rows: fastmf MF (BPR and BCE, ``fastmf.fit``), fastmf GMF, MLP, NeuMF (from scratch and
from pretrained GMF + MLP, alpha 0.5), and a textbook PyTorch NeuMF trained the paper's
way (nn.Embedding tables, one torch.optim.Adam over everything, lr 0.001, batch 256,
4 negatives per positive, BCE) in the same harness: same split, negatives sampler and
evaluation. Epoch times: wall clock and process CPU seconds (the machine is shared, CPU
time is the steadier one), median over the epochs.

How fastmf's NCF defaults (``defaults`` on the classes) were chosen (``--tune``): on
inner validation splits only, never on the reported test rows: the training part of the
split above is split again by leave-one-out by time (each user's latest training
interaction is the validation item, with its own 99 sampled negatives), on three
differently shaped sets: all users; the users with the most ratings (top half, long
histories); the users with the fewest ratings (bottom half, short histories). A small grid
over the table optimizer, learning rate and batch size; the epoch count is the one whose
validation HR@10 summed over the three sets is best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import fastmf  # noqa: E402
from fastmf.data import Interactions, NegativeSampler, leave_one_out  # noqa: E402
from fastmf.data.sampling import sample_negatives  # noqa: E402
from fastmf.memory import keep_freed_memory  # noqa: E402
from fastmf.metrics import sampled_rank_metrics  # noqa: E402
from fastmf.models.base import Batch  # noqa: E402
from fastmf.models.ncf import GMF, MLP, NeuMF  # noqa: E402

HERE = Path(__file__).resolve()
DATA_CANDIDATES = (Path("/work/shared/data/ml-latest-small"),
                   HERE.parents[2] / "shared" / "data" / "ml-latest-small",
                   HERE.parents[1] / "shared" / "data" / "ml-latest-small")
SEED = 0
K = 10
NUM_TEST_NEGATIVES = 99
NUM_NEGATIVES = 4


def ncf_optimizer(model, table_optimizer: str, lr: float, dense_lr: float):
    model.dense_lr = dense_lr
    return model.make_optimizer(table_optimizer, lr)


class Textbook(nn.Module):
    """The paper's NeuMF in plain PyTorch (its reference code's init)."""

    def __init__(self, num_users, num_items, gmf_dim=8, layers=(64, 32, 16, 8)):
        super().__init__()
        half = layers[0] // 2
        self.gmf_u, self.gmf_i = nn.Embedding(num_users, gmf_dim), nn.Embedding(num_items,
                                                                                 gmf_dim)
        self.mlp_u, self.mlp_i = nn.Embedding(num_users, half), nn.Embedding(num_items, half)
        for table in (self.gmf_u, self.gmf_i, self.mlp_u, self.mlp_i):
            nn.init.normal_(table.weight, std=0.01)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        for layer in self.hidden:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.out = nn.Linear(gmf_dim + layers[-1], 1)
        nn.init.kaiming_uniform_(self.out.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.out.bias)

    def forward(self, users, items):
        z = torch.cat([self.mlp_u(users), self.mlp_i(items)], -1)
        for layer in self.hidden:
            z = torch.relu(layer(z))
        gmf = self.gmf_u(users) * self.gmf_i(items)
        return self.out(torch.cat([gmf, z], -1)).squeeze(-1)

    def training_step(self, batch, optimizer, *, loss, reg):
        n = batch.negatives.shape[1]
        users = torch.cat([batch.users, batch.users.repeat_interleave(n)])
        items = torch.cat([batch.items, batch.negatives.reshape(-1)])
        labels = torch.zeros(len(users))
        labels[:len(batch.users)] = 1.0
        value = F.binary_cross_entropy_with_logits(self(users, items), labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        return value.detach(), len(users)


# -- data --------------------------------------------------------------------

class Split:
    """A train part and its held-out items, each ranked among 99 sampled negatives."""

    def __init__(self, data: Interactions, train: Interactions, test: Interactions):
        self.train = train
        self.users = torch.as_tensor(test.users)
        self.items = torch.as_tensor(test.items)
        # Never a positive of the user anywhere in ``data`` (train or held out).
        self.negatives = torch.as_tensor(sample_negatives(
            data, test.users, NUM_TEST_NEGATIVES, replace=False, seed=SEED))

    def evaluate(self, score) -> dict[str, float]:
        """``score(users (N,), items (N,)) -> (N,)``: HR/NDCG@10 of the held-out items."""
        with torch.no_grad():
            pos = score(self.users, self.items)
            n = self.negatives.shape[1]
            neg = score(self.users.repeat_interleave(n), self.negatives.reshape(-1))
        out = sampled_rank_metrics(pos.double().numpy(), neg.double().reshape(-1, n).numpy(),
                                   k=K)
        return {"hr@10": out["hr@10"], "ndcg@10": out["ndcg@10"]}


def load(path: Path) -> Interactions:
    data = fastmf.datasets.load_movielens(path)
    return Interactions(data.users, data.items, timestamps=data.timestamps,
                        user_map=data.user_map, item_map=data.item_map)


def outer_split(data: Interactions) -> Split:
    train, test = leave_one_out(data, by="time")
    return Split(data, train, test)


def inner_splits(train: Interactions) -> dict[str, Split]:
    """Validation splits inside ``train`` (never the test rows): all users, the half of the
    users with the most interactions, the half with the fewest."""
    counts = np.bincount(train.users, minlength=train.num_users)
    active = counts > 0
    median = np.median(counts[active])
    sets = {"all": train,
            "heavy": train.subset(counts[train.users] > median),
            "light": train.subset(counts[train.users] <= median)}
    out = {}
    for name, part in sets.items():
        inner_train, valid = leave_one_out(part, by="time")
        out[name] = Split(part, inner_train, valid)
    return out


# -- training --------------------------------------------------------------------

def _times():
    return time.perf_counter(), time.process_time()


def train_epochs(model, optimizer, train: Interactions, *, epochs, batch_size, loss="bce",
                 reg=0.0, num_negatives=NUM_NEGATIVES, seed=SEED, on_epoch=None):
    """Shuffled positives, uniform negatives from fastmf's sampler, one training step per
    batch; returns the (wall, cpu) seconds of every epoch."""
    sampler = NegativeSampler(train)
    users, items, _ = train.to_torch()
    n = len(train)
    times = []
    for epoch in range(epochs):
        model.train()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        u_all, i_all = users[order], items[order]
        wall, cpu = _times()
        for b, lo in enumerate(range(0, n, batch_size)):
            u, i = u_all[lo:lo + batch_size], i_all[lo:lo + batch_size]
            neg = sampler.sample(u, num_negatives, seed=(seed * 1000 + epoch) * 100_000 + b)
            model.training_step(Batch(u, i, negatives=neg), optimizer, loss=loss, reg=reg)
        wall2, cpu2 = _times()
        times.append((wall2 - wall, cpu2 - cpu))
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch)
    return times


def ncf_model(kind: str, train: Interactions, **knobs):
    cls = {"gmf": GMF, "mlp": MLP, "neumf": NeuMF}[kind]
    return cls(train.num_users, train.num_items, **knobs)


def run_ncf(model, split: Split, settings: dict, *, track=False):
    """Train with ``settings`` (table_optimizer, lr, dense_lr, batch_size, epochs); returns
    (final metrics, epoch times, per-epoch metrics when ``track``)."""
    optimizer = ncf_optimizer(model, settings["table_optimizer"], settings["lr"],
                              settings["dense_lr"])
    curve = []
    hook = (lambda _: curve.append(split.evaluate(model))) if track else None
    times = train_epochs(model, optimizer, split.train, epochs=settings["epochs"],
                         batch_size=settings["batch_size"], reg=settings.get("reg", 0.0),
                         on_epoch=hook)
    return split.evaluate(model), times, curve


# -- tuning on inner validation --------------------------------------------------------------------

GRID = [
    # (table optimizer, lr of the tables, lr of the dense layers, batch size); the paper's
    # own settings (adam, 0.001, batch 256) are a reported row, too slow to be the default
    ("adam", 0.002, 0.002, 2048),
    ("adam", 0.005, 0.005, 2048),
    ("adam", 0.01, 0.005, 4096),
    ("adagrad", 0.05, 0.005, 2048),
]
TUNE_EPOCHS = 20


def tune(data: Interactions, models=("gmf", "mlp", "neumf")):
    split = outer_split(data)
    inner = inner_splits(split.train)  # built from the training part only
    results = []
    for kind in models:
        for opt, lr, dense_lr, batch in GRID:
            settings = dict(table_optimizer=opt, lr=lr, dense_lr=dense_lr, batch_size=batch,
                            epochs=TUNE_EPOCHS)
            curves = {}
            for name, part in inner.items():
                torch.manual_seed(SEED)
                _, _, curve = run_ncf(ncf_model(kind, part.train), part, settings, track=True)
                curves[name] = [c["hr@10"] for c in curve]
            total = np.sum([curves[name] for name in inner], axis=0)
            best = int(np.argmax(total))
            row = dict(model=kind, optimizer=opt, lr=lr, dense_lr=dense_lr, batch_size=batch,
                       best_epochs=best + 1,
                       **{f"hr@10 {name}": curves[name][best] for name in inner})
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


# -- the reported rows --------------------------------------------------------------------

def mf_row(split: Split, loss: str, dim: int):
    model = fastmf.MF(split.train.num_users, split.train.num_items, dim=dim)
    wall, cpu = _times()
    history = fastmf.fit(model, split.train, loss=loss, seed=SEED, progress=False)
    wall2, cpu2 = _times()
    epochs = len(history)
    metrics = split.evaluate(model.predict)
    return dict(metrics, epoch_wall=(wall2 - wall) / epochs, epoch_cpu=(cpu2 - cpu) / epochs,
                epochs=epochs)


def ncf_row(model, split: Split, settings: dict):
    metrics, times, _ = run_ncf(model, split, settings)
    return dict(metrics, epoch_wall=statistics.median(t[0] for t in times),
                epoch_cpu=statistics.median(t[1] for t in times), epochs=len(times))


def textbook_row(split: Split, epochs: int):
    model = Textbook(split.train.num_users, split.train.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    times = train_epochs(model, optimizer, split.train, epochs=epochs, batch_size=256)
    metrics = split.evaluate(model)
    return dict(metrics, epoch_wall=statistics.median(t[0] for t in times),
                epoch_cpu=statistics.median(t[1] for t in times), epochs=len(times))


def settings_of(cls, scale: float) -> dict:
    """The class's defaults as the harness's settings (Adam on the tables: make_optimizer's
    default for these models)."""
    defaults = cls.defaults["implicit"]
    return dict(table_optimizer="adam", lr=defaults["lr"], dense_lr=cls.dense_lr,
                batch_size=defaults["batch_size"], reg=defaults["reg"],
                epochs=max(1, round(defaults["epochs"] * scale)))


def speed(split: Split, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Epoch wall and CPU seconds of fastmf NeuMF and MLP (their defaults) and the textbook
    NeuMF (batch 256). Each model is built once and trained one warm-up epoch; then every
    round trains one epoch of each, alternated, so the epochs a ratio compares ran seconds
    apart (a shared machine's load drifts over minutes: the textbook epoch alone moved
    between 1.15 and 1.7 s in one hour). Prints the medians, and the median over the rounds
    of each round's textbook / NeuMF ratio. With one thread CPU time is the steadier figure;
    with more, wall time is the one that counts (CPU time also counts the threads' spinning
    at every parallel region's end)."""
    kinds = ("neumf", "mlp", "textbook")
    times: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in kinds},
                                               "cpu": {k: [] for k in kinds}}
    runs = {}
    for kind in kinds:
        torch.manual_seed(SEED)
        if kind == "textbook":
            model = Textbook(split.train.num_users, split.train.num_items)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
            batch_size = 256
        else:
            model = ncf_model(kind, split.train)
            settings = settings_of(type(model), 1.0)
            optimizer = ncf_optimizer(model, settings["table_optimizer"], settings["lr"],
                                      settings["dense_lr"])
            batch_size = settings["batch_size"]
        train_epochs(model, optimizer, split.train, epochs=1, batch_size=batch_size)
        runs[kind] = (model, optimizer, batch_size)
    for r in range(rounds):
        for kind, (model, optimizer, batch_size) in runs.items():
            (wall, cpu), = train_epochs(model, optimizer, split.train, epochs=1,
                                        batch_size=batch_size, seed=SEED + 1 + r)
            times["wall"][kind].append(wall)
            times["cpu"][kind].append(cpu)
    for clock, values in times.items():
        medians = {kind: statistics.median(v) for kind, v in values.items()}
        for kind, value in medians.items():
            print(f"{kind:<9} median epoch {value:.3f} s {clock} over {len(values[kind])} "
                  f"epochs (min {min(values[kind]):.3f}, max {max(values[kind]):.3f})")
        paired = [t / n for t, n in zip(values["textbook"], values["neumf"], strict=True)]
        print(f"{clock}: textbook / NeuMF {medians['textbook'] / medians['neumf']:.2f}x "
              f"(median of the rounds' ratios {statistics.median(paired):.2f}x, range "
              f"{min(paired):.2f}-{max(paired):.2f}); textbook / MLP "
              f"{medians['textbook'] / medians['mlp']:.2f}x")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                        help="only time epochs (NeuMF, MLP, textbook): ROUNDS rounds of one epoch "
                        "each, alternated")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply every model's epochs (a smoke run: 0.1)")
    parser.add_argument("--textbook-epochs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: fastmf.memory.keep_freed_memory() for the whole process "
                        "(every model alike, as fastmf train does); default: glibc's own "
                        "thresholds")
    args = parser.parse_args(argv)
    if args.malloc == "keep":
        keep_freed_memory()
    path = args.data or next((p for p in DATA_CANDIDATES if p.exists()), None)
    if path is None or not path.exists():
        print(f"ncf.py: no ml-latest-small folder (looked in {DATA_CANDIDATES}); skipping")
        return 0
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    data = load(path)
    print(f"{len(data)} interactions, {data.num_users} users x {data.num_items} items; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor()}, "
          f"malloc {args.malloc}",
          flush=True)
    if args.tune:
        results = tune(data)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0

    split = outer_split(data)
    if args.speed:
        times = speed(split, args.speed)
        if args.json:
            args.json.write_text(json.dumps(times, indent=1))
        return 0
    rows = {}

    def report(name, row):
        rows[name] = row
        print(f"{name:<34} HR@10 {row['hr@10']:.4f}  NDCG@10 {row['ndcg@10']:.4f}  "
              f"epoch {row['epoch_wall']:.2f} s wall / {row['epoch_cpu']:.2f} s CPU  "
              f"({row['epochs']} epochs)", flush=True)

    for loss in ("bpr", "bce"):
        for dim in (8, 64):
            torch.manual_seed(SEED)
            report(f"fastmf MF {loss.upper()} dim {dim}", mf_row(split, loss, dim))
    towers = {}
    for kind, cls in (("gmf", GMF), ("mlp", MLP), ("neumf", NeuMF)):
        torch.manual_seed(SEED)
        model = ncf_model(kind, split.train)
        report(f"fastmf {cls.__name__}", ncf_row(model, split, settings_of(cls, args.epochs_scale)))
        towers[kind] = model
    pretrained = NeuMF.from_pretrained(towers["gmf"], towers["mlp"], alpha=0.5)
    settings = settings_of(NeuMF, args.epochs_scale)
    # The paper fine-tunes the pretrained NeuMF with plain SGD; here with the same optimizer
    # as from scratch, at a tenth of the learning rate (keeps the towers' solution).
    settings.update(lr=settings["lr"] / 10, dense_lr=settings["dense_lr"] / 10)
    report("fastmf NeuMF pretrained", ncf_row(pretrained, split, settings))
    torch.manual_seed(SEED)
    report("textbook NeuMF (paper's training)",
           textbook_row(split, max(1, round(args.textbook_epochs * args.epochs_scale))))
    torch.manual_seed(SEED)
    paper = dict(table_optimizer="adam", lr=0.001, dense_lr=0.001, batch_size=256,
                 epochs=max(1, round(args.textbook_epochs * args.epochs_scale)))
    report("fastmf NeuMF, paper's settings", ncf_row(ncf_model("neumf", split.train),
                                                     split, paper))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
