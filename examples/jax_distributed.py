"""knnmem.jax with one JAX process per host (jax.distributed): the same program on a
cluster and on one machine.

    # on a cluster (Slurm, Open MPI, Kubernetes, Cloud TPU): one process per host,
    # jax.distributed.initialize() finds the coordinator, process count and id itself
    srun python examples/jax_distributed.py

    # on one machine, as if it were several hosts: 2 processes x 4 CPU devices,
    # gloo collectives, coordinator on a free local port
    python examples/jax_distributed.py --local 2 --cpu-devices 4

    # or start the processes yourself
    python examples/jax_distributed.py --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id 0 --cpu-devices 4 &
    python examples/jax_distributed.py --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id 1 --cpu-devices 4

The mesh has two axes over every process's devices: "data" (the batch rows of the memory
grid, one group of rows per host) and "mem" (each memory's capacity, spread over a
host's devices). Each process feeds only its own batch rows
(jax.make_array_from_process_local_data), holds only its own shards, and reads only its
part of the results; the merge of a search stays inside a host. At the end each process
checkpoints its shards to its own file and loads them back.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local", type=int, default=0, help="start this many local processes")
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--cpu-devices", type=int, default=0, help="CPU devices per process")
    p.add_argument("--capacity", type=int, default=65536, help="rows per memory, all shards")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpoint-dir", default=None, help="default: a temporary folder")
    args = p.parse_args()
    if args.local:
        sys.exit(launch_local(args))
    run(args)


def launch_local(args: argparse.Namespace) -> int:
    """Starts args.local copies of this script on 127.0.0.1; stops all if one fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="knnmem-jax-ckpt-")
    common = [sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", str(args.local), "--cpu-devices", str(args.cpu_devices or 4),
              "--capacity", str(args.capacity), "--steps", str(args.steps),
              "--checkpoint-dir", folder]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen([*common, "--process-id", str(i)], env=env, start_new_session=True)
        for i in range(args.local)
    ]
    try:
        while any(q.poll() is None for q in procs):
            if any(q.poll() not in (None, 0) for q in procs):
                break  # one failed: the others would wait for it in a collective
            time.sleep(0.2)
    finally:
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, signal.SIGKILL)
                q.wait()
    return max(abs(q.returncode) for q in procs)


def run(args: argparse.Namespace) -> None:
    import jax

    if args.cpu_devices:  # CPU "hosts": several devices each, collectives over gloo
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import knnmem.jax as kj

    me, hosts, local = jax.process_index(), jax.process_count(), jax.local_device_count()
    grid = np.array(jax.devices()).reshape(hosts, local)  # one row of devices per host
    assert all(len({dev.process_index for dev in row}) == 1 for row in grid)
    mesh = Mesh(grid, ("data", "mem"))
    axes = dict(batch_axis="data", capacity_axis="mem")
    rows_per_host, heads, d, t, k = 2, 4, 64, 512, 32
    shape = (hosts * rows_per_host, heads)

    state = kj.sharded_init(mesh, shape, args.capacity, d, **axes)  # each device its shard
    add = jax.jit(lambda s, kk, vv: kj.sharded_add(mesh, s, kk, vv, **axes), donate_argnums=0)
    search = jax.jit(lambda s, q: kj.sharded_search(mesh, s, q, k, 0.9, **axes))
    reset = jax.jit(kj.reset)
    rows = NamedSharding(mesh, P("data"))  # [batch, heads, T, d], batch split over hosts

    rng = np.random.default_rng(me)  # each host its own data

    def host_batch(n: int) -> jax.Array:
        """This host's batch rows, as one global array over all hosts."""
        x = rng.standard_normal((rows_per_host, heads, n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        return jax.make_array_from_process_local_data(rows, x)

    for step in range(args.steps):
        new_doc = np.zeros(shape[0], bool)
        new_doc[0] = step == args.steps // 2  # host 0's first row starts a new document
        state = reset(state, new_doc)  # the same mask on every host
        keys = host_batch(t)
        res = search(state, host_batch(64))
        state = add(state, keys, keys)
        # this host's rows of the result (one copy of each: the "mem" devices hold replicas)
        hits = sum(int(s.data.sum()) for s in res.mask.addressable_shards if s.replica_id == 0)
        print(f"process {me}/{hosts} step {step}: {hits} hits in its batch rows", flush=True)

    # per-host checkpoint: each process its own file, loaded back on the same layout
    folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="knnmem-jax-ckpt-")
    path = os.path.join(folder, f"memory.{me}.npz")
    kj.save_shards(state, path)
    restored = kj.load_shards(path, mesh, **axes)
    q = host_batch(64)
    a, b = search(state, q), search(restored, q)
    for x, y in zip(a, b):
        for sx, sy in zip(x.addressable_shards, y.addressable_shards):
            assert np.array_equal(np.asarray(sx.data), np.asarray(sy.data))
    held = sum(s.data.nbytes for s in state.keys.addressable_shards) / 2**20
    print(f"process {me}: {local} devices hold {held:.0f} MiB of keys; saved {path} and "
          f"loaded it back", flush=True)  # fmt: skip
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
