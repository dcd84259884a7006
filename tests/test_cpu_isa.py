"""The two builds of the CPU kernels (csrc/cpu/isa.h): the x86-64 baseline and AVX2, one of
which registers when the extension loads (AVX2 where the CPU has it, unless
``FASTMF_CPU_ISA=baseline``).

They must give the same numbers to the bit: the script below runs the families they cover
through the public API (the fused MF steps and the BPR step that draws its negatives; the
embedding layer with Adam in backward, weighted bag sums with Adagrad in backward as
Hybrid trains them, and fp16 tables with stochastic rounding) on
random Zipf ids with duplicates, once per build in a subprocess, and the results are
compared bit for bit. And no AVX instruction may sit where it could run before the CPU
check.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmf
from fastmf.testing import requires_native

pytestmark = requires_native

SCRIPT = r"""
import sys
import numpy as np
import torch
import fastmf
from fastmf.testing import zipf_ids

torch.set_num_threads(2)
rng = np.random.default_rng(7)
out = {"isa": fastmf.build_info()["cpu_isa"]}
for dtype in (torch.float32, torch.float64):
    name = str(dtype).removeprefix("torch.")
    torch.manual_seed(1)
    model = fastmf.MF(300, 200, dim=37, dtype=dtype)
    opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    for step in range(3):
        users, items = zipf_ids(300, 1000, generator=rng), zipf_ids(200, 1000, generator=rng)
        ratings = torch.from_numpy(rng.uniform(1, 5, 1000))
        out[f"mse loss {name} {step}"] = fastmf.train_step(model, opt, users, items, ratings,
                                                          loss="mse", reg=0.02)
    indptr = torch.from_numpy(np.arange(0, 3001, 10))
    row_ok = torch.from_numpy(np.sort(np.stack([rng.choice(200, 10, replace=False)
                                                for _ in range(300)]), 1).reshape(-1))
    from fastmf.step import train_step_pairwise_sampled
    for step in range(3):
        users, pos = zipf_ids(300, 777, generator=rng), zipf_ids(200, 777, generator=rng)
        # int32 rows too: the AVX2 build searches them with vector gathers
        rows = row_ok.int() if step % 2 else row_ok
        out[f"bpr loss {name} {step}"] = train_step_pairwise_sampled(
            model, opt, users, pos, indptr, rows, 3, seed=5, step=step, reg=0.01)
    users = zipf_ids(300, 1000, generator=rng)
    for rows in (row_ok, row_ok.int()):
        out[f"negatives {name} {rows.dtype}"] = torch.ops.fastmf.sample_negatives(
            users, indptr, rows, 200, 4, 9, 2, "sample_negatives")
    out.update({f"mf {name} {k}": v for k, v in model.state_dict().items()})
    out.update({f"mf state {name} {i}": s for i, s in enumerate(
        opt.state_for(t) for t in model.tables() if t is not None)})

    torch.manual_seed(2)
    bag = fastmf.nn.EmbeddingBag(500, 29, mode="mean", dtype=dtype)
    table = fastmf.nn.Embedding(400, 16, dtype=dtype)
    adam = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdam(
        [bag.weight, table.weight], lr=0.01, weight_decay=0.001))
    for step in range(3):
        ids = zipf_ids(500, 600, generator=rng)
        offsets = torch.from_numpy(np.sort(rng.choice(np.arange(1, 600), 99, replace=False)))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), offsets])
        pooled = bag(ids, offsets)
        rows = table(zipf_ids(400, (100, 3), generator=rng)).sum(1)
        loss = (pooled[:, :16] * rows).sum() + pooled.square().mean()
        loss.backward()
        adam.step()
        out[f"bag loss {name} {step}"] = loss.detach()
    out[f"bag {name}"] = bag.weight.detach().clone()
    out[f"table {name}"] = table.weight.detach().clone()

    # Hybrid's bags: sums with per-sample weights, element-wise Adagrad in backward.
    torch.manual_seed(4)
    summed = fastmf.nn.EmbeddingBag(700, 70, mode="sum", dtype=dtype)
    ada = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad([summed.weight], lr=0.05))
    for step in range(3):
        ids = zipf_ids(700, 900, generator=rng)
        offsets = torch.from_numpy(np.sort(rng.choice(np.arange(1, 900), 199, replace=False)))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), offsets])
        weights = torch.from_numpy(rng.uniform(0.1, 1.0, 900)).to(dtype)
        pooled = summed(ids, offsets, per_sample_weights=weights)
        out[f"sum bag forward {name} {step}"] = pooled.detach().clone()
        pooled.square().sum().backward()
        ada.step()
    out[f"sum bag {name}"] = summed.weight.detach().clone()

