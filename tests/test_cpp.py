"""Builds the core as a plain C++ library (no Python) and runs its C++ test and example."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")
def test_cpp_core_builds_and_passes(tmp_path: Path) -> None:
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build),
        "-DKNNMEM_PYTHON=OFF", "-DKNNMEM_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    out = subprocess.run(
        ["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "100% tests passed" in out.stdout
