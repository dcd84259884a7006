"""Checkpoint safety: saving never destroys other data and survives a crash at any step;
loading checks every file before trusting it; fit's resume edge cases."""

import ast
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from _checkpoints import resealed, set_entry

import fastmf
from fastmf import checkpoint
from fastmf.checkpoint import CheckpointError, check_save_target
from fastmf.data import Interactions

if "MF" not in checkpoint.MODELS:
    checkpoint.register_model(fastmf.MF)


# -- helpers -----------------------------------------------------------------------------------

def make_data(seed=0):
    rng = np.random.default_rng(seed)
    users = np.array([f"user-{u}" for u in rng.integers(0, 30, 500)])
    items = rng.integers(100, 120, 500)
    data = Interactions.from_arrays(users, items, ratings=rng.uniform(1, 5, 500))
    movies = pd.DataFrame({"movieId": data.item_map.raw_ids,
                           "title": [f"Film {i} ✓" for i in range(data.num_items)]})
    return data.with_item_metadata(movies)


def make_model(seed=0, rowwise=False, **kwargs):
    """A model with random weights, id maps, titles and popularity, and an Adagrad
    optimizer with random (non-zero) state."""
    data = make_data(seed)
    torch.manual_seed(seed)
    model = fastmf.MF(data.num_users, data.num_items, 6, global_mean=3.25, init_scale=0.3,
                      **kwargs)
    if model.has_bias:
        with torch.no_grad():
            model.user_bias.uniform_(-1, 1)
            model.item_bias.uniform_(-1, 1)
    model.attach_data(data)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05, rowwise=rowwise)
    for table in model.tables():
        if table is not None:
            opt.state_for(table).uniform_(0.1, 2.0)
    return model, opt


def perturb(model, opt):
    with torch.no_grad():
        for table in model.tables():
            if table is not None:
                table.add_(torch.randn_like(table))
                opt.state_for(table).mul_(3.0)


def snapshot(model, opt=None):
    return {"tables": [None if t is None else t.detach().clone() for t in model.tables()],
            "state": None if opt is None else [
                None if t is None else opt.state_for(t).detach().clone()
                for t in model.tables()]}


def assert_same_model(loaded, model):
    for a, b in zip(loaded.tables(), model.tables(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.mu == model.mu and float(loaded.global_mean) == float(model.global_mean)
    assert (loaded.sparse, loaded.init_scale) == (model.sparse, model.init_scale)
    assert list(loaded.user_map.raw_ids) == list(model.user_map.raw_ids)
    assert list(loaded.item_map.raw_ids) == list(model.item_map.raw_ids)
    assert loaded.item_titles == model.item_titles
    assert np.array_equal(loaded.item_popularity, model.item_popularity)


def assert_checkpoint_holds(path, want):
    """The checkpoint at ``path`` loads, with exactly the tables and optimizer state of
    ``want`` (a :func:`snapshot`)."""
    saved = fastmf.load_checkpoint(path)
    tables = saved.model.tables()
    for got, expected in zip(tables, want["tables"], strict=True):
        assert torch.equal(got, expected)
    for table, expected in zip(tables, want["state"], strict=True):
        assert torch.equal(saved.optimizer.state_for(table), expected)


def tree(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def rewrite_config(path, change):
    config = json.loads((path / "config.json").read_text())
    config = change(config) or config
    (path / "config.json").write_text(json.dumps(config))


# -- 1. saving never replaces what is not a checkpoint -------------------------------------------

def user_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "small.csv").write_text("userId,movieId,rating\n1,2,3.5\n")
    (folder / "sub" / "important.txt").write_text("do not delete")
    return folder


def test_save_refuses_a_folder_of_user_files(tmp_path):
    model, opt = make_model()
    folder = user_folder(tmp_path)
    before = tree(folder)
    for attempt in (lambda: model.save(folder), lambda: model.save(folder, optimizer=opt),
                    lambda: checkpoint.save(model, str(folder)),
                    lambda: check_save_target(folder)):
        with pytest.raises(CheckpointError, match="not a fastmf checkpoint") as info:
            attempt()
        assert str(folder) in str(info.value) and "small.csv" in str(info.value)
    assert tree(folder) == before


def test_fit_refuses_a_bad_checkpoint_folder_before_training(tmp_path):
    model, _ = make_model()
    data = make_data()
    folder = user_folder(tmp_path)
    before, weights = tree(folder), snapshot(model)
    with pytest.raises(CheckpointError, match="not a fastmf checkpoint"):
        fastmf.fit(model, data, epochs=1, checkpoint=folder, progress=False)
    with pytest.raises(CheckpointError, match="not a fastmf checkpoint"):
        fastmf.fit(model, data, epochs=1, checkpoint=folder, resume=True, progress=False)
    assert tree(folder) == before
    for a, b in zip(model.tables(), weights["tables"], strict=True):
        assert torch.equal(a, b)  # refused before the first step


def test_save_refuses_files_foreign_configs_and_unwritable_places(tmp_path):
    model, _ = make_model()
    file = tmp_path / "model.bin"
    file.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="is a file"):
        model.save(file)
    with pytest.raises(CheckpointError, match="is not a directory"):
        check_save_target(file / "ckpt")
    assert file.read_bytes() == b"\x00\x01"
    # Another library's folder with the same two file names.
    foreign = tmp_path / "hf"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["BertModel"]}')
    (foreign / "model.safetensors").write_bytes(b"weights")
    for text in ('{"architectures": ["BertModel"]}', "{broken", "[1, 2]"):
        (foreign / "config.json").write_text(text)
        before = tree(foreign)
        with pytest.raises(CheckpointError, match="not a fastmf checkpoint"):
            model.save(foreign)
        assert tree(foreign) == before
    if os.name == "posix" and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(CheckpointError, match="not writable"):
                model.save(locked / "ckpt")
            with pytest.raises(CheckpointError, match="not writable"):
                check_save_target(locked / "a" / "b")
        finally:
            locked.chmod(0o755)
    # A link to nothing: refused by name, not a FileExistsError from inside the save.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    for save in (lambda: model.save(dangling), lambda: check_save_target(dangling)):
        with pytest.raises(CheckpointError, match="it is a link to .*gone, which does not "
                                                  "exist"):
            save()
    assert dangling.is_symlink() and not (tmp_path / "gone").exists()


