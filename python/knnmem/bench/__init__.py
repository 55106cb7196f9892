"""Recall/latency benchmark of knnmem and its peers on workloads M1-M4.

Install and run (from a checkout of the repository; then from any directory):

    pip install .                                   # knnmem
    pip install -c constraints.txt ".[bench]"       # optional: peers, plot, progress bars
    python -m knnmem.bench --quick                  # M1,M2, 3 steps, fast peers (~1 min)
    python -m knnmem.bench                          # M1,M2, 5 steps
    python -m knnmem.bench --workloads M1,M2,M3,M4 --peers all --json out.json --plot out.png
    python -m knnmem.bench --scaling                # M3's shape at 64K, 256K, 1M rows
    python -m knnmem.bench --tiny                   # smoke test: shrunk workloads, seconds
    python -m knnmem.bench.plot out.json out.png    # the plot again, from a run's --json

(constraints.txt pins the CPU build of torch.) Nothing is written unless asked: --json
and --plot take a path (relative paths are relative to the current directory). numpy
must run its current sgemm kernel: where OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE is set
the run warns; drop them for this command alone (env -u OPENBLAS_CORETYPE -u
OPENBLAS_L2_SIZE python -m knnmem.bench ...).

Workloads (k = 32 throughout): M1 = one memory of 65,536 rows, d = 128, Q = 512 queries
per step; M2 = a 2 x 8 grid of 8,192 rows, d = 64, Q = 512; M3 = one memory of 1M rows,
d = 128, Q = 64; M4 = 8 memories of 65,536 rows, d = 128, Q = 1 (docs/design.md in the
repository). --tiny shrinks every one of them (same names, sizes printed): a check
that everything runs, not a measurement.

Methods. knnmem at recall targets 0.9, 0.95 and exact, and at 0.9 with each key dtype
of --dtypes this build accepts (bfloat16, float16, int8; a printed note for the
others). Peers (knnmem.bench.peers), each skipped with a note when its library does
not import: --peers fast (default) = numpy exact, torch exact, jax approx_max_k;
--peers all adds faiss IndexFlatIP / IndexHNSWFlat / IndexIVFFlat, hnswlib (M=16,
32) and usearch, whose index builds take minutes on large memories. Peers without a
FIFO are built once on the filled memory (build time in the note and the JSON, not
in ms/step); per step they add the segment and drop the evicted rows by deletion or
an id filter, so every method answers over the same live rows. Their search
parameter is tuned to recall 0.9 on held-out queries. Indexes are per memory.

Data (seeded by --seed): per memory 256 unit Gaussian cluster centres; a row is its
centre plus noise (|noise| ~ 0.8), normalised; consecutive stream rows share a cluster
for runs of mean length 8; queries pick clusters independently. Values are -keys.

Per workload every method gets its own state, filled to capacity with the same
clustered stream (untimed). Then each step adds one segment of Q rows per memory
and searches Q queries, with the same segment and queries for every method; the
timed step is add + search, reported as the median over steps. Recall@k is measured
every step against float64 exact top-k over the live float32 rows
(knnmem.eval.exact_search), whatever the method stores, and returned values are
checked against the rows at the returned positions.

Limits (a roofline, both measured in the same run, best of measurements at the start
and after each workload, since shared VMs change speed for seconds at a time):
compute = 2*Q*n*d*G flops at the fp32 rate of a 2048^3 numpy sgemm; memory
bandwidth = the keys a brute-force step reads (G*n*d * bytes per key element) at the
rate of a 512 MiB numpy copy (read + write bytes). "% limit" = the larger of the two
limit times / step time; the table says which one binds (bandwidth for M4, Q=1;
compute for the others). The read-only rate of np.max over 512 MiB is printed beside
a bandwidth limit (a search only reads its keys), not used in "% limit".
Timings on a noisy machine: compare ratios within one run, and check step_ms in
--json. Each timed step starts 0.2 s after the last one: the BLAS thread pools of
numpy, faiss and torch spin on their cores for up to ~0.1 s after a call returns
(OpenBLAS's thread timeout), and a step started inside that window ran ~40% slower
(knnmem M2 measured 59 -> 85 ms right after a numpy matmul).
"""
