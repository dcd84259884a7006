"""fastmf.distributed: sharded training on gloo, 2 (and 3) ranks against one process.

The workers run in spawned processes (one spawn per world size, every scenario inside it,
since starting a process and importing torch is most of the cost on a small CI machine);
each writes its local shards and results to a file, and the tests compare them here with
single-process runs on the same global batches. Every spawn has a deadline: a hung
collective kills the workers and fails the test instead of hanging CI."""

from __future__ import annotations

import os
import shutil
import socket
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import fastmf
from fastmf.distributed import routing

TOL = 1e-6
NUM_USERS, NUM_ITEMS, K = 37, 23, 8
STEPS = 4
BATCH = 63  # odd: the two ranks' slices differ in size


# -- helpers shared by the workers and the single-process references -----------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(seed: int, num_users=NUM_USERS, num_items=NUM_ITEMS, batch=BATCH, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        # A skewed draw so that rows repeat within and across the ranks' slices.
        u = (torch.rand(batch, generator=gen).pow(2) * num_users).long()
        i = (torch.rand(batch, generator=gen).pow(2) * num_items).long()
        j = torch.randint(0, num_items, (batch,), generator=gen)
        r = torch.rand(batch, generator=gen) * 4 + 1
        out.append((u, i, j, r))
    return out


def _mf(seed: int) -> fastmf.MF:
    torch.manual_seed(seed)
    model = fastmf.MF(NUM_USERS, NUM_ITEMS, dim=K, global_mean=3.0)
    with torch.no_grad():  # non-zero biases so their gradients and updates matter
        model.user_bias.uniform_(-0.1, 0.1)
        model.item_bias.uniform_(-0.1, 0.1)
    return model


MF_CASES = {
    "mse_adagrad": dict(loss="mse", opt=dict(rowwise=False)),
    "mse_rowwise_adagrad": dict(loss="mse", opt=dict(rowwise=True)),
    "huber_sgd": dict(loss="huber", opt=None),
    "bpr_adagrad": dict(loss="bpr", opt=dict(rowwise=False)),
}


# Rank 0's batch in the empty-rank case: even user and item ids only.
EMPTY_RANK_BATCH = (torch.tensor([0, 2, 4, 2]), torch.tensor([2, 0, 4, 6]),
                    torch.tensor([4.0, 3.0, 5.0, 1.0]))


def _mf_optimizer(params, case):
    if case["opt"] is None:
        return fastmf.optim.SparseSGD(params, lr=0.1)
    return fastmf.optim.SparseAdagrad(params, lr=0.05, **case["opt"])


def _run_mf(model, opt, case, part=slice(None), sharded=False):
    losses = []
    for u, i, j, r in _batches(11):
        if sharded:
            if case["loss"] == "bpr":
                value = model.train_step_pairwise(opt, u[part], i[part], j[part], reg=0.02)
            else:
                value = model.train_step(opt, u[part], i[part], r[part], loss=case["loss"],
                                         reg=0.02)
        elif case["loss"] == "bpr":
            value = fastmf.train_step_pairwise(model, opt, u, i, j, reg=0.02)
        else:
            value = fastmf.train_step(model, opt, u, i, r, loss=case["loss"], reg=0.02)
        losses.append(float(value))
    return losses


class BagModel(torch.nn.Module):
    """Two bag tables (mean pooling; sum with per-sample weights) read by a fixed head."""

    def __init__(self):
        super().__init__()
        self.mean_bag = fastmf.nn.EmbeddingBag(41, 6, mode="mean")
        self.sum_bag = fastmf.nn.EmbeddingBag(29, 6, mode="sum")

    def forward(self, a, b, weights):
        return (self.mean_bag(a) * self.sum_bag(b, per_sample_weights=weights)).sum(1)


def _bag_batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 41, (BATCH, 3), generator=gen),
             torch.randint(0, 29, (BATCH, 4), generator=gen),
             torch.rand(BATCH, 4, generator=gen), torch.randn(BATCH, generator=gen))
            for _ in range(STEPS)]


class TwoTower(torch.nn.Module):
    """A NeuMF-like model: user and item embeddings concatenated into an MLP."""

    def __init__(self):
        super().__init__()
        self.users = fastmf.nn.Embedding(NUM_USERS, K)
        self.items = fastmf.nn.Embedding(NUM_ITEMS, K)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * K, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))

    def forward(self, u, i):
        return self.mlp(torch.cat([self.users(u), self.items(i)], 1)).squeeze(1)


def _run_autograd(model, sparse_opt, dense_opt, kind, part=slice(None), group=None,
                  sync=None):
    for step in range(STEPS):
        if kind == "bag":
            a, b, w, y = _bag_batches()[step]
            pred = model(a[part], b[part], w[part])
            loss = (pred - y[part]).pow(2).sum() / BATCH
        else:
            u, i, _, r = _batches(13)[step]
            pred = model(u[part], i[part])
            label = (r[part] > 3).to(pred.dtype)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                pred, label, reduction="sum") / BATCH
        loss.backward()
        if sync is not None:
            sync(model, group)
        sparse_opt.step()
        sparse_opt.zero_grad()
        if dense_opt is not None:
            dense_opt.step()
            dense_opt.zero_grad()


def _fit_data(implicit: bool):
    from fastmf.data import random_split

    data = fastmf.datasets.synthetic(num_users=NUM_USERS, num_items=NUM_ITEMS,
                                     num_interactions=400, implicit=implicit, seed=4)
    return random_split(data, 0.2, seed=0)


# lr and reg fixed here, so the 1e-6 agreement does not move with fit's defaults.
FIT_MF = dict(loss="mse", batch_size=BATCH, seed=3, early_stopping=5, progress=False, lr=0.1,
              reg=0.1)
# reg > 0: the sharded tables' lookups must be penalised like the unsharded ones.
FIT_NEUMF = dict(loss="bce", batch_size=BATCH, seed=5, num_negatives=2, lr=0.01, reg=0.01,
                 metrics=("ndcg@5", "hr@5"), k=5, progress=False)


def _neumf():
    torch.manual_seed(6)
    return fastmf.models.NeuMF(NUM_USERS, NUM_ITEMS, gmf_dim=4, layers=(8, 6, 4))


