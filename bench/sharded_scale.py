"""One knnmem.jax memory of up to 8M rows, its capacity spread over 8 CPU devices: in one
process, and in 2 processes x 4 devices under jax.distributed (gloo collectives, the way
a multi-host job runs), against the same memory unsharded on one device, and against a
knnmem.Memory that stores its keys as bfloat16.

    python bench/sharded_scale.py                    # 1M, 2M, 4M, 8M rows (5-12 min on 2 cores)
    python bench/sharded_scale.py --rows 1M 8M --reps 5
    python bench/sharded_scale.py --tiny             # 64K and 128K rows: a smoke run

The memory: one memory (grid shape (1,)), key_dim 128, value_dim 1 (the values hardly
matter to a search; 1 keeps 8M rows at 4 GiB of float32 keys + 32 MiB of values in all),
clustered unit keys (1024 shared centres + Gaussian noise). The JAX layouts fill it on
the devices themselves (each device draws its own rows), so no host ever holds the whole
memory; their keys are float32 (the knnmem.jax state's format), searched exactly
(recall_target=1.0) and at recall target 0.9 scored as bfloat16 (precision="bfloat16":
the float32 rows rounded as they are scanned). The knnmem.Memory layout stores the keys
as bfloat16 (half the bytes) and searches them exactly and at 0.9, with all cores.

A step is one search of Q=64 queries, k=32 (JAX: a jitted sharded_search), timed as
the median of --reps calls after one warm-up call (in 2 processes: process 0's wall
time, all processes starting together). Also printed: keys + values bytes held by each
device, the bytes each device puts into collectives per search (the all-reduce operands
of the compiled program: the candidates' scores and positions and the k winning rows,
never the memory's keys), recall@32 of the 0.9 search against the exact one on the same
memory, time relative to the same layout at the smallest size, and relative to JAX on
one device at the same size.

On a machine with fewer cores than devices the devices share the cores, so the
sharded layouts show what sharding costs (merge and collectives), not what it gains;
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

K, Q, KEY_DIM, VALUE_DIM, CENTRES = 32, 64, 128, 1, 1024
MODES = (("exact", 1.0, "float32"), ("bf16@0.9", 0.9, "bfloat16"))


def _rows(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KM]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a row count like 1M or 65536, got {text}")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20}[m.group(2)]


def _show(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K"


def _collective_bytes(hlo: str) -> int:
    """Bytes of all-reduce / all-gather results in one device's compiled program."""
    size = {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "bf16": 2, "pred": 1, "f16": 2}
    total = 0
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+(all-reduce|all-gather)(-start)?\(", line)
        if not m:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = 1
            for x in filter(None, dims.split(",")):
                n *= int(x)
            total += n * size.get(dtype, 4)
    return total


# -- one process of a layout: fill, time, report as JSON lines ------------------------------


def worker(pid: int, nproc: int, ndev: int, port: int, sizes: list[int], reps: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", ndev)
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=120
        )
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    import knnmem
    import knnmem.jax as kj
    from knnmem.eval import recall

    devices = nproc * ndev
    # the devices of a process share its cores: one knnmem thread per device
    knnmem.set_num_threads(max(1, (os.cpu_count() or 1) // ndev))
    mesh = Mesh(np.array(jax.devices()), ("mem",))
    axis = "mem" if devices > 1 else None
    base = jax.random.key(0)
    centres = jax.random.normal(jax.random.fold_in(base, 1), (CENTRES, KEY_DIM))

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def draw(key, n):
        which = jax.random.randint(jax.random.fold_in(key, 0), (n,), 0, CENTRES)
        noise = jax.random.normal(jax.random.fold_in(key, 1), (n, KEY_DIM))
        return unit(centres[which] + 0.5 * noise)

    queries = np.asarray(draw(jax.random.fold_in(base, 2), Q))[None]  # [1, Q, d], replicated
    for rows in sizes:
        state = kj.sharded_init(mesh, 1, rows, KEY_DIM, VALUE_DIM, capacity_axis=axis)
        specs = kj.partition_specs(state, None, axis)
        local_rows = rows // devices
        chunk = min(local_rows, 1 << 16)

        def fill(s, rows=rows, local_rows=local_rows, chunk=chunk):
            """Each device draws its own ring's rows, a chunk at a time."""
            here = lax.axis_index("mem")
            key = jax.random.fold_in(jax.random.fold_in(base, 3), here)

            def body(i, keys, chunk=chunk):
                x = draw(jax.random.fold_in(key, i), chunk).astype(keys.dtype)
                return lax.dynamic_update_slice(keys, x[None], (0, i * chunk, 0))

            keys = lax.fori_loop(0, local_rows // chunk, body, s.keys)
            return s.replace(keys=keys, written=jnp.full_like(s.written, rows))

        state = jax.jit(
            jax.shard_map(fill, mesh=mesh, in_specs=(specs,), out_specs=specs, check_vma=False),
            donate_argnums=0,
        )(state)
        jax.block_until_ready(state)
        per_device: dict[int, int] = {}
        for leaf in (state.keys, state.values):
            for s in leaf.addressable_shards:
                per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
        out = {"rows": rows, "devices": devices, "processes": nproc,
               "bytes_per_device": max(per_device.values())}  # fmt: skip
        results = {}
        for name, rt, precision in MODES:
            fn = jax.jit(
                lambda s, q, rt=rt, precision=precision: kj.sharded_search(
                    mesh, s, q, K, rt, capacity_axis=axis, precision=precision
                )
            )
            compiled = fn.lower(state, queries).compile()
            out[f"{name}_collective_bytes"] = _collective_bytes(compiled.as_text())
            res = fn(state, queries)  # warm-up
            jax.block_until_ready(res)
            times = []
            for _ in range(reps):
                if nproc > 1:
                    multihost_utils.sync_global_devices("step")
                t0 = time.perf_counter()
                res = fn(state, queries)
                jax.block_until_ready(res)
                times.append(time.perf_counter() - t0)
            out[f"{name}_ms"] = 1e3 * statistics.median(times)
            idx = res.indices
            results[name] = (
                multihost_utils.process_allgather(idx, tiled=True) if nproc > 1 else np.asarray(idx)
            )
        out["recall"] = recall(results["bf16@0.9"][0], results["exact"][0])
        out["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if pid == 0:
            print("RESULT " + json.dumps(out), flush=True)
        del state, res
    if nproc > 1:
        jax.distributed.shutdown()


def core_worker(sizes: list[int], reps: int) -> None:
    """The same memory as a knnmem.Memory with bfloat16 keys (no JAX): the cost of keys
    stored as bfloat16, which a knnmem.jax state (float32 rows) does not have."""
    import numpy as np

    import knnmem
    from knnmem.eval import recall

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CENTRES, KEY_DIM), dtype=np.float32)

    def draw(n):
        x = centres[rng.integers(0, CENTRES, n)] + 0.5 * rng.standard_normal(
            (n, KEY_DIM), dtype=np.float32
        )
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    queries = draw(Q)[None]
    for rows in sizes:
        mem = knnmem.Memory(1, rows, KEY_DIM, VALUE_DIM, dtype="bfloat16")
        chunk = min(rows, 1 << 18)
        for _ in range(rows // chunk):
            mem.add(draw(chunk)[None], np.zeros((1, chunk, VALUE_DIM), np.float32))
        out = {"rows": rows, "devices": 1, "processes": 1, "bytes_per_device": mem.nbytes}
        results = {}
        for name, rt, _ in MODES:
            mem.search(queries, k=K, recall_target=rt)  # warm-up
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                res = mem.search(queries, k=K, recall_target=rt)
                times.append(time.perf_counter() - t0)
            out[f"{name}_ms"] = 1e3 * statistics.median(times)
            out[f"{name}_collective_bytes"] = 0
            results[name] = res.indices
        out["recall"] = recall(results["bf16@0.9"][0], results["exact"][0])
        out["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(out), flush=True)
        del mem


# -- the driver: one layout after another, each in fresh processes ---------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(nproc: int, ndev: int, sizes: list[int], reps: int, timeout: float) -> list[dict]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    size_args = [str(s) for s in sizes]
    with tempfile.TemporaryDirectory() as folder:
        logs = [os.path.join(folder, f"{i}.log") for i in range(nproc)]
        procs = []
        for i in range(nproc):
            with open(logs[i], "w") as f:
                cmd = [sys.executable, __file__, "--worker", str(i), str(nproc), str(ndev),
                       str(port), str(reps), *size_args]  # fmt: skip
                procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        texts = [open(log).read() for log in logs]
    if any(p.returncode != 0 for p in procs):
        for i, t in enumerate(texts):
            print(f"--- process {i} ---\n{t[-3000:]}", file=sys.stderr)
        raise SystemExit(f"layout {nproc} x {ndev} failed")
    return [json.loads(line[7:]) for line in texts[0].splitlines() if line.startswith("RESULT ")]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        pid, nproc, ndev, port, reps, *sizes = map(int, sys.argv[2:])
        if ndev == 0:
            core_worker(sizes, reps)
        else:
            worker(pid, nproc, ndev, port, sizes, reps)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", type=_rows, default=[1 << 20, 2 << 20, 4 << 20, 8 << 20])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="64K and 128K rows, 2 reps")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per layout")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    if args.tiny:
        args.rows, args.reps = [1 << 16, 1 << 17], 2
    import knnmem

    layouts = [
        (1, 0, "knnmem.Memory, bf16 keys"),
        (1, 1, "JAX, 1 device"),
        (1, 8, "JAX, 1 process x 8 devices"),
        (2, 4, "JAX, 2 processes x 4 devices"),
    ]
    print(f"knnmem kernel {knnmem._core.get_kernel()}, {os.cpu_count()} CPUs, "
          f"Q={Q}, k={K}, key_dim={KEY_DIM}, value_dim={VALUE_DIM}, {args.reps} reps")  # fmt: skip
    rows = []
    for nproc, ndev, name in layouts:
        t0 = time.perf_counter()
        got = run_layout(nproc, ndev, args.rows, args.reps, args.timeout)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in got:
            r["layout"] = name
        rows += got
    base: dict[str, dict] = {}  # each layout's smallest size
    for r in sorted(rows, key=lambda r: r["rows"]):
        base.setdefault(r["layout"], r)
    unsharded = {r["rows"]: r for r in rows if r["layout"] == layouts[1][2]}
    print()
    print("| rows | layout | keys+values per device | exact | target 0.9 | "
          "recall@32 | collectives per device per search | 0.9: time vs smallest | "
          "0.9: time vs 1 device |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = base[r["layout"]]
        print(
            f"| {_show(r['rows'])} | {r['layout']} | {r['bytes_per_device'] / 2**20:,.0f} MiB "
            f"| {r['exact_ms']:,.0f} ms | {r['bf16@0.9_ms']:,.0f} ms | {r['recall']:.3f} "
            f"| {r['bf16@0.9_collective_bytes'] / 1024:,.1f} KiB "
            f"| {r['bf16@0.9_ms'] / first['bf16@0.9_ms']:.2f}x "
            f"| {r['bf16@0.9_ms'] / unsharded[r['rows']]['bf16@0.9_ms']:.2f}x |"
        )
    print("\nmax RSS per process (GiB):", {f"{r['layout']} {_show(r['rows'])}":
          round(r["max_rss_gib"], 2) for r in rows})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
