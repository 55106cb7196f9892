"""knnmem.jax under jax.shard_map on 8 CPU devices: sharded == unsharded.

The checks run in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before jax initialises, so not in the pytest process).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")


def test_sharded_matches_unsharded() -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sharded checks passed" in proc.stdout, proc.stdout + proc.stderr


# -- run as a script, with 8 devices -----------------------------------------------------------


def _main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import knnmem.jax as kj
    from knnmem.eval import bins_for_recall, expected_recall, recall

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "mem"))
    rng = np.random.default_rng(0)
    shape, cap, d, t, k = (4, 2), 4096, 32, 384, 16

    def clustered(n: int) -> np.ndarray:
        centres = rng.standard_normal((*shape, 64, d)).astype(np.float32)
        which = rng.integers(0, 64, (*shape, n))
        x = np.take_along_axis(centres, which[..., None], -2)
        x = x + 0.5 * rng.standard_normal((*shape, n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    flat = kj.init(shape, cap, d)  # unsharded
    cap_sharded = kj.init(shape, cap, d, capacity_shards=4)  # capacity over "mem"
    specs = kj.partition_specs(cap_sharded, "data", "mem")
    cap_sharded = jax.tree.map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), cap_sharded, specs
    )
    batch_only = flat  # grid over "data", capacity whole

    add_cap = jax.jit(
        lambda s, kk, vv: kj.sharded_add(mesh, s, kk, vv, batch_axis="data", capacity_axis="mem"),
        donate_argnums=0,
    )
    add_batch = jax.jit(lambda s, kk, vv: kj.sharded_add(mesh, s, kk, vv, batch_axis="data"))

    def search_cap(s, q, rt, impl="auto"):
        return kj.sharded_search(
            mesh, s, q, k, rt, batch_axis="data", capacity_axis="mem", impl=impl
        )

    def search_batch(s, q, rt):
        return kj.sharded_search(mesh, s, q, k, rt, batch_axis="data")

    search_cap = jax.jit(search_cap, static_argnums=(2, 3))
    search_batch = jax.jit(search_batch, static_argnums=2)
    search_flat = jax.jit(lambda s, q, rt: kj.search(s, q, k, rt), static_argnums=2)

    recalls = []
    steps = 13  # 13 * 384 rows > capacity: the rings wrap
    for step in range(steps):
        kk = clustered(t)
        vv = rng.standard_normal((*shape, t, d)).astype(np.float32)
        if step == 6:  # a new document in batch rows 1 and 2
            reset = np.array([False, True, True, False])
            flat = kj.reset(flat, reset)
            cap_sharded = kj.reset(cap_sharded, reset)
            batch_only = kj.reset(batch_only, reset)
        if step in (0, 1, 5, 7, 12):
            q = clustered(64)
            ref_exact = search_flat(flat, q, 1.0)
            got = search_cap(cap_sharded, q, 1.0)
            for name, a, b in zip(ref_exact._fields, ref_exact, got):
                assert np.array_equal(np.asarray(a), np.asarray(b)), (step, name)
            got_ref = search_cap(cap_sharded, q, 1.0, "reference")
            for name, a, b in zip(ref_exact._fields, ref_exact, got_ref):
                np.testing.assert_allclose(
                    np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name
                )
            # data parallel only: the same rings, so equal in approximate mode too
            ref = search_flat(flat, q, 0.9)
            got = search_batch(batch_only, q, 0.9)
            for name, a, b in zip(ref._fields, ref, got):
                assert np.array_equal(np.asarray(a), np.asarray(b)), (step, name)
            approx = search_cap(cap_sharded, q, 0.9)
            assert np.array_equal(np.asarray(approx.mask), np.asarray(ref_exact.mask))
            if int(np.min(np.asarray(kj.count(flat)))) > 4 * bins_for_recall(k, 0.9):
                recalls.append(recall(np.asarray(approx.indices), np.asarray(ref_exact.indices)))
        flat = kj.add(flat, kk, vv)
        cap_sharded = add_cap(cap_sharded, kk, vv)
        batch_only = add_batch(batch_only, kk, vv)
        assert np.array_equal(np.asarray(cap_sharded.written), np.asarray(flat.written))
    target = expected_recall(bins_for_recall(k, 0.9), k)
    print(f"capacity-sharded recall {np.mean(recalls):.3f} (model {target:.3f})")
    assert np.mean(recalls) >= 0.9, recalls

    # memorizing attention with a capacity-sharded memory, exact retrieval
    gate = jnp.zeros((shape[1],))
    qh = rng.standard_normal((*shape, 32, d)).astype(np.float32)

    def layer(s, q, kk, vv, axis):
        return kj.memorizing_attention(
            q, kk, vv, s, gate, k=k, recall_target=1.0, capacity_axis=axis
        )

    out_flat, _ = jax.jit(lambda s: layer(s, qh, qh, qh, None))(flat)
    rows = P("data", None, None, None)  # [*shape, T, d]
    out_cap, new = jax.jit(
        jax.shard_map(
            lambda s, q: layer(s, q, q, q, "mem"),
            mesh=mesh,
            in_specs=(specs, rows),
            out_specs=(rows, specs),
        )
    )(cap_sharded, qh)
    np.testing.assert_allclose(np.asarray(out_flat), np.asarray(out_cap), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(new.written), np.asarray(flat.written) + 32)
    print("sharded checks passed")


if __name__ == "__main__":
    _main()
