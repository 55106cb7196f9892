"""knnmem.jax with one JAX process per "host": 2 processes on 127.0.0.1 with 4 CPU devices
each (and 4 with 2), gloo collectives, one global mesh over the 8 devices (jax.distributed), as on a
cluster. Every process runs the same calls on the same seeded data; each checks the
shards it holds against an unsharded memory it keeps itself.

Two layouts of the same 8 devices: the batch axis across processes with each memory's
capacity within a process, and the capacity across processes (the merge of every search
then crosses process boundaries). The pytest process starts the processes (this file run
as a script), kills their process group after TIMEOUT_S, and retries on a new
coordinator port when the one it picked was taken meanwhile.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("jax")

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(log: str) -> bool:
    return any(m in log.lower() for m in ("address already in use", "failed to bind"))


def run_processes(nproc: int, ndev: int, folder: str) -> list[str]:
    """Runs this file as processes 0..nproc-1 of one jax.distributed job; returns their
    output, or fails the test with it."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    for attempt in range(3):
        port = _free_port()
        logs = [os.path.join(folder, f"log.{attempt}.{i}") for i in range(nproc)]
        procs = []
        for i in range(nproc):
            with open(logs[i], "w") as out:
                cmd = [sys.executable, __file__, str(i), str(nproc), str(ndev), str(port), folder]
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(2)  # let the others report, then stop them
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
        texts = []
        for log in logs:
            with open(log) as f:
                texts.append(f.read())
        codes = [p.returncode for p in procs]
        if all(c == 0 for c in codes):
            return texts
        if attempt < 2 and any(_port_taken(t) for t in texts):
            continue
        report = "\n".join(
            f"--- process {i} (exit {c}) ---\n{t[-4000:]}"
            for i, (c, t) in enumerate(zip(codes, texts))
        )
        pytest.fail(f"processes failed or timed out after {TIMEOUT_S} s:\n{report}")
    raise AssertionError("unreachable")


@pytest.mark.parametrize("nproc, ndev", [(2, 4), (4, 2)])
def test_processes_of_several_devices(nproc: int, ndev: int) -> None:
    with tempfile.TemporaryDirectory(prefix="knnmem-jaxmp-") as folder:
        texts = run_processes(nproc, ndev, folder)
    for i, text in enumerate(texts):
        assert f"process {i}: multiprocess checks passed" in text, text


