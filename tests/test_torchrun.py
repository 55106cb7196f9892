"""examples/torchrun_sharded.py under torchrun (python -m torch.distributed.run), as a
user runs it: 2 ranks on this machine (--standalone picks a free rendezvous port), gloo,
a ShardedKNNMemory whose rings wrap, checked against an unsharded memory on every rank,
and a checkpoint of one file per rank loaded back. torchrun's process group is killed
after TIMEOUT_S, so a stuck collective cannot hang the run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def test_example_under_torchrun(tmp_path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "examples" / "torchrun_sharded.py"),
        "--check", "--capacity", "1024", "--segment", "256", "--steps", "6",
        "--checkpoint-dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun still running after {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "2 ranks (gloo), memories (2, 4) x 1024 rows x 64: 512 rows per memory per rank" in out
    held = [int(n) for n in re.findall(r"step \d+: (\d+) rows per memory", out)]
    assert held == [256, 512, 768, 1024, 1024, 1024], out  # the rings wrapped
    assert "check: exact searches equal an unsharded memory's on every rank" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.rank0.pt", "memory.rank1.pt"]
    shard = torch.load(tmp_path / "memory.rank1.pt", weights_only=True)
    assert shard["local.keys"].shape == (2, 4, 512, 64)
    assert shard["local.written"].tolist() == [[3 * 256] * 4] * 2  # 6 x 256 rows, half each