def _rows(history) -> list[dict]:
    """History rows without the timings (the only per-process part)."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in history.epochs]


def _fit_workers(rank: int, ckpt: Path) -> dict:
    """fastmf.fit on 2 ranks: MF (sharded by the caller, checkpointed, resumed) and NeuMF
    (distributed=True: tables sharded, layers data-parallel under torch Adam)."""
    import fastmf.distributed as fd

    res: dict = {}
    train, valid = _fit_data(False)
    model = fd.shard(_mf(1))
    history = fastmf.fit(model, train, valid=valid, epochs=2, checkpoint=ckpt / "fit_mf",
                         **FIT_MF)
    res["fit_mf"] = (_local_state(model), _rows(history))
    # Resume the 2-epoch checkpoint for a third epoch: a straight 3-epoch run's weights.
    model = fd.shard(_mf(50))
    history = fastmf.fit(model, train, valid=valid, epochs=3, checkpoint=ckpt / "fit_mf",
                         resume=True, **FIT_MF)
    res["fit_mf_resumed"] = (_local_state(model), _rows(history))
    # Resumed once more with another learning rate: the main rank warns, naming it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fd.shard(_mf(50))
        fastmf.fit(model, train, valid=valid, epochs=4, checkpoint=ckpt / "fit_mf",
                   resume=True, **dict(FIT_MF, lr=0.2))
    res["fit_mf_other_run"] = [str(w.message) for w in caught
                               if "other settings" in str(w.message)]
    res["fit_mf_other_lr"] = _local_state(model)
    # A rowwise change is refused on every rank, as one process refuses it.
    res["fit_mf_other_rowwise"] = _error(lambda: fastmf.fit(
        fd.shard(_mf(50)), train, valid=valid, epochs=5, checkpoint=ckpt / "fit_mf",
        resume=True, optimizer="rowwise_adagrad", **FIT_MF))
    try:
        fastmf.fit(fd.shard(_mf(1)), train, epochs=1, checkpoint=ckpt / "plain",
                   progress=False)
        res["fit_bad_target"] = "no error"
    except ValueError as exc:
        res["fit_bad_target"] = str(exc)
    res.update(_fit_fixes(rank, ckpt, train))

    res["cli"] = _cli_worker(rank, ckpt)

    train, _ = _fit_data(True)
    model = fd.shard(_mf(1))
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    losses = fd.fit_sharded(model, opt, torch.from_numpy(train.users),
                            torch.from_numpy(train.items), loss="bpr", epochs=2,
                            batch_size=BATCH, reg=0.01, seed=2)
    res["fit_sharded"] = (_local_state(model, [opt]), losses)

    train, valid = _fit_data(True)
    model = _neumf()
    history = fastmf.fit(model, train, valid=valid, epochs=2, distributed=True, **FIT_NEUMF)
    assert history.model is model  # NeuMF's tables are sharded in place
    res["fit_neumf"] = (_local_state(model), _rows(history))
    return res


# Weighted interactions and seed=None, each one epoch on 2 ranks against one process.
FIT_WEIGHTED = dict(batch_size=BATCH, seed=7, epochs=1, progress=False, lr=0.1, reg=0.1,
                    num_negatives=2)
SEED_NONE_ENTROPY = (12345, 999)  # what each rank's SeedSequence draws: rank 0's wins


def _weighted(train):
    return train.with_weights(np.linspace(0.1, 3.0, len(train)))


def _error(fn) -> tuple:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test compares type and text
        return type(exc).__name__, str(exc), getattr(exc, "errno", None)
    return ("no error",)


def _fit_fixes(rank: int, ckpt: Path, train) -> dict:
    """fit with weights and with seed=None; a checkpoint path that rank 0's checks refuse
    (a name too long, a parent that is a file) and a save that rank 0 cannot prepare: the
    same error on every rank, before training."""
    from types import SimpleNamespace

    import fastmf.distributed as fd

    res: dict = {}
    for loss in ("mse", "bpr", "bce"):
        model = fd.shard(_mf(1))
        history = fastmf.fit(model, _weighted(train), loss=loss, **FIT_WEIGHTED)
        res[f"fit_weighted_{loss}"] = (_local_state(model), _rows(history))
    real = np.random.SeedSequence
    np.random.SeedSequence = lambda *a, **k: (real(*a, **k) if a or k else SimpleNamespace(
        entropy=SEED_NONE_ENTROPY[rank]))  # fit's draw for seed=None, rank by rank
    try:
        model = fd.shard(_mf(1))
        history = fastmf.fit(model, train, loss="mse", **dict(FIT_WEIGHTED, seed=None))
    finally:
        np.random.SeedSequence = real
    res["fit_seed_none"] = (_local_state(model), _rows(history))
    under_a_file = ckpt / "plain" / "notes.txt" / "ck"
    for key, target in (("long", ckpt / ("x" * 300)), ("under_a_file", under_a_file)):
        res[f"fit_target_{key}"] = _error(lambda t=target: fastmf.fit(
            fd.shard(_mf(1)), train, epochs=1, checkpoint=t, progress=False))
    res["save_under_a_file"] = _error(lambda: fd.save(under_a_file, fd.shard(_mf(1))))
    res.update(_fit_agreement(rank, ckpt, train))
    return res


def _fit_agreement(rank: int, ckpt: Path, train) -> dict:
    """A rank with other data or settings, or data its model cannot hold: the same error
    on every rank, before training; and a model sharded over a 1-rank group of its own."""
    import torch.distributed as dist

    import fastmf.distributed as fd

    res: dict = {}
    users = train.users.copy()
    if rank == 1:
        users[5] = NUM_USERS + 10  # out of the model's range, on rank 1 only
    bad = fastmf.data.Interactions.from_arrays(users, train.items, train.ratings)
    res["agree_bad_id"] = _error(lambda: fastmf.fit(fd.shard(_mf(1)), bad, epochs=1,
                                                    progress=False))
    other = fastmf.datasets.synthetic(num_users=NUM_USERS, num_items=NUM_ITEMS,
                                      num_interactions=len(train), seed=4 + rank)
    res["agree_data"] = _error(lambda: fastmf.fit(fd.shard(_mf(1)), other, epochs=1,
                                                  progress=False))
    res["agree_lr"] = _error(lambda: fastmf.fit(
        fd.shard(_mf(1)), train, **dict(FIT_WEIGHTED, lr=0.1 * (rank + 1))))
    res["agree_optimizer"] = _error(lambda: fastmf.fit(
        fd.shard(_mf(1)), train, optimizer=("adagrad", "sgd")[rank], **FIT_WEIGHTED))
    # Each rank's own 1-rank group: two independent runs, each as one process.
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    train, valid = _fit_data(False)
    model = fd.shard(_mf(1), process_group=groups[rank])
    history = fastmf.fit(model, train, valid=valid, epochs=2,
                         checkpoint=ckpt / f"fit_mf_group{rank}", **FIT_MF)
    res["fit_mf_own_group"] = (_local_state(model), _rows(history))
    return res


def _cli_args(data: Path, *extra) -> list[str]:
    return ["train", "--data", str(data), "--user-col", "user", "--item-col", "item",
            "--dim", "4", "--epochs", "2", "--seed", "1", "--quiet", *extra]


def _write_ratings(path: Path) -> Path:
    fastmf.datasets.synthetic(num_users=NUM_USERS, num_items=NUM_ITEMS, num_interactions=400,
                              seed=8).to_pandas().to_csv(path, index=False)
    return path


def _cli_worker(rank: int, ckpt: Path):
    """``fastmf train --distributed`` in the workers' process group: its printout (rank 0
    only) and the sharded checkpoint it wrote, loaded back."""
    import contextlib
    import io

    import fastmf.distributed as fd
    from fastmf.cli import main

    data = _write_ratings(ckpt / f"ratings-{rank}.csv")  # one file per rank: no race
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(_cli_args(data, "--distributed", "--out", str(ckpt / "cli")))
    from fastmf.distributed.checkpoint import _read_manifest

    config = dict(_read_manifest(ckpt / "cli")[1]["extra"]["model"])
    config["dtype"] = getattr(torch, config["dtype"])
    model = fd.shard(fastmf.MF(**config))
    extra = fd.load(ckpt / "cli", model)
    return code, printed.getvalue(), _local_state(model), extra


def _local_state(model, optimizers=()):
    """Every parameter (shards marked by their global row count) and optimizer state."""
    from fastmf.distributed import is_sharded

    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.detach().clone(), p.fastmf_shard.num_rows if is_sharded(p) else None)
    for k, opt in enumerate(optimizers):
        for name, p in model.named_parameters():
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1:
                    rows = p.fastmf_shard.num_rows if is_sharded(p) else None
                    out[f"optim{k}/{name}/{key}"] = (value.clone(), rows)
    return out


def _assemble(parts: list[dict]) -> dict:
    """Full tensors from every rank's local state (modulo map)."""
    world = len(parts)
    out = {}
    for name, (value, rows) in parts[0].items():
        if rows is None:
            out[name] = value
            continue
        full = value.new_empty((rows, *value.shape[1:]))
        for rank, part in enumerate(parts):
            full[rank::world] = part[name][0]
        out[name] = full
    return out