def test_save_into_an_empty_folder_and_over_a_checkpoint_keeps_other_files(tmp_path):
    model, opt = make_model()
    folder = tmp_path / "ck"
    folder.mkdir()
    assert check_save_target(str(folder)) == folder
    assert model.save(folder, optimizer=opt) == folder
    (folder / "notes.txt").write_text("mine")
    perturb(model, opt)
    model.save(folder, optimizer=opt)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert_checkpoint_holds(folder, snapshot(model, opt))
    # Missing parents are created, as before.
    nested = tmp_path / "a" / "b" / "ck"
    assert check_save_target(nested) == nested
    assert_same_model(fastmf.load(model.save(nested)), model)


# -- 2. a crash at any step of a save leaves a loadable checkpoint --------------------------------

STEPS = ("makedirs", "mkdir", "open", "write", "fsync", "replace", "rename", "unlink")


class StepOS:
    """Stands in for ``os`` inside fastmf.checkpoint: counts the calls that open, write,
    flush, rename or remove files (and safetensors' writer) and runs ``action`` just before
    call number ``at``."""

    def __init__(self, at, action=None, log=None):
        self.at, self.action, self.log, self.count = at, action, log, 0

    def step(self, name, fn):
        def wrapped(*args, **kwargs):
            self.count += 1
            if self.log is not None:
                self.log.append((name, args))
            if self.count == self.at:
                self.action()
            return fn(*args, **kwargs)
        return wrapped

    def __getattr__(self, name):
        real = getattr(os, name)
        return self.step(name, real) if name in STEPS else real


def install(monkeypatch, step_os):
    monkeypatch.setattr(checkpoint, "os", step_os)
    monkeypatch.setattr(safetensors.torch, "save_file",
                        step_os.step("save_file", safetensors.torch.save_file))


