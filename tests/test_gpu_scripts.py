"""The GPU first-run scripts, on the CPU: benchmarks/gpu_first.sh (syntax, its stages in
a dry run) and the parts of benchmarks/gpu_bench.py that need no GPU: the byte model of
one train_step, the kernel labels, the profiler / ncu / ptxas tables on made-up data, and
the GPU modes' refusal without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_first.sh"


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" /
                                                  "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gb = _load_gpu_bench()

# One train_step's kernels in launch order, as torch.profiler and ncu name them.
STEP_KERNELS = [
    "void fastmf::cuda::(anonymous namespace)::prepare_samples<float>(fastmf::cuda::IdArray)",
    "Memset (Device)",
    "void cub::detail::radix_sort::DeviceRadixSortHistogramKernel<policy, false, unsigned int>",
    "void cub::detail::radix_sort::DeviceRadixSortExclusiveSumKernel<policy, unsigned int>",
    "Memset (Device)",
    "void cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<policy, false, unsigned int>",
    "Memset (Device)",
    "void cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<policy, false, unsigned int>",
    "Memset (Device)",
    "void cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<policy, false, unsigned int>",
    "fastmf::cuda::mark_run_heads(unsigned int const*, int, int*)",
    "void cub::detail::scan::DeviceScanInitKernel<cub::ScanTileState<int, true> >",
    "void cub::detail::scan::DeviceScanKernel<policy, int*, int*, MaxOp>",
    "void fastmf::cuda::train_forward_kernel<float, 4, (fastmf::Loss)0>(ForwardArgs<float>)",
    "void fastmf::cuda::segment::stage1_kernel<float, 4, 1, true>(SegmentArgs<float>)",
    "void fastmf::cuda::segment::stage2_kernel<float, 4, 1>(SegmentArgs<float>)",
    "void fastmf::cuda::segment::stage1_kernel<float, 4, 1, false>(SegmentArgs<float>)",
    "void fastmf::cuda::segment::stage2_kernel<float, 4, 1>(SegmentArgs<float>)",
    "void fastmf::cuda::finish_loss_kernel<float>(double const*, int, int, double, float*)",
]
STEP_LABELS = [
    "prepare", "memset", "sort: histogram", "sort: exclusive sum", "memset",
    "sort: onesweep pass 1", "memset", "sort: onesweep pass 2", "memset",
    "sort: onesweep pass 3", "run heads", "scan: init", "scan", "forward", "users: stage 1",
    "users: stage 2", "items: stage 1", "items: stage 2", "loss",
]


def test_run_stats_counts_runs_cut_by_tile_edges():
    # 8 slots, tiles of 4: row 1 spans slots 1-5 (both tiles), so it is cut, in 2 pieces.
    ids = torch.tensor([3, 1, 1, 0, 1, 2, 1, 1])
    stats = gb.run_stats(ids)
    assert (stats.slots, stats.tile, stats.tiles) == (8, 4, 2)
    assert (stats.runs, stats.cut_runs, stats.pieces) == (4, 1, 2)
    # A run over three tiles leaves three pieces.
    stats = gb.run_stats(torch.tensor([7] * 12))
    assert (stats.runs, stats.cut_runs, stats.pieces) == (1, 1, 3)


def test_layout_helpers_follow_the_kernels():
    assert gb.row_layout(64, 4) == (4, 16, 1)
    assert gb.row_layout(130, 1) == (1, 32, 8)
    assert gb.row_layout(3, 1) == (1, 4, 1)
    assert [gb.tile_size(n) for n in (8, 8192, 65536, 262144, 10**7)] == [4, 4, 8, 32, 32]
    assert gb.key_bits(1_000_000 + 1 + 200_000) == 21
    assert gb.key_bits(0) == 1


def test_byte_model_by_hand_when_every_row_is_distinct():
    # 8 distinct users and items, K=64: nothing is cut, each row is updated once.
    users = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17]) * 1000
    items = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2])
    rows, minimum, u, i = gb.step_byte_model(users, items, dim=64)
    assert (u.runs, u.cut_runs, i.runs, i.cut_runs) == (8, 0, 8, 0)
    row, update, tiles, blocks = 256, 4 * 256 + 16, 2, 1
    expected = {
        "prepare": 8 * (8 + 8 + 4 + 16),
        "sort: histogram": 16 * 4,
        "sort: onesweep pass 1": 16 * 16,
        "sort: onesweep pass 2": 16 * 16,
        "sort: onesweep pass 3": 16 * 16,
        "run heads": 16 * 8,
        "scan": 16 * 8,
        "forward": 8 * (3 * row + 8 + 16) + blocks * 16,
        "users: stage 1": 8 * (row + 16) + tiles * 8 + 8 * update,
        "users: stage 2": tiles * 12,
        "items: stage 1": 8 * (row + 12) + tiles * 8 + 8 * update,
        "items: stage 2": tiles * 12,
        "loss": blocks * 16 + 4,
    }
    assert [r.kernel for r in rows] == list(expected)
    for r in rows:
        assert r.bytes_per_sample == pytest.approx(expected[r.kernel] / 8), r.kernel
    assert minimum == pytest.approx((8 * 20 + 16 * update) / 8)


def test_byte_model_on_the_benchmark_workload():
    """At batch 65536 the step moves about 2.9 KB per sample against a minimum of about
    1.4 KB (benchmarks/README.md), and hot items take the stage-2 path."""
    rows, minimum, u, i = gb.step_byte_model(*gb.sample_step_batch(65536, seed=1))
    total = sum(r.bytes_per_sample for r in rows)
    assert 2800 < total < 3000
    assert 1300 < minimum < 1420
    assert 0.95 < u.runs / 65536 < 0.99 and 0.28 < i.runs / 65536 < 0.36
    assert i.cut_runs > 0 and i.pieces > i.cut_runs
    by = {r.kernel: r.bytes_per_sample for r in rows}
    assert by["forward"] == pytest.approx(3 * 256 + 24, abs=2)


def test_format_byte_model_table():
    text = gb.format_byte_model((4096, 8192))
    assert "| forward |" in text and "| **total** |" in text and "B=8192" in text
    assert len(re.findall(r"^\| sort: onesweep pass \d", text, re.M)) == 3


def test_label_kernels_in_launch_order():
    assert gb.label_kernels(STEP_KERNELS) == STEP_LABELS
    assert gb.label_kernels(["void some_torch_kernel<float>()"]) == ["other"]


def test_kernel_table_rates_from_fake_timings():
    batch = 262144
    rows, _, _, _ = gb.step_byte_model(*gb.sample_step_batch(4096))
    model = {r.kernel: r.bytes_per_sample for r in rows}
    kernels, t = [], 0.0
    for k, name in enumerate(STEP_KERNELS):
        us = 100.0 if "forward" in name else 5.0 + k
        kernels.append((name, t, us))
        t += us + 2.0  # a 2 µs gap after each
    text = gb.format_kernel_table(kernels, batch, rows)
    forward = next(line for line in text.splitlines() if "| forward |" in line)
    gbs = model["forward"] * batch / 100e-6 / 1e9
    assert f"| {gbs:.0f} |" in forward
    assert f"| {100 * gbs * 1e9 / gb.HBM_BYTES_PER_S:.0f}% |" in forward
    busy = sum(k[2] for k in kernels)
    assert f"**{busy:.1f}**" in text
    span = kernels[-1][1] + kernels[-1][2]
    assert f"gaps included) | {span:.1f} |" in text
    # Without a model (the BPR step) the byte columns stay empty.
    assert "| - | - | - |" in gb.format_kernel_table(kernels[:3], batch, None)


def test_step_summary_with_failures():
    results = [
        {"op": "train_step", "batch": 8192, "eager_ms": 0.2, "graph_ms": 0.05,
         "submit_us": {"eager": 80.0, "graph": 9.0}, "kernels_us": 40.0,
         "model_bytes_per_sample": 3150.0},
        {"op": "train_step", "batch": 262144, "eager_ms": 0.8,
         "graph_ms": "failed: RuntimeError: capture", "submit_us": {"eager": 82.0}},
    ]
    text = gb.format_step_summary(results)
    first, second = text.splitlines()[2:4]
    assert "| 8192 | 0.200 | 0.050 | 41.0 | 163.8 | 80 / 9 | 40.0 | 3150 |" in first
    tbs = 3150 * 8192 / 0.05e-3 / 1e12
    assert f"| {tbs:.2f} |" in first
    assert "failed: RuntimeError" in second and "| 82 / - |" in second


NCU_CSV = """==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",\
"dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__grid_size",\
"launch__registers_per_thread","lts__t_bytes.sum","lts__t_sector_hit_rate.pct",\
"sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","","","","","byte","byte","nsecond","","register/thread","byte","%","%"
"0","123","python3","h","prepare_samples","1","7","5,242,880","4,194,304","4000","1024","24",\
"9,437,184","50.5","80.1"
"1","123","python3","h","train_forward_kernel","1","7","150000000","60000000","100000","16384",\
"40","220000000","70","75"
"2","123","python3","h","prepare_samples","1","7","1000","2000","3000","32","24","4000","1","2"
"""


def test_ncu_table_from_a_raw_csv():
    records = gb.read_ncu_csv(NCU_CSV)
    assert [r["ID"] for r in records] == ["0", "1", "2"]
    assert gb.ncu_number(records[0], "dram__bytes_read.sum") == 5_242_880
    assert gb.ncu_number(records[0], "no such metric") is None
    text = gb.format_ncu_table(records, (262144, 8192))
    assert "ncu: step 1, batch 262144 (2 kernels)" in text
    assert "ncu: step 2, batch 8192 (1 kernels)" in text
    forward = next(line for line in text.splitlines() if "| forward |" in line)
    # 210 MB in 100 µs: 2100 GB/s, 801 B per sample of 262144.
    assert "| 100.0 |" in forward and "| 801 |" in forward and "| 2100 |" in forward
    assert "| 70 | 75 | 40 | 16384 |" in forward
    assert gb.read_ncu_csv("no header here\n1,2,3\n") == []


def test_ncu_details_page_is_pivoted():
    text = ('"ID","Process ID","Kernel Name","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"\n'
            '"0","9","prepare_samples","S","gpu__time_duration.sum","nsecond","4,000"\n'
            '"0","9","prepare_samples","S","dram__bytes_read.sum","byte","1,000"\n'
            '"1","9","train_forward_kernel","S","gpu__time_duration.sum","nsecond","9000"\n')
    records = gb.read_ncu_csv(text)
    assert [r["Kernel Name"] for r in records] == ["prepare_samples", "train_forward_kernel"]
    assert gb.ncu_number(records[0], "gpu__time_duration.sum") == 4000
    assert gb.ncu_number(records[0], "dram__bytes_read.sum") == 1000
    assert gb.ncu_number(records[1], "dram__bytes_read.sum") is None


PTXAS_LOG = """[3/9] nvcc ... segments.cu
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 78 registers, used 0 barriers
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z5spillPd' for 'sm_90'
ptxas info    : Function properties for _Z5spillPd
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 4096 bytes smem
"""


def test_ptxas_summary():
    kernels = gb.parse_ptxas(PTXAS_LOG)
    assert kernels == {
        "_Z6kernelPf": {"arch": "sm_90", "stack": 0, "spill_stores": 0, "spill_loads": 0,
                        "regs": 78, "smem": 0},
        "_Z5spillPd": {"arch": "sm_90", "stack": 8, "spill_stores": 4, "spill_loads": 12,
                       "regs": 40, "smem": 4096},
    }
    text = gb.format_ptxas(kernels)
    lines = text.splitlines()
    assert lines[0].startswith("2 kernels; registers per thread 40..78; 1 with a stack")
    assert "| 40 | 8 | 4/12 | 4096 |" in lines[4]  # the spilling kernel first
    assert "| 78 | 0 | 0/0 | 0 |" in lines[5]
    assert "no `ptxas info` lines" in gb.format_ptxas({})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("mode", ["--step", "--ncu-step"])
def test_gpu_modes_refuse_without_cuda(mode, capsys):
    assert gb.main([mode]) == 2
    assert f"gpu_bench {mode}: no CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--step", "--batches", "0,64"], "--batches"),
    (["--step", "--batches", "a"], "--batches"),
    (["--step", "--ops", "train_step,nope"], "--ops"),
    (["--step", "--dim", "0"], "--dim"),
    (["--step", "--byte-model"], "not allowed with"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        gb.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_ncu_table_without_rows(tmp_path, capsys):
    path = tmp_path / "ncu.csv"
    path.write_text("==PROF== nothing profiled\n")
    assert gb.main(["--ncu-table", str(path)]) == 1
    assert "no kernel rows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read"):
        gb.main(["--ncu-table", str(tmp_path / "missing.csv")])


def test_script_metrics_equal_gpu_bench():
    text = SCRIPT.read_text()
    m = re.search(r'NCU_METRICS="(.*?)"', text, re.S)
    listed = m.group(1).replace("\\\n", "").split(",")
    assert tuple(listed) == gb.NCU_METRICS


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_scripts_parse():
    for name in ("gpu_first.sh", "gpu_check.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_first_dry_run(tmp_path):
    env = dict(os.environ, GPU_FIRST_LOG=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    stages = re.findall(r"^== (\d [\w :()]+?) \(limit (\d+)s", out, re.M)
    names = [s[0] for s in stages]
    assert names == ["0 machine", "1 build", "1 registers and spills", "1 import",
                     "2 tests: train_step", "3 timing", "4 ncu", "4 ncu export",
                     "4 ncu table", "5 tests: rest", "6 tests: families on CUDA"]
    assert all(int(s[1]) <= 520 for s in stages)
    assert "TORCH_CUDA_ARCH_LIST=9.0" in out and "NVCC_APPEND_FLAGS=-Xptxas -v" in out
    assert "--maxfail=3 -k (train_step or" in out
    assert "--ignore=tests/test_cuda_ops.py" in out and "--maxfail=20 -k cuda" in out
    assert '--nvtx --nvtx-include fastmf_step/ --metrics' in out
    assert "--cache-control none --clock-control none" in out
    assert (tmp_path / "run.log").read_text() == out
    # A small budget cuts every stage's limit to what is left of it.
    env["GPU_FIRST_BUDGET"] = "100"
    short = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True,
                           text=True, timeout=120, check=True).stdout
    limits = {n: int(s) for n, s in re.findall(r"^== (\d [\w :()]+?) \(limit (-?\d+)s", short,
                                               re.M)}
    assert 90 <= limits["1 build"] <= 100 and limits["2 tests: train_step"] <= 0
    assert all(v <= 100 for v in limits.values())
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_step_mode_end_to_end_with_a_stand_in_device(monkeypatch, tmp_path, capsys):
    """--step's control flow and output on the CPU: events, graphs and the profiler are
    stood in for, the step is a small CPU computation; one graph capture fails, as a
    broken capture would, and the rest is still measured and reported."""
    calls = {"step": 0}

    def setup(op, batch, dim, seed=0):
        gen = torch.Generator().manual_seed(batch)
        table = torch.rand(1000, dim, generator=gen)
        data = [(torch.randint(0, 1000, (batch,), generator=gen),
                 torch.randint(0, 1000, (batch,), generator=gen),
                 torch.rand(batch, generator=gen)) for _ in range(4)]

        def step(users, items, third):
            calls["step"] += 1
            return (table[users] * table[items]).sum()

        return step, data

    class Graph:
        def __init__(self, step, static):
            self.step, self.static = step, static

        def replay(self):
            self.step(*self.static)

    def capture(step, static):
        if static[0].numel() == 128:
            raise RuntimeError("operation not permitted when stream is capturing")
        return Graph(step, static)

    monkeypatch.setattr(gb, "cuda_ready", lambda mode, ops: None)
    monkeypatch.setattr(gb, "step_setup", setup)
    monkeypatch.setattr(gb, "capture_graph", capture)
    monkeypatch.setattr(gb, "copy_bandwidths", lambda: {"d2d": 4.3e12, "h2d_pinned": 5.5e10})
    monkeypatch.setattr(gb, "profile_kernels", lambda fn: (fn(), [
        (name, 10.0 * k, 5.0) for k, name in enumerate(STEP_KERNELS)])[1])
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"multi_processor_count": 132})())
    path = tmp_path / "step.jsonl"
    assert gb.main(["--step", "--batches", "64,128", "--iters", "3", "--ops",
                    "train_step,train_step_pairwise", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert calls["step"] > 4 * 3 * 4  # warm-up, eager, graph, submit and profiled steps
    assert "copy bandwidth: d2d 4300 GB/s, h2d_pinned 55 GB/s" in out
    assert "### train_step, batch 64, K=64: one eager step under torch.profiler" in out
    assert "graph_ms: FAILED" in out and "operation not permitted" in out
    summary = out[out.index("## step summary"):].splitlines()
    rows = [line for line in summary if line.startswith("| train_step")]
    assert len(rows) == 4 and rows[0].startswith("| train_step | 64 | ")
    assert "failed: RuntimeError" in rows[1] and "| - |" in rows[1]
    # Every timing is printed before the first profiler table.
    assert out.rindex("train_step_pairwise B=128: eager") < out.index("### train_step")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["copy_bandwidth"] + ["step"] * 4 + ["kernels"] * 4
    first = records[1]
    assert first["op"] == "train_step" and first["batch"] == 64
    assert isinstance(first["eager_ms"], float) and isinstance(first["graph_ms"], float)
    assert set(first["submit_us"]) == {"eager", "graph"}
    assert first["model_bytes_per_sample"] > first["minimum_bytes_per_sample"] > 0
    assert "model_bytes_per_sample" not in records[3]  # the BPR step has no model
    assert [(r["op"], r["batch"]) for r in records[5:]] == [
        ("train_step", 64), ("train_step", 128), ("train_step_pairwise", 64),
        ("train_step_pairwise", 128)]
    assert all(len(r["kernels"]) == len(STEP_KERNELS) for r in records[5:])
    assert "| 95.0 | 3" in rows[0]  # kernel µs and model bytes in the summary


def test_sampled_step_cells_on_the_cpu():
    """--step's sampled cells (gpu_bench.positives_csr, make_sampled_native) on CPU tensors:
    the CSR holds each batch pair once, rows sorted; each step equals the spec's."""
    from fastmf._extension import native_available
    from fastmf.ops import Loss, MFTables, PairwiseLoss
    from fastmf.ops import reference as spec
    from fastmf.testing import make_tables

    if not native_available():
        pytest.skip("fastmf built without its native kernels")
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 50, (64,), generator=gen), torch.randint(0, 30, (64,),
                                                                       generator=gen), None)
            for _ in range(2)]
    indptr, indices = gb.positives_csr(data, 50, 30)
    pairs = {(int(u), int(i)) for b in data for u, i in zip(b[0], b[1], strict=True)}
    rows = [indices[indptr[u]:indptr[u + 1]].tolist() for u in range(50)]
    assert {(u, i) for u, row in enumerate(rows) for i in row} == pairs
    assert all(row == sorted(set(row)) for row in rows)
    tables = make_tables(50, 30, 8, seed=1)
    for op in ("train_step_pairwise_sampled", "train_step_sampled"):
        step, read = gb.make_sampled_native(tables, op, (indptr, indices))
        want = MFTables(*(t.clone() for t in tables))
        states = MFTables(*(torch.zeros_like(t) for t in want))
        for k, (u, i, _) in enumerate(data):
            step(u, i, None)
            n = gb.SAMPLED_NEGATIVES
            if op == "train_step_pairwise_sampled":
                spec.train_step_pairwise_sampled(want, states, u, i, indptr, indices, n, 0,
                                                 k + 1, PairwiseLoss.BPR, 0.0, gb.adagrad())
            else:
                spec.train_step_sampled(want, states, u, i, indptr, indices, n, 0, k + 1, 0.0,
                                        Loss.BCE, 0.0, gb.adagrad())
        for got, exp in zip(read(), (want[0], want[1], want[3]), strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)