def _full_state(model, optimizers=()):
    return {k: v for k, (v, _) in _local_state(model, optimizers).items()}


# -- the workers ---------------------------------------------------------------------------

def _worker_two(rank: int, world: int, ckpt: Path) -> dict:
    import torch.distributed as dist

    import fastmf.distributed as fd
    from fastmf.distributed import checkpoint as dckpt

    res: dict = {}
    part = fd.local_slice(BATCH)
    for name, case in MF_CASES.items():
        model = fd.shard(_mf(1))
        opt = _mf_optimizer(model.parameters(), case)
        losses = _run_mf(model, opt, case, part, sharded=True)
        res[f"mf/{name}"] = (_local_state(model, [opt]), losses)
    res["mf_forward"] = model(_batches(3)[0][0][part], _batches(3)[0][1][part]).detach()

    torch.manual_seed(2)
    bags = fd.shard(BagModel())
    opt = fastmf.optim.SparseAdam(bags.parameters(), lr=0.01)
    _run_autograd(bags, opt, None, "bag", part)
    res["bag"] = _local_state(bags, [opt])

    torch.manual_seed(3)
    tower = fd.shard(TwoTower())
    sparse = fastmf.optim.SparseAdagrad([tower.users.weight, tower.items.weight], lr=0.05)
    dense = torch.optim.Adam(tower.mlp.parameters(), lr=0.01)
    _run_autograd(tower, sparse, dense, "tower", part, None, fd.sync_dense_grads)
    res["tower"] = _local_state(tower, [sparse, dense])

    # Checkpoints: save at world 2, then a failed save leaves it loadable.
    model = fd.shard(_mf(1))
    opt = _mf_optimizer(model.parameters(), MF_CASES["mse_adagrad"])
    _run_mf(model, opt, MF_CASES["mse_adagrad"], part, sharded=True)
    fd.save(ckpt / "w2", model, [opt], extra={"note": "two"})
    res["saved_w2"] = _local_state(model, [opt])
    original = dckpt._write_shard
    if rank == 1:
        def broken(file, tensors):
            file.write_bytes(b"partial")  # a shard cut short, then the failure
            raise OSError("disk full (simulated)")
        dckpt._write_shard = broken
    with torch.no_grad():
        model.user_factors.add_(1.0)
    try:
        fd.save(ckpt / "w2", model, [opt])
        res["failed_save"] = "no error"
    except (OSError, RuntimeError) as exc:
        res["failed_save"] = f"{type(exc).__name__}: {exc}"
    dckpt._write_shard = original
    # A crash leftover (a temporary folder that never committed) must not matter either.
    if rank == 0:
        (ckpt / "w2" / ".tmp-deadbeef").mkdir()
        (ckpt / "w2" / ".tmp-deadbeef" / "manifest.json").write_text("{broken")
    dist.barrier()
    fresh = fd.shard(_mf(99))
    opt2 = _mf_optimizer(fresh.parameters(), MF_CASES["mse_adagrad"])
    res["extra_w2"] = fd.load(ckpt / "w2", fresh, [opt2])
    res["loaded_w2"] = _local_state(fresh, [opt2])

    # 2 -> 1 and 1 -> 2 through a one-rank group holding rank 0.
    solo = dist.new_group([0])
    if rank == 0:
        one = fd.shard(_mf(98), solo)
        opt1 = _mf_optimizer(one.parameters(), MF_CASES["mse_adagrad"])
        fd.load(ckpt / "w2", one, [opt1], process_group=solo)
        res["loaded_w1"] = _local_state(one, [opt1])
        # Train on at world 1 and save: the 1 -> 2 direction.
        _run_mf(one, opt1, MF_CASES["mse_adagrad"], slice(None), sharded=True)
        fd.save(ckpt / "w1", one, [opt1], process_group=solo)
        res["saved_w1"] = _local_state(one, [opt1])
    dist.barrier()
    back = fd.shard(_mf(97))
    opt3 = _mf_optimizer(back.parameters(), MF_CASES["mse_adagrad"])
    fd.load(ckpt / "w1", back, [opt3])
    res["loaded_1to2"] = _local_state(back, [opt3])

    # Bad input: rank 1 alone has an out-of-range id; both ranks must raise, then go on.
    u, i, _, r = _batches(3)[0]
    u = u[part].clone()
    if rank == 1:
        u[2] = NUM_USERS + 5
    try:
        back.train_step(opt3, u, i[part], r[part])
        res["bad_ids"] = "no error"
    except IndexError as exc:
        res["bad_ids"] = str(exc)
    emb = fd.shard(fastmf.nn.Embedding(NUM_USERS, K))
    bad = torch.tensor([0, -1]) if rank == 0 else torch.tensor([1, 2])
    try:
        emb(bad)
        res["bad_emb"] = "no error"
    except IndexError as exc:
        res["bad_emb"] = str(exc)
    ok = emb(torch.tensor([rank, 5]))
    res["after_bad"] = ok.detach()
    # Rank 1 with no samples, rank 0 with ids that all live on its own shard (the modulo
    # map: even ids on rank 0): routes with nothing to send or receive, on both ranks.
    u, i, r = EMPTY_RANK_BATCH if rank == 0 else (t[:0] for t in EMPTY_RANK_BATCH)
    lonely = fd.shard(_mf(5))
    opt5 = _mf_optimizer(lonely.parameters(), MF_CASES["mse_adagrad"])
    res["empty_rank_forward"] = lonely(u, i).detach()
    res["empty_rank_loss"] = float(lonely.train_step(opt5, u, i, r, loss="mse", reg=0.02))
    res["empty_rank"] = _local_state(lonely, [opt5])
    try:
        fd.shard(fastmf.nn.Embedding(1, 4))
        res["tiny"] = "no error"
    except ValueError as exc:
        res["tiny"] = str(exc)
    try:
        fd.load(ckpt / "w2", fd.shard(fastmf.MF(NUM_USERS, NUM_ITEMS, dim=K + 1)))
        res["mismatch"] = "no error"
    except ValueError as exc:
        res["mismatch"] = str(exc)
    if rank == 0:
        (ckpt / "plain").mkdir()
        (ckpt / "plain" / "notes.txt").write_text("not a checkpoint")
    dist.barrier()
    res.update(_fit_workers(rank, ckpt))
    return res