@pytest.fixture
def two_versions(tmp_path):
    """A checkpoint folder holding version A, the model changed to version B, the steps a
    save of B takes, and the step number of its commit."""
    model, opt = make_model(1)
    pristine = tmp_path / "pristine"
    checkpoint.save(model, pristine, optimizer=opt)
    old = snapshot(model, opt)
    perturb(model, opt)
    new = snapshot(model, opt)
    log = []
    dry = tmp_path / "dry"
    shutil.copytree(pristine, dry)
    with pytest.MonkeyPatch.context() as mp:
        install(mp, StepOS(0, log=log))
        checkpoint.save(model, dry, optimizer=opt)
    # The save is committed once config.json is replaced (or, failing that, once it ends).
    commit = next((k + 1 for k, (name, args) in enumerate(log)
                   if name == "replace" and Path(args[1]).name == "config.json"), len(log))
    assert {"save_file", "fsync"} <= {name for name, _ in log}
    return model, opt, pristine, old, new, len(log), commit


def finish_and_check(model, opt, folder, n, commit, old, new):
    """After a save into ``folder`` stopped before step ``n``: the last committed version
    loads exactly (``old`` None: there is none, and the folder may still be saved into), and
    a later save succeeds and leaves no temporaries."""
    if n > commit or old is not None:
        assert_checkpoint_holds(folder, new if n > commit else old)
    else:
        with pytest.raises((FileNotFoundError, CheckpointError)):
            fastmf.load_checkpoint(folder)
        check_save_target(folder)
    checkpoint.save(model, folder, optimizer=opt)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert_checkpoint_holds(folder, new)


def test_save_survives_a_failure_at_every_step(tmp_path, two_versions, monkeypatch):
    model, opt, pristine, old, new, steps, commit = two_versions

    def fail():
        raise OSError("injected failure")

    for n in range(1, steps + 1):
        folder = tmp_path / f"fail-{n}"
        shutil.copytree(pristine, folder)
        with monkeypatch.context() as mp:
            install(mp, StepOS(n, fail))
            try:
                checkpoint.save(model, folder, optimizer=opt)
                raised = False
            except OSError as exc:
                assert "injected failure" in str(exc)
                raised = True
        # Only removing an earlier save's temporaries may fail without failing the save.
        assert raised or n > commit
        if n <= commit:
            # An uncommitted save cleans up after itself.
            assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
        finish_and_check(model, opt, folder, n, commit, old, new)


def save_killed_at(n, model, opt, folder):
    """Exit code of a forked child that saves ``model`` to ``folder`` and is SIGKILLed just
    before step ``n`` of the save (0 if the save ends first)."""

    def child():
        step_os = StepOS(n, lambda: os.kill(os.getpid(), signal.SIGKILL))
        checkpoint.os = step_os
        safetensors.torch.save_file = step_os.step("save_file", safetensors.torch.save_file)
        checkpoint.save(model, folder, optimizer=opt)
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail(f"the save killed before step {n} hung")
    return proc.exitcode


@pytest.mark.skipif(sys.platform != "linux", reason="kills forked children (Linux)")
def test_save_survives_being_killed_at_every_step(tmp_path, two_versions):
    model, opt, pristine, old, new, steps, commit = two_versions
    leftovers_seen = False
    for n in range(1, steps + 2):
        folder = tmp_path / f"kill-{n}"
        shutil.copytree(pristine, folder)

        exitcode = save_killed_at(n, model, opt, folder)
        assert exitcode == (0 if n > steps else -signal.SIGKILL), n
        leftovers_seen |= len(os.listdir(folder)) > 2
        finish_and_check(model, opt, folder, n, commit, old, new)
    assert leftovers_seen  # some kills did leave temporaries for the next save to remove


@pytest.mark.skipif(sys.platform != "linux", reason="kills forked children (Linux)")
def test_a_first_save_survives_being_killed_at_every_step(tmp_path):
    model, opt = make_model(3)
    new = snapshot(model, opt)
    log = []
    with pytest.MonkeyPatch.context() as mp:
        install(mp, StepOS(0, log=log))
        checkpoint.save(model, tmp_path / "dry", optimizer=opt)
    commit = next(k + 1 for k, (name, args) in enumerate(log)
                  if name == "replace" and Path(args[1]).name == "config.json")
    for n in range(1, len(log) + 1):
        folder = tmp_path / f"kill-{n}" / "ck"

        exitcode = save_killed_at(n, model, opt, folder)
        assert exitcode == -signal.SIGKILL, n
        finish_and_check(model, opt, folder, n, commit, None, new)


