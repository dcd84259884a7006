"""The emulated CUDA runtime itself (tests/cuda_emulation/include/emu_runtime.h), on small
kernels of its own (tests/cuda_emulation/runtime_check.cpp): barriers, shuffles and votes
give a GPU's results; a missing __syncthreads shows as a wrong result in one of the two
thread orders the blocks alternate; a deadlock and a shuffle outside its mask abort with a
message instead of hanging or passing. Both builds: fibers (the default) and one OS
thread per CUDA thread (the sanitizer builds; a deadlock there hangs, so it is not run)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "cuda_emulation"
COMPILER = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")


@pytest.fixture(scope="module", params=["fibers", "os-threads"])
def program(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("emu-runtime") / "runtime_check"
    flags = ["-DFASTMF_EMU_OS_THREADS"] if request.param == "os-threads" else []
    subprocess.run([COMPILER, "-std=c++20", "-O1", "-pthread", *flags,
                    "-include", str(HERE / "include" / "emu_runtime.h"),
                    "-I", str(HERE / "include"), str(HERE / "runtime_check.cpp"),
                    "-o", str(out)], check=True)
    return request.param, out


def _run(program, case):
    return subprocess.run([str(program[1]), case], capture_output=True, text=True, timeout=60)


def test_barriers_shuffles_and_votes(program):
    result = _run(program, "sum")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"block (\d) sum (-?\d+) want (-?\d+) odd (\d+) want (\d+)", result.stdout)
    assert len(rows) == 4
    for _, got, want, odd, want_odd in rows:
        assert got == want and odd == want_odd
    assert len({want for _, _, want, _, _ in rows}) > 1  # the blocks summed different data


def test_exited_threads_leave_the_barrier(program):
    result = _run(program, "early_exit")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "wrote 64"


def test_shuffle_outside_its_mask_aborts(program):
    result = _run(program, "shuffle_outside_mask")
    assert result.returncode != 0
    assert "shuffle by a lane outside its mask" in result.stderr


@pytest.mark.parametrize("case", ["read_before_write", "sum_before_writes"])
def test_a_missing_syncthreads_shows(program, case):
    if program[0] != "fibers":
        pytest.skip("OS threads interleave by chance; ThreadSanitizer is their race check")
    result = _run(program, case)
    assert result.returncode == 0, result.stderr
    if case == "read_before_write":
        stale = [int(n) for n in re.findall(r"stale (\d+)", result.stdout)]
        assert len(stale) == 4
        # Thread 0 first: everyone reads its write; the last thread first: nobody but
        # thread 0 does. Blocks alternate between the two orders.
        assert stale == [0, 127, 0, 127]
    else:
        sums = re.findall(r"sum (\d+) want (\d+)", result.stdout)
        assert len(sums) == 4
        assert [got == want for got, want in sums] == [False, True, False, True]


def test_a_deadlock_aborts_instead_of_hanging(program):
    if program[0] != "fibers":
        pytest.skip("OS threads wait on std::barrier, which cannot tell a deadlock")
    result = _run(program, "deadlock")
    assert result.returncode != 0
    assert "deadlock" in result.stderr