def _worker_three(rank: int, world: int, ckpt: Path) -> dict:
    import fastmf.distributed as fd

    model = fd.shard(_mf(96))
    opt = _mf_optimizer(model.parameters(), MF_CASES["mse_adagrad"])
    fd.load(ckpt / "w2", model, [opt])
    res = {"loaded_w3": _local_state(model, [opt])}
    # One more step at world 3 continues the 2-rank run exactly.
    _run_mf(model, opt, MF_CASES["mse_adagrad"], fd.local_slice(BATCH), sharded=True)
    res["trained_w3"] = _local_state(model, [opt])
    return res


def _entry(rank: int, fn, world: int, init_method: str, ckpt: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world, Path(ckpt))
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _spawn(fn, world: int, ckpt: Path, out: Path, timeout: float = 120.0) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    # A file rendezvous, not a TCP port picked here and bound later by rank 0: another job
    # on the machine can take such a port in between.
    init_method = f"file://{out / 'rendezvous'}"
    ctx = mp.start_processes(_entry, args=(fn, world, init_method, str(ckpt), str(out)),
                             nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {timeout} s")
    except Exception as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = "\n".join(f.read_text() for f in sorted(out.glob("*.err")))
        raise AssertionError(f"{exc}\n{errors}") from None
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    ckpt = base / "ckpt"
    ckpt.mkdir()
    two = _spawn(_worker_two, 2, ckpt, base / "two")
    three = _spawn(_worker_three, 3, ckpt, base / "three")
    yield {"two": two, "three": three, "ckpt": ckpt}
    shutil.rmtree(base, ignore_errors=True)


def _close(got: dict, want: dict, exact: bool = False) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=TOL, msg=name)


def _mf_reference(case):
    model = _mf(1)
    opt = _mf_optimizer(model.parameters(), case)
    losses = _run_mf(model, opt, case)
    return model, opt, losses


# -- the tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MF_CASES))
def test_mf_fused_steps_match_one_process(runs, name):
    case = MF_CASES[name]
    model, opt, losses = _mf_reference(case)
    parts = [r[f"mf/{name}"] for r in runs["two"]]
    got = _assemble([p[0] for p in parts])
    want = _full_state(model, [opt])
    _close(got, want)
    assert parts[0][1] == parts[1][1]  # the same global loss on both ranks
    torch.testing.assert_close(torch.tensor(parts[0][1]), torch.tensor(losses), rtol=1e-6,
                               atol=1e-6)
    # Sanity: the steps moved the weights (a test that compares two unchanged copies
    # would pass vacuously).
    assert not torch.allclose(want["user_factors"], _mf(1).user_factors.detach())


def test_mf_forward_matches(runs):
    model = _mf(1)
    model_case = MF_CASES["bpr_adagrad"]
    opt = _mf_optimizer(model.parameters(), model_case)
    _run_mf(model, opt, model_case)
    u, i, _, _ = _batches(3)[0]
    want = model(u, i).detach()
    got = torch.cat([r["mf_forward"] for r in runs["two"]])
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_a_rank_with_an_empty_batch_steps_with_the_other(runs):
    """Rank 1 steps on no samples while rank 0's ids all live on rank 0: the forward,
    loss, tables and states of one process on rank 0's batch (a rank asked for no rows
    once failed to reshape its empty reply)."""
    model = _mf(5)
    opt = _mf_optimizer(model.parameters(), MF_CASES["mse_adagrad"])
    u, i, r = EMPTY_RANK_BATCH
    want_forward = model(u, i).detach()
    want_loss = float(fastmf.train_step(model, opt, u, i, r, loss="mse", reg=0.02))
    first, second = runs["two"]
    torch.testing.assert_close(first["empty_rank_forward"], want_forward, rtol=0, atol=TOL)
    assert second["empty_rank_forward"].shape == (0,)
    assert first["empty_rank_loss"] == second["empty_rank_loss"]
    assert abs(first["empty_rank_loss"] - want_loss) < 1e-6
    _close(_assemble([first["empty_rank"], second["empty_rank"]]), _full_state(model, [opt]))
    assert not torch.allclose(model.user_factors.detach(), _mf(5).user_factors.detach())