def test_format1_checkpoints_load_and_can_be_overwritten(tmp_path):
    model, opt = make_model()
    path = checkpoint.save(model, tmp_path / "old", optimizer=opt)

    def downgrade(config):
        for key in ("model_class", "weights", "save_id", "config_sha256"):
            del config[key]
        config["format_version"] = 1

    rewrite_config(path, downgrade)  # the layout fastmf wrote before checksums
    assert_checkpoint_holds(path, snapshot(model, opt))
    assert_same_model(fastmf.load(path), model)
    perturb(model, opt)
    checkpoint.save(model, path, optimizer=opt)
    assert json.loads((path / "config.json").read_text())["format_version"] == 2
    assert_checkpoint_holds(path, snapshot(model, opt))


# -- 3. shapes are checked against the safetensors header before anything is allocated -----------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_onto_a_device_torch_cannot_use_is_the_callers_error(tmp_path):
    model, opt = make_model()
    model.save(tmp_path / "ck", optimizer=opt)
    with pytest.raises(ValueError, match="device 'cuda': this torch has no usable CUDA"):
        fastmf.load(tmp_path / "ck", device="cuda")
    with pytest.raises(ValueError, match="device 'gpu7' is not a torch device"):
        fastmf.load(tmp_path / "ck", device="gpu7")
    assert fastmf.load(tmp_path / "ck", device="cpu").user_factors.device.type == "cpu"


class MustNotBuild(fastmf.MF):
    def __init__(self, *args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was checked")


def test_load_checks_the_header_before_allocating(tmp_path, monkeypatch):
    model, _ = make_model()
    path = model.save(tmp_path / "ck")
    monkeypatch.setitem(checkpoint.MODELS, "MF", MustNotBuild)

    def huge(config):
        config["model"]["num_users"] = 10_000_000

    rewrite_config(path, huge)
    with pytest.raises(CheckpointError, match=r"user_factors has shape \(30, 6\), the config "
                                              r"says \(10000000, 6\)"):
        fastmf.load(path)

    # A format-1 checkpoint (no checksums) whose header claims the big table too.
    def format1(config):
        for key in ("model_class", "weights", "save_id", "config_sha256"):
            del config[key]
        config["format_version"] = 1

    rewrite_config(path, format1)
    raw = (path / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["user_factors"]["shape"] = [10_000_000, 6]
    text = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text
                                             + raw[8 + length:])
    with pytest.raises(CheckpointError, match="bad safetensors entry 'user_factors'"):
        fastmf.load(path)
    (path / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + raw[8:])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        fastmf.load(path)


# -- 4. config.json and the weights are validated and checksummed --------------------------------

def set_key(*keys, value=None, delete=False):
    def change(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        if delete:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (set_key("model", "global_mean", value=float("nan")),
     "model.global_mean must be a finite number, found NaN"),
    (set_key("model", "bias", value="false"), 'model.bias must be true or false, found "false"'),
    (set_key("model", "sparse", value="no"), 'model.sparse must be true or false, found "no"'),
    (set_key("model", "dtype", value="float16"),
     "model.dtype must be 'float32' or 'float64', found \"float16\""),
    (set_key("model", "dim", delete=True), "model.dim is missing"),
    (set_key("model", "num_users", value=-3), r"model.num_users must be an int in \[1, "),
    (set_key("model", "num_items", value=True), "model.num_items must be an int"),
    (set_key("model", "init_scale", value=float("inf")), "model.init_scale must be a finite"),
    (set_key("optimizer", "rowwise", value="yes"), "optimizer.rowwise must be true or false"),
    (set_key("optimizer", "lr", value=-1), "optimizer.lr must be a finite number >= 0"),
    (set_key("optimizer", "type", value=["x"]), "optimizer must be null or an object"),
    (set_key("id_maps", "user", value="pickle"), "id_maps must be an object"),
    (set_key("model", value=[1, 2]), "model must be an object, found"),
    (set_key("extra", value=3), "extra must be an object, found 3"),
    (set_key("format_version", value=99), "checkpoint format 99 is newer"),
    (set_key("format_version", value="2"), "format_version must be an int"),
    (set_key("model_class", value="os.system"), "unknown model class \"os.system\"; "
                                                "registered: .*MF"),
    (set_key("model_class", value={"a": 1}), "unknown model class"),
    (set_key("weights", value={"sha256": "00", "bytes": 10}), "weights must be an object"),
    (set_key("save_id", value="../../etc"), "save_id must be 32 hex digits"),
    (set_key("config_sha256", delete=True), "config_sha256 is missing"),
    (set_key("model", "global_mean", value=3.75), "config.json does not match its checksum"),
    (set_key("extra", value={"note": "edited"}), "config.json does not match its checksum"),
    (lambda config: [config], "holds a JSON list, expected an object"),
])
def test_config_is_validated(tmp_path, change, message):
    model, opt = make_model()
    path = model.save(tmp_path / "ck", optimizer=opt)
    rewrite_config(path, change)
    with pytest.raises(CheckpointError, match=message):
        fastmf.load(path)


