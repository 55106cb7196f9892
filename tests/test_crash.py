"""Crash safety of Memory.save: a child process saves in a loop and the parent SIGKILLs
it at seeded random moments. After every kill the file at the path must be a complete
snapshot -- the last one the child reported saved, or the one it was about to report --
and load bit-exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import knnmem

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

SHAPE, CAP, KD, VD, T = (2, 2), 2048, 32, 16, 300
TRIALS = 60

# The child: snapshot i is the memory after segments 0..i; "i" is printed once save
# returns. Segment i is a fixed function of i, so the parent can rebuild any snapshot.
CHILD = f"""
import sys
import numpy as np
import knnmem
path, dtype = sys.argv[1], sys.argv[2]
shape, cap, kd, vd, t = {SHAPE}, {CAP}, {KD}, {VD}, {T}
mem = knnmem.Memory(shape, capacity=cap, key_dim=kd, value_dim=vd, dtype=dtype, metric="cosine")
print("ready", flush=True)
i = 0
while True:
    rng = np.random.default_rng(i)
    mem.add(rng.standard_normal((*shape, t, kd), dtype=np.float32),
            rng.standard_normal((*shape, t, vd), dtype=np.float32))
    mem.save(path)
    print(i, flush=True)
    i += 1
"""


class Snapshots:
    """Exported states of snapshot 0, 1, ... of the child's loop, built on demand."""

    def __init__(self, dtype: str) -> None:
        self.mem = knnmem.Memory(
            SHAPE, capacity=CAP, key_dim=KD, value_dim=VD, dtype=dtype, metric="cosine"
        )
        self.states: list = []

    def __getitem__(self, i: int) -> list:
        while len(self.states) <= i:
            rng = np.random.default_rng(len(self.states))
            self.mem.add(
                rng.standard_normal((*SHAPE, T, KD), dtype=np.float32),
                rng.standard_normal((*SHAPE, T, VD), dtype=np.float32),
            )
            self.states.append(self.mem._core._export_state())
        return self.states[i]


def test_sigkill_during_save_leaves_a_complete_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(2024)
    snapshots = {d: Snapshots(d) for d in ("float32", "bfloat16", "float16", "int8")}
    env = {**os.environ, "KNNMEM_NUM_THREADS": "1"}
    outcomes = {"no file yet": 0, "previous": 0, "new": 0}
    left_temp = 0
    t0 = time.perf_counter()
    for trial in range(TRIALS):
        dtype = ("float32", "bfloat16", "float16", "int8")[trial % 4]
        directory = tmp_path / f"trial{trial}"
        directory.mkdir()
        path = directory / "mem.safetensors"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), dtype],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(float(rng.uniform(0.0, 0.12)))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, (trial, child.returncode)
        reported = [int(line) for line in out.split()]
        last = reported[-1] if reported else -1
        names = sorted(os.listdir(directory))
        temps = [n for n in names if n.startswith(".mem.safetensors.tmp-")]
        assert set(names) - set(temps) <= {"mem.safetensors"}, names
        assert len(temps) <= 1
        left_temp += len(temps)
        if not path.exists():
            assert last == -1, f"trial {trial}: snapshot {last} was reported saved, no file"
            outcomes["no file yet"] += 1
            continue
        loaded = knnmem.Memory.load(path, mmap=bool(trial % 2))
        got = loaded._core._export_state()
        j = int(got[3][0]) // T - 1  # which snapshot: from its write counter
        assert j in (last, last + 1), f"trial {trial}: file holds snapshot {j}, reported {last}"
        outcomes["previous" if j == last else "new"] += 1
        for a, b in zip(got, snapshots[dtype][j]):  # bit-exact
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
    elapsed = time.perf_counter() - t0
    print(f"{TRIALS} kills in {elapsed:.1f} s: {outcomes}, {left_temp} mid-save (temp file left)")
    assert outcomes["previous"] + outcomes["new"] >= TRIALS // 2
    assert left_temp >= 3, "too few kills landed inside a save to mean anything"