def test_embedding_bag_sparse_adam_matches(runs):
    torch.manual_seed(2)
    model = BagModel()
    opt = fastmf.optim.SparseAdam(model.parameters(), lr=0.01)
    _run_autograd(model, opt, None, "bag")
    _close(_assemble([r["bag"] for r in runs["two"]]), _full_state(model, [opt]))


def test_two_tower_with_dense_adam_matches(runs):
    torch.manual_seed(3)
    model = TwoTower()
    sparse = fastmf.optim.SparseAdagrad([model.users.weight, model.items.weight], lr=0.05)
    dense = torch.optim.Adam(model.mlp.parameters(), lr=0.01)
    _run_autograd(model, sparse, dense, "tower")
    got = _assemble([r["tower"] for r in runs["two"]])
    _close(got, _full_state(model, [sparse, dense]))
    # Replicated parameters stay bit-identical across the ranks.
    a, b = runs["two"][0]["tower"], runs["two"][1]["tower"]
    for name in a:
        if a[name][1] is None:
            assert torch.equal(a[name][0], b[name][0]), name


def test_checkpoint_round_trips_are_exact(runs):
    two = runs["two"]
    saved = _assemble([r["saved_w2"] for r in two])
    _close(_assemble([r["loaded_w2"] for r in two]), saved, exact=True)
    assert two[0]["extra_w2"] == {"note": "two"}
    _close(_assemble([two[0]["loaded_w1"]]), saved, exact=True)          # 2 -> 1
    _close(_assemble([r["loaded_1to2"] for r in two]),                    # 1 -> 2
           _assemble([two[0]["saved_w1"]]), exact=True)
    _close(_assemble([r["loaded_w3"] for r in runs["three"]]), saved, exact=True)  # 2 -> 3


def test_training_continues_after_resharding(runs):
    # 2 ranks trained STEPS batches and saved; 3 ranks loaded it and ran STEPS more: the
    # same as one process running both rounds.
    case = MF_CASES["mse_adagrad"]
    model, opt, _ = _mf_reference(case)
    _run_mf(model, opt, case)
    _close(_assemble([r["trained_w3"] for r in runs["three"]]), _full_state(model, [opt]))


def test_interrupted_save_keeps_previous_checkpoint(runs):
    for r in runs["two"]:
        assert "simulated" in r["failed_save"] or "another rank" in r["failed_save"], \
            r["failed_save"]
    # loaded_w2 was read after the failed save (and a stray temporary folder): still the
    # weights of the first save, not the +1.0 ones the failed save carried.
    two = runs["two"]
    _close(_assemble([r["loaded_w2"] for r in two]),
           _assemble([r["saved_w2"] for r in two]), exact=True)


def test_bad_input_raises_on_every_rank(runs):
    for r in runs["two"]:
        assert "out of range" in r["bad_ids"] and "[1]" in r["bad_ids"], r["bad_ids"]
        assert "out of range" in r["bad_emb"] and "[0]" in r["bad_emb"], r["bad_emb"]
        assert "fewer than the world size 2" in r["tiny"], r["tiny"]
        assert "factors" in r["mismatch"], r["mismatch"]
    assert "first bad id is 42" in runs["two"][1]["bad_ids"]
    assert "first bad id is -1" in runs["two"][0]["bad_emb"]
    # The group still works after the errors: a lookup on both ranks went through.
    assert all(r["after_bad"].shape == (2, K) for r in runs["two"])


def test_modulo_map_balances_zipf_ids():
    num_rows, world = 100_000, 8
    gen = torch.Generator().manual_seed(0)
    ids = routing.zipf_ids(num_rows, 200_000, 1.05, gen)
    modulo = routing.lookups_per_rank(ids, num_rows, world, "modulo")
    ranges = routing.lookups_per_rank(ids, num_rows, world, "range")
    assert modulo.sum() == ranges.sum() == ids.numel()
    # Id 0 alone draws ~10% of the lookups at exponent 1.05: no row map can split one row,
    # so modulo's residual imbalance is that row; a range map puts the whole head on rank 0.
    assert float(modulo.max() / modulo.float().mean()) < 1.7
    assert float(ranges.max() / ranges.float().mean()) > 5.0
    mild = routing.zipf_ids(num_rows, 200_000, 0.8, gen)
    modulo = routing.lookups_per_rank(mild, num_rows, world, "modulo")
    assert float(modulo.max() / modulo.float().mean()) < 1.2
    rows = routing.rows_per_rank(num_rows + 3, world)
    assert rows.sum() == num_rows + 3 and int(rows.max() - rows.min()) <= 1


def test_shard_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastmf.distributed.shard(fastmf.nn.Embedding(10, 4))


# -- fastmf.fit on 2 ranks -------------------------------------------------------------------

def _compare_fit(runs, key, want_model, want_rows):
    parts = [r[key] for r in runs["two"]]
    got = _assemble([p[0] for p in parts])
    _close(got, _full_state(want_model))
    # Every rank reports the same records (losses, validation metrics), equal to one
    # process's within float rounding.
    assert parts[0][1] == parts[1][1]
    assert len(parts[0][1]) == len(want_rows)
    for mine, theirs in zip(parts[0][1], want_rows, strict=True):
        assert set(mine) == set(theirs)
        for name in theirs:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name


def test_fit_mf_on_two_ranks_matches_one_process(runs, tmp_path):
    train, valid = _fit_data(False)
    model = _mf(1)
    history = fastmf.fit(model, train, valid=valid, epochs=2, **FIT_MF)
    assert not torch.allclose(model.user_factors, _mf(1).user_factors)
    assert {"rmse", "mae"} <= set(history.epochs[0])
    _compare_fit(runs, "fit_mf", model, _rows(history))


def test_fit_mf_sharded_over_a_1_rank_group_is_one_process(runs):
    train, valid = _fit_data(False)
    model = _mf(1)
    history = fastmf.fit(model, train, valid=valid, epochs=2, **FIT_MF)
    for r in runs["two"]:  # each rank ran alone in its group: the whole batch, every step
        state, rows = r["fit_mf_own_group"]
        _close(_assemble([state]), _full_state(model))
        assert len(rows) == len(history.epochs)
        for mine, theirs in zip(rows, _rows(history), strict=True):
            for name in theirs:
                assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize(("key", "kind", "text"), [
    ("agree_bad_id", "ValueError",
     f"data has {NUM_USERS + 1} users x {NUM_ITEMS} items, the model {NUM_USERS}"),
    ("agree_data", "ValueError", "but rank 1 has data "),
    ("agree_lr", "ValueError", "rank 1 has lr 0.2 where rank 0 has 0.1"),
    ("agree_optimizer", "ValueError",
     "rank 1 has optimizer SparseSGD where rank 0 has SparseAdagrad"),
])
def test_fit_refuses_ranks_that_disagree_on_every_rank(runs, key, kind, text):
    main, other = runs["two"]
    assert main[key] == other[key], key  # the same type and text on every rank
    assert main[key][0] == kind and text in main[key][1], main[key]
    if key != "agree_bad_id":
        assert main[key][1].startswith("fastmf.fit: the ranks of a sharded fit must pass "
                                       "the same data"), main[key]