torch.manual_seed(3)
half = fastmf.nn.Embedding(300, 24, dtype=torch.float16, stochastic_rounding=True)
ada = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad([half.weight], lr=0.1))
for step in range(3):
    half(zipf_ids(300, 500, generator=rng)).float().square().sum().backward()
    ada.step()
out["half"] = half.weight.detach().clone()
torch.save(out, sys.argv[1])
"""


def run_build(tmp_path: Path, isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("FASTMF_CPU_ISA", None)
    if isa is not None:
        env["FASTMF_CPU_ISA"] = isa
    path = tmp_path / f"{isa or 'auto'}.pt"
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env,
                   timeout=300)
    return torch.load(path)


def cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() == "x86_64" and re.search(r"^flags\s*:.*\bavx2\b", flags,
                                                         re.M) is not None


def test_build_info_names_the_isa():
    isa = fastmf.build_info()["cpu_isa"]
    assert isa in ("avx2", "baseline")
    if "FASTMF_CPU_ISA" not in os.environ and cpu_has_avx2():
        assert isa == "avx2"


@requires_native
def test_build_formats_numbers():
    """Both kinds of translation unit (.cpp, and the .cu files' host code where built) write
    numbers into error messages as the C++ library should."""
    from fastmf._extension import FORMAT_PROBE, native_build_info

    info = native_build_info()
    assert info["format_probe"] == FORMAT_PROBE == "-1234567890123"
    assert info["format_probe_cuda"] == FORMAT_PROBE


@pytest.mark.parametrize("key, where", [("format_probe", "C++"),
                                        ("format_probe_cuda", "CUDA host")])
@pytest.mark.parametrize("written", ["", "-1.23457e+12"])
def test_build_that_cannot_format_numbers_is_refused(key, where, written):
    # "": what a library built by a toolset GCC newer than the loaded libstdc++ wrote.
    from fastmf._extension import FORMAT_PROBE, _check_formatting

    good = {"format_probe": FORMAT_PROBE, "format_probe_cuda": FORMAT_PROBE}
    _check_formatting(good)
    _check_formatting({})  # a build older than the probes
    with pytest.raises(ImportError, match=rf"fastmf\._C's {re.escape(where)} code formats "
                       rf"-1234567890123 as {re.escape(repr(written))}: .*system compiler"):
        _check_formatting({**good, key: written})


def test_baseline_and_avx2_agree_bit_for_bit(tmp_path):
    base = run_build(tmp_path, "baseline")
    auto = run_build(tmp_path, None)
    assert base.pop("isa") == "baseline"
    assert auto.pop("isa") == ("avx2" if cpu_has_avx2() else "baseline")
    assert base.keys() == auto.keys()
    for key in base:
        a, b = base[key], auto[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                           b.view(-1).view(torch.uint8) if b.numel() else b), key
    # Not a comparison of untouched tables: training moved them.
    assert not torch.equal(base["half"], torch.zeros_like(base["half"]))
    assert float(base["mse loss float64 2"]) != float(base["mse loss float64 0"])


# The functions that may hold AVX instructions: the AVX2 build (namespace cpu_avx2) and the
# kernels each picked by its own CPU check (topk's avx2/avx512 tiles, embedding_bag's
# *_avx2 / *_avx512 / *_f16c helpers).
BEHIND_A_CHECK = re.compile(r"cpu_avx2::|::avx2::|::avx512::|_avx2<|_avx512<|_f16c\(")


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64",
                    reason="needs objdump and an x86-64 build")
def test_avx_code_only_behind_a_cpu_check():
    """Static initialisers and the shared copies of inline functions run before (or
    without) the CPU check: none of them may hold an AVX (VEX/EVEX-encoded) instruction."""
    library = fastmf._extension._C.__file__
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library],
                             check=True, capture_output=True, text=True).stdout
    name, offenders, checked = None, set(), 0
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif name is not None and re.search(r"\tv[a-z0-9]+\s", line):
            checked += 1
            if not BEHIND_A_CHECK.search(name):
                offenders.add(name)
    assert checked > 0, "no AVX instruction at all: is the AVX2 build missing?"
    assert not offenders, sorted(offenders)[:10]


@pytest.mark.parametrize("value, warns", [("bogus", "is not one of"), ("baseline", None),
                                          ("auto", None)])
def test_an_unknown_choice_is_named(value, warns):
    env = {**os.environ, "FASTMF_CPU_ISA": value}
    code = ("import warnings; warnings.simplefilter('error'); import fastmf; "
            "print(fastmf.build_info()['cpu_isa'])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    if warns is None:
        assert result.returncode == 0, result.stderr
        expected = "baseline" if value == "baseline" or not cpu_has_avx2() else "avx2"
        assert result.stdout.split()[-1] == expected
    else:
        assert result.returncode != 0 and warns in result.stderr, result.stderr