def test_example_with_local_processes(tmp_path) -> None:
    """examples/jax_distributed.py --local 2: the example starts its own processes."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "jax_distributed.py")
    cmd = [sys.executable, example, "--local", "2", "--cpu-devices", "2", "--capacity", "4096",
           "--steps", "4", "--checkpoint-dir", str(tmp_path)]  # fmt: skip
    for _attempt in range(3):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"the example still ran after {TIMEOUT_S} s:\n{out[-4000:]}")
        if proc.returncode == 0 or not _port_taken(out):
            break
    assert proc.returncode == 0, out[-4000:]
    for i in range(2):
        hits = [int(n) for n in re.findall(rf"process {i}/2 step \d+: (\d+) hits", out)]
        # 2 rows x 4 heads x 64 queries x k=32 once the memories hold rows; at step 2
        # process 0's first batch row is reset (a new document) and finds nothing
        assert hits == [0, 16384, 8192 if i == 0 else 16384, 16384], out
        # its 2 batch rows x 4 heads x 4096 rows x 64 x 4 bytes
        assert f"process {i}: 2 devices hold 8 MiB of keys" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.0.npz", "memory.1.npz"]


# -- in this process, on one device: the helpers' arguments ------------------------------------


def test_sharded_init_and_shards_on_one_device(tmp_path) -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import knnmem.jax as kj

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "mem"))
    state = kj.sharded_init(
        mesh, (2, 3), 64, 8, 4, "cosine", batch_axis="data", capacity_axis="mem"
    )
    want = kj.init((2, 3), 64, 8, 4, "cosine")
    assert jax.tree.structure(state) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype and not np.asarray(a).any()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 40, 8), dtype=np.float32)
    state = kj.sharded_add(mesh, state, x, x[..., :4], batch_axis="data", capacity_axis="mem")
    path = tmp_path / "memory.0.npz"
    kj.save_shards(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.0.npz"]  # no temporary left
    loaded = kj.load_shards(path, mesh, batch_axis="data", capacity_axis="mem")
    assert loaded.metric == "cosine"
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(ValueError, match=r"batch_axis: expected an axis of the mesh"):
        kj.sharded_init(mesh, 2, 64, 8, batch_axis="rows")
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh, got str"):
        kj.sharded_init("mesh", 2, 64, 8)
    with pytest.raises(ValueError, match="capacity"):
        kj.sharded_init(mesh, 2, 0, 8)
    with pytest.raises(TypeError, match="state: expected a knnmem.jax.MemoryState, got dict"):
        kj.save_shards({}, path)
    numpy_state = kj.MemoryState(*(np.asarray(a) for a in jax.tree.leaves(state)), "cosine")
    with pytest.raises(TypeError, match="state.keys: expected a jax.Array, got ndarray"):
        kj.save_shards(numpy_state, tmp_path / "other.npz")
    assert not (tmp_path / "other.npz").exists()
    np.savez(tmp_path / "plain.npz", keys=np.zeros(3))
    with pytest.raises(ValueError, match=r"plain.npz is not a file written by save_shards"):
        kj.load_shards(tmp_path / "plain.npz", mesh)
    (tmp_path / "text.npz").write_text("not a zip file")
    with pytest.raises(ValueError, match=r"text.npz is not a file written by save_shards"):
        kj.load_shards(tmp_path / "text.npz", mesh)
    with pytest.raises(FileNotFoundError):
        kj.load_shards(tmp_path / "missing.npz", mesh)


# -- run as a script: one process of the job --------------------------------------------------


def _main(pid: int, nproc: int, ndev: int, port: int, folder: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", ndev)
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=60
    )
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import knnmem
    import knnmem.jax as kj
    from knnmem.eval import bins_for_recall, recall

    knnmem.set_num_threads(1)
    assert jax.process_count() == nproc and jax.local_device_count() == ndev
    devices = np.array(jax.devices())
    assert [d.process_index for d in devices] == sorted(d.process_index for d in devices)
    grid = devices.reshape(nproc, ndev)
    # "data" across processes, each memory's capacity within one; and the transpose
    mesh_a = Mesh(grid, ("data", "mem"))
    mesh_b = Mesh(grid.T, ("data", "mem"))
    axes = dict(batch_axis="data", capacity_axis="mem")

    rng = np.random.default_rng(0)  # the same stream in every process
    shape, cap, d, t, k = (4, 2), 2048, 32, 256, 16

    def clustered(n: int) -> np.ndarray:
        centres = rng.standard_normal((*shape, 32, d)).astype(np.float32)
        which = rng.integers(0, 32, (*shape, n))
        x = np.take_along_axis(centres, which[..., None], -2)
        x = x + 0.5 * rng.standard_normal((*shape, n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def check_shards(got, want, exact=True) -> int:
        """Every shard this process holds equals the reference there; returns how many."""
        n = 0
        for name, g, w in zip(SearchResultFields, got, want):
            w = np.asarray(w)
            for shard in g.addressable_shards:
                a, b = np.asarray(shard.data), w[shard.index]
                if exact:
                    assert np.array_equal(a, b), (name, shard.index)
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
                n += 1
        return n

    SearchResultFields = kj.SearchResult._fields
    for mesh, bad_shape, bad_cap, message in (
        (mesh_b, (3, 2), cap, "shape: expected a first axis that is a multiple of the size"),
        (mesh_a, shape, cap + 1, f"capacity: expected a multiple of the size {ndev} of "),
    ):
        try:
            kj.sharded_init(mesh, bad_shape, bad_cap, d, **axes)
            raise AssertionError(f"sharded_init took {bad_shape}, {bad_cap}")
        except ValueError as e:
            assert message in str(e), e
    flat = kj.init(shape, cap, d)  # the unsharded reference, on this process's first device
    state_a = kj.sharded_init(mesh_a, shape, cap, d, **axes)
    state_b = kj.sharded_init(mesh_b, shape, cap, d, **axes)
    assert state_a.keys.sharding.spec == P("data", None, "mem", None)
    assert not state_a.keys.is_fully_addressable
    # each device holds (batch / its data-axis size) x (capacity / its mem-axis size) rows
    for st, mesh in ((state_a, mesh_a), (state_b, mesh_b)):
        rows = shape[0] // mesh.shape["data"] * shape[1] * cap // mesh.shape["mem"]
        assert {
            s.data.shape[0] * s.data.shape[1] * s.data.shape[2] for s in st.keys.addressable_shards
        } == {rows}

    def adder(mesh):
        return jax.jit(lambda s, kk, vv: kj.sharded_add(mesh, s, kk, vv, **axes), donate_argnums=0)

    def searcher(mesh):
        return jax.jit(
            lambda s, q, rt: kj.sharded_search(mesh, s, q, k, rt, **axes), static_argnums=2
        )

    add_a, add_b = adder(mesh_a), adder(mesh_b)
    search_a, search_b = searcher(mesh_a), searcher(mesh_b)
    search_flat = jax.jit(lambda s, q, rt: kj.search(s, q, k, rt), static_argnums=2)
    reset = jax.jit(kj.reset)

    # the batch rows the last process holds on mesh_a (its "host's batch rows")
    last = nproc - 1
    mine_a = {s.index[0].indices(shape[0])[:2] for s in state_a.written.addressable_shards}
    host_rows = np.zeros(shape[0], bool)
    host_rows[shape[0] // nproc * last :] = True
    recalls, checked = [], 0
    for step in range(10):  # 10 x 256 rows > 2048: the rings wrap
        if step == 5:  # new documents in the last process's batch rows
            before = np.asarray(flat.written)
            flat = kj.reset(flat, host_rows)
            state_a = reset(state_a, host_rows)
            state_b = reset(state_b, host_rows)
            for s in state_a.written.addressable_shards:
                rows = np.arange(shape[0])[s.index[0]]
                want = np.where(host_rows[rows, None], 0, before[rows])
                assert np.array_equal(np.asarray(s.data), want), (pid, rows)
        kk = clustered(t)
        vv = rng.standard_normal((*shape, t, d)).astype(np.float32)
        flat = kj.add(flat, kk, vv)
        state_a = add_a(state_a, kk, vv)
        state_b = add_b(state_b, kk, vv)
        if step in (0, 4, 5, 9):
            q = clustered(32)
            want = search_flat(flat, q, 1.0)
            checked += check_shards(search_a(state_a, q, 1.0), want)
            checked += check_shards(search_b(state_b, q, 1.0), want)
            for st, fn in ((state_a, search_a), (state_b, search_b)):
                got = multihost_utils.process_allgather(fn(st, q, 0.9).indices, tiled=True)
                assert np.array_equal(got >= 0, np.asarray(want.mask))
                if int(np.min(np.asarray(kj.count(flat)))) > 4 * bins_for_recall(k, 0.9):
                    recalls.append(recall(got, np.asarray(want.indices)))
    assert checked > 0 and len(recalls) >= 4, (checked, recalls)
    print(f"process {pid}: capacity-sharded recall at target 0.9: {np.mean(recalls):.3f}")
    assert np.mean(recalls) >= 0.9, recalls

    # queries given as each process's own batch rows (the usual input on a cluster)
    q = clustered(32)
    rows_spec = NamedSharding(mesh_a, P("data"))
    lo, hi = min(r[0] for r in mine_a), max(r[1] for r in mine_a)  # this process's rows
    local = q[lo:hi]
    q_global = jax.make_array_from_process_local_data(rows_spec, local)
    assert q_global.shape == q.shape
    check_shards(search_a(state_a, q_global, 1.0), search_flat(flat, q, 1.0))

    # each process saves its own shards and loads them back
    path = os.path.join(folder, f"memory.{pid}.npz")
    kj.save_shards(state_a, path)
    loaded = kj.load_shards(path, mesh_a, **axes)
    assert loaded.keys.sharding.spec == state_a.keys.sharding.spec
    check_shards(search_a(loaded, q, 1.0), search_flat(flat, q, 1.0))
    for name in ("keys", "values", "written"):
        for a, b in zip(
            getattr(loaded, name).addressable_shards, getattr(state_a, name).addressable_shards
        ):
            assert a.index == b.index and np.array_equal(np.asarray(a.data), np.asarray(b.data))
    try:  # the shards of mesh_a are not those of mesh_b
        kj.load_shards(path, mesh_b, **axes)
        raise AssertionError("load_shards on another layout did not raise")
    except ValueError as e:
        assert f"path: {path} holds no shard" in str(e), e

    # memorizing attention under jit, capacity across processes (mesh_b)
    gate = jnp.zeros((shape[1],))
    qh = rng.standard_normal((*shape, 32, d)).astype(np.float32)

    def layer(s, x, axis):
        return kj.memorizing_attention(x, x, x, s, gate, k=k, recall_target=1.0, capacity_axis=axis)

    out_flat, _ = jax.jit(lambda s: layer(s, qh, None))(flat)
    specs = kj.partition_specs(state_b, "data", "mem")
    seg = P("data", None, None, None)
    out_b, new_b = jax.jit(
        jax.shard_map(
            lambda s, x: layer(s, x, "mem"),
            mesh=mesh_b,
            in_specs=(specs, seg),
            out_specs=(seg, specs),
        )
    )(state_b, qh)
    check_shards([out_b], [out_flat], exact=False)
    written = multihost_utils.process_allgather(new_b.written, tiled=True)
    assert np.array_equal(written, np.asarray(flat.written) + 32)

    jax.distributed.shutdown()
    print(f"process {pid}: multiprocess checks passed", flush=True)


if __name__ == "__main__":
    _main(*map(int, sys.argv[1:5]), sys.argv[5])