def test_fit_resumes_a_sharded_checkpoint(runs):
    train, valid = _fit_data(False)
    model = _mf(1)
    history = fastmf.fit(model, train, valid=valid, epochs=3, **FIT_MF)
    _compare_fit(runs, "fit_mf_resumed", model, _rows(history))


def test_fit_resuming_a_sharded_checkpoint_with_other_settings_warns(runs):
    main, other = runs["two"]
    assert len(main["fit_mf_other_run"]) == 1, main["fit_mf_other_run"]
    assert "lr 0.1 -> 0.2" in main["fit_mf_other_run"][0]
    assert other["fit_mf_other_run"] == []
    # ... and trains its fourth epoch at the new lr, as a one-process resume does.
    import tempfile

    train, valid = _fit_data(False)
    with tempfile.TemporaryDirectory() as tmp:
        fastmf.fit(_mf(1), train, valid=valid, epochs=3, checkpoint=Path(tmp) / "ck", **FIT_MF)
        model = _mf(50)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastmf.fit(model, train, valid=valid, epochs=4, checkpoint=Path(tmp) / "ck",
                       resume=True, **dict(FIT_MF, lr=0.2))
        _close(_assemble([main["fit_mf_other_lr"], other["fit_mf_other_lr"]]),
               _full_state(model))
        one = _error(lambda: fastmf.fit(_mf(50), train, valid=valid, epochs=5,
                                        checkpoint=Path(tmp) / "ck", resume=True,
                                        optimizer="rowwise_adagrad", **FIT_MF))
    assert main["fit_mf_other_rowwise"] == other["fit_mf_other_rowwise"]
    kind, text, _ = main["fit_mf_other_rowwise"]
    assert kind == one[0] == "ValueError", (main["fit_mf_other_rowwise"], one)
    tail = "holds SparseAdagrad(rowwise=False) state but this run's optimizer is " \
           "SparseAdagrad(rowwise=True); resume with optimizer='adagrad'"
    assert tail in text and tail in one[1], (text, one[1])


def test_fit_refuses_a_folder_that_is_not_a_sharded_checkpoint(runs):
    for r in runs["two"]:
        assert "not a sharded fastmf checkpoint" in r["fit_bad_target"], r["fit_bad_target"]


@pytest.mark.parametrize("loss", ["mse", "bpr", "bce"])
def test_fit_mf_with_weights_on_two_ranks_matches_one_process(runs, loss):
    train, _ = _fit_data(False)
    model = _mf(1)
    history = fastmf.fit(model, _weighted(train), loss=loss, **FIT_WEIGHTED)
    unweighted = _mf(1)
    fastmf.fit(unweighted, train, loss=loss, **FIT_WEIGHTED)
    assert not torch.allclose(model.user_factors, unweighted.user_factors, atol=1e-3)
    _compare_fit(runs, f"fit_weighted_{loss}", model, _rows(history))


def test_fit_seed_none_on_two_ranks_uses_rank_0s_seed(runs):
    train, _ = _fit_data(False)
    model = _mf(1)
    history = fastmf.fit(model, train, loss="mse",
                         **dict(FIT_WEIGHTED, seed=SEED_NONE_ENTROPY[0]))
    _compare_fit(runs, "fit_seed_none", model, _rows(history))


def test_fit_checkpoint_checks_fail_on_every_rank_before_training(runs, tmp_path):
    main, other = runs["two"]
    for key in ("fit_target_long", "fit_target_under_a_file", "save_under_a_file"):
        assert main[key] == other[key], key
    # As one process: the OSError of a name too long, the path's own.
    long = main["fit_target_long"]
    assert long[0] == "OSError" and long[2] == 36, long
    one = _error(lambda: fastmf.checkpoint.check_save_target(tmp_path / ("x" * 300)))
    assert one[0] == long[0] and one[2] == long[2]
    kind, text, _ = main["fit_target_under_a_file"]
    assert kind == "CheckpointError", text
    assert text.startswith("fastmf.fit: checkpoint=") and "notes.txt is not a directory" in text
    # save(): rank 0's own error, not "rank 0 could not prepare", on the other ranks too.
    assert main["save_under_a_file"][0] == "NotADirectoryError", main["save_under_a_file"]


def test_fit_neumf_distributed_matches_one_process(runs):
    train, valid = _fit_data(True)
    model = _neumf()
    history = fastmf.fit(model, train, valid=valid, epochs=2, **FIT_NEUMF)
    assert not torch.allclose(model.hidden[0].weight, _neumf().hidden[0].weight)
    _compare_fit(runs, "fit_neumf", model, _rows(history))
    # The data-parallel layers stay bit-identical across the ranks.
    a, b = (r["fit_neumf"][0] for r in runs["two"])
    for name in a:
        if a[name][1] is None:
            assert torch.equal(a[name][0], b[name][0]), name


def test_fit_sharded_is_fit_on_id_arrays(runs):
    train, _ = _fit_data(True)
    model = _mf(1)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    history = fastmf.fit(model, train, loss="bpr", epochs=2, batch_size=BATCH, reg=0.01,
                         seed=2, optimizer=opt, num_negatives=1, progress=False,
                         set_global_mean=False)
    parts = [r["fit_sharded"] for r in runs["two"]]
    _close(_assemble([p[0] for p in parts]), _full_state(model, [opt]))
    assert parts[0][1] == parts[1][1]
    assert parts[0][1] == pytest.approx(history["loss"], rel=1e-5)


def test_fit_distributed_needs_a_process_group():
    train, _ = _fit_data(False)
    with pytest.raises(RuntimeError, match="distributed=True needs torch.distributed"):
        fastmf.fit(_mf(1), train, epochs=1, distributed=True, progress=False)


def _metrics_line(text: str) -> str:
    line = next(row for row in text.splitlines() if row.startswith("test ("))
    return line.split(": ", 1)[1]


