"""Builds knnmem._cuda for the CPU emulation of CUDA (tests/cuda_emu/include).

The kernels of csrc/cuda/kernels.cu and the module of bindings/cuda.cpp are compiled
by the host C++ compiler against fake CUDA headers: a block's threads are std::threads
with barriers for __syncthreads / __syncwarp / shuffles, mma.sync.m16n8k16 is computed
from the fragments the warp's lanes publish (PTX ISA layout), cp.async copies at once,
device memory is host memory. Kernel
launches (<<<...>>>) are rewritten into emu::launch calls; nothing else changes.
It checks the kernels' logic (indexing, bins, ties, synchronisation between threads),
not their speed or the real tensor cores.

    python tests/cuda_emu/build.py OUT_DIR   # writes OUT_DIR/_cuda_emu*.so
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def transform(source: str) -> str:
    launch = re.compile(r"([\w:]+(?:<[\w:, ]+>)?)\s*<<<\s*(.*?)\s*>>>\s*\((.*?)\);", re.S)
    source = launch.sub(lambda m: f"::emu::launch({m[1]}, {m[2]}, {m[3]});", source)
    shared = re.compile(r"extern __shared__ __align__\(\d+\) ([\w ]+?) (\w+)\[\];")
    pointer = r"\1* \2 = reinterpret_cast<\1*>(::emu::shared_mem());"
    return shared.sub(pointer, source)


def build(out: Path) -> Path:
    import pybind11

    out.mkdir(parents=True, exist_ok=True)
    kernels = out / "kernels_emu.cpp"
    kernels.write_text(transform((ROOT / "csrc/cuda/kernels.cu").read_text()))
    module = "_cuda_emu"
    binding = out / "cuda_emu.cpp"
    source = (ROOT / "bindings/cuda.cpp").read_text()
    binding.write_text(source.replace("PYBIND11_MODULE(_cuda,", f"PYBIND11_MODULE({module},"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out / f"{module}{suffix}"
    cmd = [
        "c++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-D__CUDA_ARCH__=800",
        "-DKNNMEM_CUDA_EMU",
        f"-I{HERE / 'include'}", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}",
        f"-I{ROOT / 'bindings'}",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        str(kernels), str(binding), str(ROOT / "csrc/core/placement.cpp"),
        str(ROOT / "csrc/core/recall.cpp"), "-o", str(target),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}\n{result.stderr[-6000:]}")
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