def test_damaged_or_odd_files_are_refused(tmp_path):
    model, opt = make_model()
    path = model.save(tmp_path / "ck", optimizer=opt)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0x10  # inside the last tensor's data
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="does not match the checksum in config.json"):
        fastmf.load(path)
    weights.write_bytes(good[:-1])
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        fastmf.load(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        fastmf.load(path)
    weights.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        fastmf.load(path)
    weights.rmdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(weights)  # reading a FIFO would block forever
        with pytest.raises(CheckpointError, match="not a regular file"):
            fastmf.load(path)
        weights.unlink()
    weights.write_bytes(good)
    fastmf.load(path)
    config = path / "config.json"
    text = config.read_text()
    config.write_text(text[:-1] + " " * checkpoint.MAX_CONFIG_BYTES + "}")
    with pytest.raises(CheckpointError, match="larger than 16777216 bytes"):
        fastmf.load(path)
    config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply|not valid JSON"):
        fastmf.load(path)
    config.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        fastmf.load(path)


# -- 5. resume -------------------------------------------------------------------------------

def fit_model(data, path=None, resume=False, epochs=2, optimizer="adagrad", init_seed=0,
              model=None):
    if model is None:
        torch.manual_seed(init_seed)
        model = fastmf.MF(data.num_users, data.num_items, 6)
    fastmf.fit(model, data, epochs=epochs, optimizer=optimizer, checkpoint=path,
               resume=resume, seed=3, progress=False)
    return model


def test_resume_with_other_settings_or_data_says_so(tmp_path):
    """A resumed run ends as an uninterrupted one would only with the same settings and
    data; the checkpoint keeps them and a resume with others warns, naming what changed.
    More epochs is what resuming is for, and says nothing."""
    import warnings

    data = make_data()
    fit_model(data, tmp_path / "ck", epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_model(data, tmp_path / "ck", resume=True, epochs=2)
    torch.manual_seed(0)
    model = fastmf.MF(data.num_users, data.num_items, 6)
    with pytest.warns(UserWarning, match=r"other settings than it was saved with \(lr 0.15 -> "
                                         r"0.3; seed 3 -> 4\)"):
        fastmf.fit(model, data, epochs=3, lr=0.3, checkpoint=tmp_path / "ck", resume=True,
                   seed=4, progress=False)
    other = data.subset(np.arange(len(data) - 5))
    with pytest.warns(UserWarning, match=rf"data '{len(data)} rows, .*' -> '{len(other)} rows"):
        fit_model(other, tmp_path / "ck", resume=True, epochs=4)


@pytest.mark.parametrize("build", [
    lambda d: fastmf.models.MLP(d.num_users, d.num_items, layers=(8, 4), dropout=0.3),
    lambda d: fastmf.models.NeuMF(d.num_users, d.num_items, gmf_dim=4, layers=(8, 4),
                                  dropout=0.3)])
def test_resume_repeats_the_dropout_of_an_uninterrupted_run(tmp_path, build):
    """Dropout draws from torch's global generator; fit seeds it per epoch from (seed,
    epoch) for the epoch's steps and restores the caller's state after, so a resumed run
    draws the masks the uninterrupted one drew (it ended 0.016-0.024 away before) and fit
    leaves the global generator as it found it."""
    data = fastmf.datasets.synthetic(num_users=60, num_items=40, num_interactions=800, seed=0)
    kw = dict(loss="bce", progress=False, seed=5)

    def model():
        torch.manual_seed(0)
        return build(data)

    straight = model()
    state = torch.get_rng_state()
    fastmf.fit(straight, data, epochs=4, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    fastmf.fit(model(), data, epochs=2, checkpoint=tmp_path / "ck", **kw)
    resumed = model()
    torch.manual_seed(123)  # another global state: the resumed epochs must not depend on it
    fastmf.fit(resumed, data, epochs=4, checkpoint=tmp_path / "ck", resume=True, **kw)
    # Bit for bit: the resumed run's Adam is the fused one make_optimizer built (loading the
    # saved state had turned it into the for-loop Adam, 5e-10 to 6e-8 away).
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_resume_keeps_the_fused_adam_of_make_optimizer(tmp_path, loss):
    """NCF's make_optimizer steps the MLP with torch's fused Adam; loading the saved state
    replaced the groups' settings with the saved ones, which keep no implementation flag,
    so the resumed epochs ran the for-loop Adam and ended 5e-10 to 6e-8 away."""
    data = fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=400, seed=0)
    torch.manual_seed(0)
    init = fastmf.models.NeuMF(50, 40, gmf_dim=4, layers=(8, 4)).state_dict()

    def model():
        m = fastmf.models.NeuMF(50, 40, gmf_dim=4, layers=(8, 4))
        m.load_state_dict(init)
        return m, m.make_optimizer(None, 0.1)

    kw = dict(loss=loss, progress=False, seed=2)
    straight, opt = model()
    fastmf.fit(straight, data, epochs=3, optimizer=opt, **kw)
    first, opt = model()
    fastmf.fit(first, data, epochs=1, optimizer=opt, checkpoint=tmp_path / "ck", **kw)
    resumed, opt = model()
    fused = [g.get("fused") for part in opt.optimizers for g in part.param_groups]
    assert True in fused
    fastmf.fit(resumed, data, epochs=3, optimizer=opt, checkpoint=tmp_path / "ck", resume=True,
               **kw)
    assert [g.get("fused") for part in opt.optimizers for g in part.param_groups] == fused
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    data = make_data()
    straight = fit_model(data)
    with pytest.warns(UserWarning, match="holds no checkpoint yet; starting from scratch"):
        resumed = fit_model(data, tmp_path / "new", resume=True)
    for a, b in zip(straight.tables(), resumed.tables(), strict=True):
        assert torch.equal(a, b)
    assert resumed.mu == straight.mu == pytest.approx(float(data.ratings.mean()))
    assert fastmf.load_checkpoint(tmp_path / "new").extra["epoch"] == 2


def test_resume_from_a_model_save_folder_continues_from_its_weights(tmp_path):
    data = make_data()
    trained = fit_model(data)
    path = trained.save(tmp_path / "saved")
    plain = fit_model(data, model=fastmf.load(path), epochs=3)
    with pytest.warns(UserWarning, match="written by model.save"):
        resumed = fit_model(data, path, resume=True, epochs=3, init_seed=99)
    for a, b in zip(plain.tables(), resumed.tables(), strict=True):
        assert torch.equal(a, b)
    saved = fastmf.load_checkpoint(path)
    assert saved.extra["epoch"] == 3 and len(saved.extra["history"]["epochs"]) == 3


@pytest.mark.parametrize("saved_as, resumed_as", [("rowwise_adagrad", "adagrad"),
                                                  ("adagrad", "rowwise_adagrad")])
def test_resume_with_the_other_adagrad_layout_is_refused(tmp_path, saved_as, resumed_as):
    data = make_data()
    fit_model(data, tmp_path / "ck", epochs=1, optimizer=saved_as)
    rowwise = saved_as == "rowwise_adagrad"
    with pytest.raises(ValueError, match=rf"SparseAdagrad\(rowwise={rowwise}\) state but this "
                                         rf"run's optimizer is SparseAdagrad\(rowwise="
                                         rf"{not rowwise}\); resume with "
                                         rf"optimizer='{saved_as}'"):
        fit_model(data, tmp_path / "ck", resume=True, optimizer=resumed_as)


def test_resume_rejects_inconsistent_progress(tmp_path):
    data = make_data()
    path = tmp_path / "ck"
    model = fit_model(data, path, epochs=2)
    model.save(path, extra={"epoch": 5, "history": {"epochs": []}})
    with pytest.raises(CheckpointError, match="holds no valid training progress"):
        fit_model(data, path, resume=True, epochs=3)


# -- 6. the model registry -------------------------------------------------------------------

def test_checkpoint_module_does_not_import_layers():
    tree_ = ast.parse(Path(checkpoint.__file__).read_text())
    imported = set()
    for node in ast.walk(tree_):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert not {name for name in imported if "layers" in name}, imported


def test_register_model_and_load_by_class_name(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MODELS", dict(checkpoint.MODELS))

    class Wide(fastmf.MF):
        pass

    model = Wide(8, 5, 3)
    with pytest.raises(CheckpointError, match="is not registered"):
        model.save(tmp_path / "wide")
    assert checkpoint.register_model(Wide) is Wide
    assert checkpoint.register_model(Wide) is Wide  # the same class again is fine
    loaded = fastmf.load(model.save(tmp_path / "wide"))
    assert type(loaded) is Wide
    assert torch.equal(loaded.user_factors, model.user_factors)

    class Other(fastmf.MF):
        pass

    Other.__name__ = "Wide"
    with pytest.raises(ValueError, match="the name 'Wide' is taken"):
        checkpoint.register_model(Other)
    with pytest.raises(TypeError, match="expected a class"):
        checkpoint.register_model(model)
    del checkpoint.MODELS["Wide"]
    with pytest.raises(CheckpointError, match="unknown model class \"Wide\""):
        fastmf.load(tmp_path / "wide")


# -- property tests: damaged checkpoints raise CheckpointError or load unchanged ----------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the property tests need hypothesis (pip install hypothesis)
    given = None


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    model, opt = make_model(2)
    path = checkpoint.save(model, tmp_path_factory.mktemp("orig") / "ck", optimizer=opt)
    return model, {name: (path / name).read_bytes()
                   for name in ("config.json", "model.safetensors")}


def load_mutated(files):
    """fastmf.load on a folder holding ``files``: the model, or None on CheckpointError."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            Path(folder, name).write_bytes(data)
        try:
            return fastmf.load(folder)
        except CheckpointError:
            return None


def check_mutation(saved_files, change):
    model, files = saved_files
    loaded = load_mutated(change(dict(files)))
    if loaded is not None:
        assert_same_model(loaded, model)


if given is not None:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                    max_size=3),
        max_leaves=6)
    budget = settings(max_examples=50, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
    file_names = st.sampled_from(["config.json", "model.safetensors"])

    @budget
    @given(name=file_names, data=st.data())
    def test_flipped_bytes_never_load_silently(saved_files, name, data):
        size = len(saved_files[1][name])
        flips = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)),
                                   min_size=1, max_size=4))

        def change(files):
            raw = bytearray(files[name])
            for position, mask in flips:
                raw[position] ^= mask
            files[name] = bytes(raw)
            return files

        check_mutation(saved_files, change)

    @budget
    @given(name=file_names, data=st.data())
    def test_truncated_files_never_load(saved_files, name, data):
        size = len(saved_files[1][name])
        keep = data.draw(st.integers(0, size - 1))

        def change(files):
            files[name] = files[name][:keep]
            return files

        check_mutation(saved_files, change)

    @budget
    @given(data=st.data(), value=json_values)
    def test_replaced_config_values_never_load_silently(saved_files, data, value):
        config = json.loads(saved_files[1]["config.json"])
        paths = []

        def walk(node, prefix):
            for key, child in node.items():
                paths.append(prefix + (key,))
                if isinstance(child, dict):
                    walk(child, prefix + (key,))

        walk(config, ())
        where = data.draw(st.sampled_from(paths))

        def change(files):
            set_key(*where, value=value)(config)
            files["config.json"] = json.dumps(config).encode()
            return files

        check_mutation(saved_files, change)
else:
    def test_damaged_checkpoints_property():
        pytest.importorskip("hypothesis", reason="the property tests need hypothesis")


def _time_state(day_range=None, **entries):
    def change(tensors):
        if day_range is not None:
            tensors["model.day_range"] = torch.tensor(day_range)
        for name, (index, value) in entries.items():
            tensors[f"model.{name}"][index] = value
    return change


@pytest.mark.parametrize("cls, change, message", [
    ("Hybrid", set_entry("model.items.weights", 3, float("nan")),
     "model.items.weights holds 1 NaN or infinite values"),
    ("Hybrid", set_entry("model.users.weights", 0, -2.0), "user_features weights must be"),
    ("Hybrid", set_entry("model.items.indices", 5, 10**6), "item_features holds index 1000000"),
    ("Hybrid", set_entry("model.users.indptr", 7, -4),
     r"user_features: offsets must be non-decreasing, got \d+ then -4 at offsets\[6\]"),
    ("Item2Vec", set_entry("model.history_indptr", -1, 10**6),
     r"history: offsets\[50\] = 1000000 is past the end of indices \(400 ids\)"),
    ("Item2Vec", set_entry("model.history_items", 0, -1), "history holds index -1"),
    ("TimeSVDpp", _time_state(user_last_day=(0, -10**15)),
     "user_last_day holds -1000000000000000, outside the training days"),
    ("TimeSVDpp", _time_state(user_mean_day=(2, float("nan"))),
     "model.user_mean_day holds 1 NaN or infinite values"),
    ("TimeSVDpp", _time_state(day_range=[5, 2]), r"day_range must be \(first, last\)"),
    ("TimeSVDpp", _time_state(user_day_keys=(1, -3)), "user_day_keys must ascend strictly"),
])
def test_hand_edited_model_state_is_refused(tmp_path, cls, change, message):
    """What a model gathers from without further checks (feature matrices, histories, a
    timeSVD++ model's days) is checked when loaded: a file edited and hashed again passes
    the checksums, and loaded as it was it gave NaN scores, IndexErrors from inside a
    recommend, or predicted ratings of -876."""
    data = fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=400, seed=0)
    torch.manual_seed(0)
    model = getattr(fastmf.models, cls).from_interactions(data, dim=4)
    fastmf.fit(model, data, epochs=1, progress=False)
    model.save(tmp_path / "ck")
    fastmf.load(tmp_path / "ck")  # as saved: loads
    resealed(tmp_path / "ck", change)
    with pytest.raises(CheckpointError, match=message):
        fastmf.load(tmp_path / "ck")


@pytest.mark.parametrize("change, message", [
    (set_entry("item_bias", 3, float("nan")), "item_bias holds 1 NaN or infinite values"),
    (set_entry("user_factors", (2, 1), float("inf")),
     "user_factors holds 1 NaN or infinite values"),
    (set_entry("optimizer.item_factors", (0, 0), -1.0),
     "optimizer state optimizer.item_factors holds 1 negative values"),
    (set_entry("optimizer.user_factors", (4, 1), float("nan")),
     "optimizer.user_factors holds 1 NaN or infinite values"),
])
def test_non_finite_weights_and_negative_sums_are_refused(tmp_path, change, message):
    """A checkpoint edited to hold NaN or infinite weights, or a negative Adagrad sum, and
    hashed again loaded without a word: ``fastmf evaluate`` printed rmse=nan with status 0,
    and a resumed fit would take the square root of a negative sum."""
    from fastmf.cli import main

    data = fastmf.datasets.synthetic(num_users=50, num_items=40, num_interactions=400, seed=0)
    torch.manual_seed(0)
    model = fastmf.MF(50, 40, dim=4)
    optimizer = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.1)
    fastmf.fit(model, data, epochs=1, optimizer=optimizer, progress=False)
    fastmf.checkpoint.save(model, tmp_path / "ck", optimizer=optimizer)
    fastmf.checkpoint.load_checkpoint(tmp_path / "ck")  # as saved: loads
    resealed(tmp_path / "ck", change)
    with pytest.raises(CheckpointError, match=message):
        fastmf.checkpoint.load_checkpoint(tmp_path / "ck")
    csv = tmp_path / "test.csv"
    data.to_pandas().to_csv(csv, index=False)
    assert main(["evaluate", "--model", str(tmp_path / "ck"), "--data", str(csv),
                 "--user-col", "user", "--item-col", "item"]) == 2


def test_optimizer_eps_zero_is_refused_by_the_schema(tmp_path):
    """The schema took optimizer.eps = 0, which SparseAdagrad refuses: loading then failed
    with the optimizer's ValueError, naming neither the file nor the field."""
    model = fastmf.MF(20, 10, dim=4)
    optimizer = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.1)
    fastmf.checkpoint.save(model, tmp_path / "ck", optimizer=optimizer)
    file = tmp_path / "ck" / "config.json"
    config = json.loads(file.read_text())
    config["optimizer"]["eps"] = 0.0
    config["config_sha256"] = fastmf.checkpoint._config_digest(config)
    file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json.*eps.*a finite number > 0"):
        fastmf.checkpoint.load_checkpoint(tmp_path / "ck")