def test_cli_train_distributed_matches_one_process(runs, tmp_path, capsys):
    from fastmf.cli import main

    data = _write_ratings(tmp_path / "ratings.csv")
    assert main(_cli_args(data, "--out", str(tmp_path / "one"))) == 0
    printed = capsys.readouterr().out
    single = fastmf.load(tmp_path / "one")
    (code0, out0, state0, extra0), (code1, out1, state1, _) = (r["cli"] for r in runs["two"])
    assert code0 == code1 == 0
    assert out1 == ""  # only rank 0 prints
    assert "2 ranks" in out0 and "sharded" in out0
    assert _metrics_line(out0) == _metrics_line(printed)
    assert extra0["model_class"] == "MF" and extra0["model"]["dim"] == 4
    assert extra0["test"] == pytest.approx(fastmf.checkpoint.load_checkpoint(
        tmp_path / "one").extra["test"], rel=1e-5)
    _close(_assemble([state0, state1]), _full_state(single))
    # One process serves the sharded checkpoint: the same tables and raw ids, so `fastmf
    # recommend` answers as it does from the one-process checkpoint.
    served = fastmf.distributed.load_model(runs["ckpt"] / "cli")
    assert type(served) is type(single)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(served.state_dict()[name], value, rtol=0, atol=TOL,
                                   msg=name)
    for side in ("user", "item"):
        assert np.array_equal(getattr(served, f"{side}_map").raw_ids,
                              getattr(single, f"{side}_map").raw_ids)
    assert np.array_equal(served.item_popularity, single.item_popularity)
    user = str(single.user_map.raw_ids[3])
    answers = []
    for folder in (runs["ckpt"] / "cli", tmp_path / "one"):
        assert main(["recommend", "--model", str(folder), "--user", user, "-k", "5"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and user in answers[0]


def test_load_model_refuses_what_it_cannot_build(runs, tmp_path):
    import json

    import fastmf.distributed as fd

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fd.load_model(tmp_path / "missing")
    # A copy of a good checkpoint whose manifest names an unknown class, then a config
    # that does not fit the tables: clear errors before anything is filled.
    copy = tmp_path / "copy"
    shutil.copytree(runs["ckpt"] / "cli", copy)
    version = json.loads((copy / "CURRENT").read_text())["version"]
    manifest_file = copy / version / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for change, message in ((dict(model_class="os.system"), "unknown model class"),
                            (dict(model=dict(manifest["model"], dim=5)), "table"),
                            (dict(id_maps={"user": "pickle"}), "id_maps")):
        manifest_file.write_text(json.dumps({**manifest, **change}))
        with pytest.raises((ValueError, fastmf.checkpoint.CheckpointError), match=message):
            fd.load_model(copy)


def test_load_model_distrusts_the_files(runs, tmp_path, capsys):
    """A sharded checkpoint's files are checked before the model is built or anything is
    read through them: CURRENT must name one of the folder's own versions (an absolute path
    or ".." served a model from elsewhere), manifest.json and CURRENT must be JSON objects
    of bounded size, the manifest's sizes must match the shards' headers (a 900-byte edit
    to num_users made recommend build a 1 GB model first), a truncated shard and NaN
    weights are refused; and the CLI says so in one line with status 2."""
    import json

    from safetensors.torch import load_file, save_file

    import fastmf.distributed as fd
    from fastmf.checkpoint import CheckpointError
    from fastmf.cli import main

    good = runs["ckpt"] / "cli"
    version = json.loads((good / "CURRENT").read_text())["version"]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(good / version, elsewhere / version)

    def case(name, edit):
        copy = tmp_path / name
        shutil.copytree(good, copy)
        edit(copy)
        return copy

    def write(file, value):
        file.write_text(value if isinstance(value, str) else json.dumps(value))

    def manifest_edit(**change):
        def edit(copy):
            file = copy / version / "manifest.json"
            manifest = json.loads(file.read_text())
            manifest["model"].update(change)
            write(file, manifest)
        return edit

    def shard_edit(copy):
        file = copy / version / "shard-00000.safetensors"
        tensors = load_file(file)
        name = next(k for k in tensors if k.endswith("item_factors"))
        tensors[name][1, 2] = float("nan")
        save_file(tensors, file)

    cases = [
        (lambda c: write(c / "CURRENT", {"version": str(elsewhere / version)}),
         "names version '/"),
        (lambda c: write(c / "CURRENT", {"version": f"../elsewhere/{version}"}),
         "names version '../elsewhere"),
        (lambda c: write(c / "CURRENT", ["v"]), "CURRENT holds a JSON list"),
        (lambda c: write(c / "CURRENT", {"version": "v-0123456789ab"}),
         "holds no manifest.json"),
        (lambda c: write(c / version / "manifest.json", [1, 2]),
         "manifest.json holds a JSON list"),
        (lambda c: (c / "CURRENT").write_bytes(b" " * (17 << 20)), "larger than"),
        (manifest_edit(num_users=4_000_000), "table user_bias is \\[4000000\\]"),
        (manifest_edit(num_users=2**40, dim=2**40), "cannot be built"),
        (lambda c: (c / version / "shard-00001.safetensors").write_bytes(
            (c / version / "shard-00001.safetensors").read_bytes()[:300]),
         "cannot read .*shard-00001.safetensors"),
        (shard_edit, "item_factors holds 1 NaN or infinite values"),
    ]
    for k, (edit, message) in enumerate(cases):
        copy = case(f"c{k}", edit)
        with pytest.raises(CheckpointError if k != 6 else ValueError, match=message):
            fd.load_model(copy)
        code = main(["recommend", "--model", str(copy), "--user", "1", "-k", "2"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and \
            err.startswith(f"fastmf recommend: error: --model {copy}"), err


def test_plot_draws_a_sharded_checkpoint(runs, tmp_path, capsys):
    """plot loads a sharded checkpoint as evaluate and recommend do (it refused it: "has
    no config.json")."""
    pytest.importorskip("matplotlib")
    from fastmf.cli import main

    out = tmp_path / "pop.png"
    code = main(["plot", "--model", str(runs["ckpt"] / "cli"), "--kind", "popularity",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.stat().st_size > 1000 and "popularity" in capsys.readouterr().out


def test_a_file_named_current_is_not_a_checkpoint(tmp_path, capsys):
    """Saving a sharded checkpoint removes the folders of its older versions, so a folder
    is taken for one only when its CURRENT names one of its own versions: a user's folder
    that merely holds a file named CURRENT (and folders named v-...) is refused as --out
    and by fastmf.distributed.save's check, and nothing in it is touched."""
    import json

    from fastmf.checkpoint import CheckpointError
    from fastmf.cli import main
    from fastmf.distributed.checkpoint import _committed, _remove_leftovers

    folder = tmp_path / "mine"
    (folder / "v-notes").mkdir(parents=True)
    (folder / "v-notes" / "a.txt").write_text("mine")
    (folder / "v-0123456789ab").mkdir()
    for current in ("release 3", json.dumps({"version": "v-notes"}),
                    json.dumps({"version": "v-0123456789ab"})):
        (folder / "CURRENT").write_text(current)
        with pytest.raises(CheckpointError):
            _committed(folder, "fastmf.distributed.save")
        data = _write_ratings(tmp_path / "ratings.csv")
        assert main(_cli_args(data, "--out", str(folder))) == 2
        assert "is a folder with other files in it" in capsys.readouterr().err
    assert (folder / "v-notes" / "a.txt").read_text() == "mine"
    assert (folder / "v-0123456789ab").is_dir()
    # In a checkpoint's own folder, only the names save() gives are removed.
    ours = tmp_path / "ours"
    for name in ("v-0123456789ab", ".tmp-00000000000f", "v-keep", "v-0123456789abc"):
        (ours / name).mkdir(parents=True)
    _remove_leftovers(ours, None)
    assert sorted(os.listdir(ours)) == ["v-0123456789abc", "v-keep"]


def test_cli_train_distributed_needs_torchrun(tmp_path, capsys, monkeypatch):
    from fastmf.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    data = _write_ratings(tmp_path / "ratings.csv")
    assert main(_cli_args(data, "--distributed")) == 2
    err = capsys.readouterr().err
    assert "--distributed needs the environment torchrun sets" in err
    assert "torchrun --nproc_per_node=N -m fastmf train --distributed" in err


def test_python_m_fastmf_distributed_needs_torchrun(capsys, monkeypatch):
    from fastmf.distributed.__main__ import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        main(["--users", "10", "--items", "5", "--samples", "20"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ("needs the environment torchrun sets (WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
            "MASTER_PORT not set)") in err
    assert "torchrun --nproc_per_node=N -m fastmf.distributed" in err


def test_python_m_fastmf_distributed_resume_needs_a_checkpoint(capsys):
    from fastmf.distributed.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--resume"])
    assert exc.value.code == 2
    assert "--resume needs --checkpoint" in capsys.readouterr().err


# -- NCCL on GPUs: the same code path, skipped visibly without two GPUs ---------------------

def _nccl_entry(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    import fastmf.distributed as fd

    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        part = fd.local_slice(BATCH)
        res = {}
        for name, case in MF_CASES.items():
            model = fd.shard(_mf(1).to(device), device=device)
            opt = _mf_optimizer(model.parameters(), case)
            losses = []
            for u, i, j, r in _batches(11):
                u, i, j, r = (x[part].to(device) for x in (u, i, j, r))
                if case["loss"] == "bpr":
                    value = model.train_step_pairwise(opt, u, i, j, reg=0.02)
                else:
                    value = model.train_step(opt, u, i, r, loss=case["loss"], reg=0.02)
                losses.append(float(value))
            state = {k: (v.cpu(), rows) for k, (v, rows) in _local_state(model, [opt]).items()}
            res[f"mf/{name}"] = (state, losses)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL needs two CUDA GPUs (one per rank); none or one here")
def test_mf_fused_steps_on_nccl_match_one_process(tmp_path):
    out = tmp_path / "nccl"
    out.mkdir()
    ctx = mp.start_processes(_nccl_entry, args=(2, _free_port(), str(out)), nprocs=2,
                             join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + 180
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            errors = "\n".join(f.read_text() for f in sorted(out.glob("*.err")))
            raise AssertionError(f"NCCL workers did not finish in 180 s\n{errors}")
    parts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, case in MF_CASES.items():
        model, opt, losses = _mf_reference(case)
        got = _assemble([p[f"mf/{name}"][0] for p in parts])
        # The CUDA kernels sum in another order than the CPU's: close, not bit-identical.
        for key, want in _full_state(model, [opt]).items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(torch.tensor(parts[0][f"mf/{name}"][1]),
                                   torch.tensor(losses), rtol=1e-5, atol=1e-5)


class _DotModel(fastmf.models.base.Recommender):
    """A user's model on the default training step: ``<p_u, q_i>`` from fastmf.nn tables,
    its config naming its dtype as checkpoints do."""

    def __init__(self, num_users, num_items, dim=4, *, backend="auto", device=None,
                 dtype=torch.float32):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        kw = dict(backend=backend, device=device, dtype=dtype, init_scale=0.3)
        self.user_emb = fastmf.nn.Embedding(num_users, dim, **kw)
        self.item_emb = fastmf.nn.Embedding(num_items, dim, **kw)

    def get_config(self):
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "dtype": str(self.user_emb.weight.dtype).removeprefix("torch.")}

    def forward(self, users, items):
        return (self.user_emb(users) * self.item_emb(items)).sum(-1)


def test_default_training_step_penalises_sharded_tables():
    """A user's model on the default ``training_step``: once sharded (here over one rank,
    so the sharded and unsharded runs must agree to the bit) its lookups are still the
    rows the ``reg`` penalty covers."""
    import copy

    import torch.distributed as dist

    import fastmf.distributed as fd

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    torch.manual_seed(11)
    train, _ = _fit_data(False)
    plain = _DotModel(NUM_USERS, NUM_ITEMS, dim=K)
    sharded = copy.deepcopy(plain)
    settings = dict(loss="mse", epochs=2, batch_size=BATCH, seed=4, lr=0.05, reg=0.5,
                    progress=False, set_global_mean=False)
    fastmf.fit(plain, train, **settings)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fd.shard(sharded)
        assert isinstance(sharded.user_emb, fd.ShardedEmbedding)
        fastmf.fit(sharded, train, distributed=True, **settings)
        # A config naming its dtype ("float32") rebuilds the unsharded model too.
        gathered = fd.gather_model(sharded)
    finally:
        dist.destroy_process_group()
    for name in ("user_emb", "item_emb"):
        torch.testing.assert_close(getattr(sharded, name).weight, getattr(plain, name).weight,
                                   rtol=0, atol=TOL, msg=name)
        assert torch.equal(getattr(gathered, name).weight, getattr(sharded, name).weight)
