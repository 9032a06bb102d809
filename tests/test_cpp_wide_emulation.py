"""The CPU twin's AVX-512 loops on a CPU without AVX-512 (tests/cpp/wide_emulation.cpp).

The loops are written once (csrc/sam_cpu_loops.h) and compiled per register width; the 64-byte
build runs only where the CPU has AVX-512, which the machines this suite runs on may lack.  The
harness compiles that build's source for AVX2 with the 512-bit intrinsics it calls emulated
(the streaming store aborting where it would fault) and compares every loop with the base loops,
bit for bit, over random sizes, offsets, edge values (NaN, inf, -0, subnormals) and options.  What
it cannot show is the AVX-512 instructions themselves, g++'s choice for each lane operation.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(
    GXX is None or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs g++ on x86-64 (the CPU twin's per-instruction-set builds are g++ on x86-64 only)",
)


def test_wide_loops_match_the_base_loops(tmp_path):
    exe = tmp_path / "wide_emulation"
    build = subprocess.run(
        [
            GXX,
            "-O2",
            "-std=c++17",
            "-Wno-psabi",
            "-I",
            os.path.join(ROOT, "csrc"),
            os.path.join(ROOT, "tests", "cpp", "wide_emulation.cpp"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe), "150"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-2000:])
    assert run.stdout.strip().endswith(", 0 differ"), run.stdout[-2000:]
