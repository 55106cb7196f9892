"""The benchmark runs as installed: `python -m knnmem.bench` (and the old `python bench/run.py`).

Each run is a subprocess with --tiny (shrunk workloads, a few seconds), started in a
temporary directory so that nothing is written into the repository and knnmem is the
installed package.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "knnmem" / "bench"
STEPS = 2  # --tiny's default
JSON_FIELDS = {
    "args",
    "machine",
    "sgemm_gflops",
    "copy_gbps",
    "read_gbps",
    "rates",
    "workloads",
    "results",
    "scaling",
    "notes",
}
RESULT_FIELDS = {
    "workload",
    "method",
    "note",
    "step_ms",
    "add_ms",
    "search_ms",
    "recalls",
    "expected_recall",
    "build_s",
    "params",
    "key_bytes",
    "capacity",
    "queries_per_step",
    "numpy_ms",
    "compute_limit_ms",
    "bandwidth_limit_ms",
    "median_ms",
    "mean_recall",
    "queries_per_s",
    "speedup_vs_numpy",
    "limit_ms",
    "limit_kind",
    "pct_of_limit",
}
KNNMEM_ROWS = ["knnmem r=0.90", "knnmem r=0.95", "knnmem exact"]
DTYPE_ROWS = {
    "bfloat16": "knnmem bf16 r=0.90",
    "float16": "knnmem f16 r=0.90",
    "int8": "knnmem i8 r=0.90",
}


def run(args: list[str], cwd: Path, blocked: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if blocked is not None:  # modules there shadow the installed ones
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocked), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(workload, method) -> the other cells of the printed table."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if re.match(r"workload\s+method\s+ms/step", line)
    )
    assert set(lines[start + 1]) <= {"-", " "}, lines[start + 1]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    """A seeded --tiny run over M1 and M2, with faiss and matplotlib made unimportable
    (a peer and the plot must then be skipped with a note)."""
    tmp = tmp_path_factory.mktemp("bench")
    blocked = tmp / "blocked"
    for name in ("faiss", "matplotlib"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text('raise ImportError("blocked by test_bench")\n')
    args = ["-m", "knnmem.bench", "--tiny", "--workloads", "M1,M2", "--peers", "numpy,faiss-flat"]
    args += ["--seed", "3", "--no-progress", "--json", "out.json", "--plot", "out.png"]
    proc = run(args, tmp, blocked)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp / "out.png").exists()
    return proc.stdout, json.loads((tmp / "out.json").read_text()), tmp


def expected_methods(notes: list[str]) -> list[str]:
    """knnmem's rows, a row per key dtype this build takes (else a note), numpy's."""
    methods = list(KNNMEM_ROWS)
    for dtype, method in DTYPE_ROWS.items():
        if not any(n.startswith(f"knnmem dtype={dtype}: not supported") for n in notes):
            methods.append(method)
    return [*methods, "numpy exact"]


def test_table_has_a_row_per_method_and_workload(tiny_run) -> None:
    stdout, report, _ = tiny_run
    rows = table_rows(stdout)
    methods = expected_methods(report["notes"])
    assert list(rows) == [(w, m) for w in ("M1", "M2") for m in methods]
    by_key = {(r["workload"], r["method"]): r for r in report["results"]}
    for key, cells in rows.items():  # ms/step recall@k expected vs-numpy %limit note
        r = by_key[key]
        assert cells[0] == f"{r['median_ms']:.2f}"
        assert cells[1] == f"{r['mean_recall']:.4f}"
        expected = r["expected_recall"]
        assert cells[2] == ("-" if expected is None else f"{expected:.4f}")
        assert re.fullmatch(r"\d+\.\d\d", cells[0]) and re.fullmatch(r"\d+\.\d\dx", cells[3])
        assert re.fullmatch(r"\d+\.\d% (flops|bw)", cells[4])
    assert rows[("M1", "numpy exact")][3] == "1.00x"
    assert "--tiny: shrunk workloads" in stdout
    # The kernel that ran and the sgemm rate of "% limit" stand right above the table.
    lines = stdout.splitlines()
    caption = lines[next(i for i, line in enumerate(lines) if line.startswith("workload")) - 1]
    kernel, sgemm = report["machine"]["knnmem_kernel"], report["sgemm_gflops"]
    assert caption.startswith(f"knnmem kernel {kernel}; % limit against numpy sgemm {sgemm:.1f} ")


def test_missing_peer_and_matplotlib_are_notes(tiny_run) -> None:
    stdout, report, _ = tiny_run
    for note in (
        "skipped peer faiss-flat: faiss does not import (ImportError: blocked by test_bench)",
        "no plot: matplotlib does not import (ImportError: blocked by test_bench);"
        " pip install matplotlib",
    ):
        assert f"note: {note}" in stdout
        assert note in report["notes"]
    assert not any(m.startswith("faiss") for _, m in table_rows(stdout))


def test_json_fields_and_values(tiny_run) -> None:
    _, report, _ = tiny_run
    assert set(report) == JSON_FIELDS
    args = report["args"]
    assert args["tiny"] is True and args["seed"] == 3 and args["steps"] == STEPS
    assert args["workloads"] == ["M1", "M2"]
    assert set(report["workloads"]) == {"M1", "M2"}
    assert report["workloads"]["M2"]["shape"] == [2, 8]
    assert report["scaling"] == []
    for rate in ("sgemm_gflops", "copy_gbps", "read_gbps"):
        assert report[rate] > 0 and report[rate] == max(report["rates"][rate])
    assert report["machine"]["nproc"] >= 1 and report["machine"]["knnmem_threads"] >= 1
    for r in report["results"]:
        assert set(r) == RESULT_FIELDS, r["method"]
        wl = report["workloads"][r["workload"]]
        assert r["capacity"] == wl["capacity"]
        assert r["queries_per_step"] == wl["queries"] * math.prod(wl["shape"])
        for times in ("step_ms", "add_ms", "search_ms", "recalls"):
            assert len(r[times]) == STEPS, (r["method"], times)
        assert all(t > 0 for t in r["step_ms"] + r["search_ms"]) and r["median_ms"] > 0
        assert all(t >= 0 for t in r["add_ms"])
        assert all(0.0 <= x <= 1.0 for x in r["recalls"]) and 0.0 <= r["mean_recall"] <= 1.0
        assert r["queries_per_s"] > 0 and r["speedup_vs_numpy"] > 0
        assert r["compute_limit_ms"] > 0 and r["bandwidth_limit_ms"] > 0 and r["limit_ms"] > 0
        assert r["limit_kind"] in ("compute", "bandwidth")
        if r["method"].endswith("exact"):
            assert r["mean_recall"] >= 0.99, r
        else:  # knnmem at recall target 0.9: near its expected recall
            assert 0.0 < r["expected_recall"] < 1.0
            assert r["mean_recall"] >= 0.8, r


def test_same_seed_same_recalls_and_the_plot(tiny_run) -> None:
    """A second run with the seed gives the same recalls; with matplotlib it draws the plot."""
    _, first, tmp = tiny_run
    args = ["-m", "knnmem.bench", "--tiny", "--workloads", "M1,M2", "--peers", "numpy"]
    args += ["--seed", "3", "--no-progress", "--json", "again.json", "--plot", "again.png"]
    proc = run(args, tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = json.loads((tmp / "again.json").read_text())
    recalls = {(r["workload"], r["method"]): r["recalls"] for r in again["results"]}
    assert recalls == {(r["workload"], r["method"]): r["recalls"] for r in first["results"]}
    if importlib.util.find_spec("matplotlib") is None:
        assert any(n.startswith("no plot: matplotlib does not import") for n in again["notes"])
    else:
        assert (tmp / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "entry", [["-m", "knnmem.bench"], [str(ROOT / "bench" / "run.py")]], ids=["module", "script"]
)
def test_help_names_the_install_command(entry: list[str], tmp_path: Path) -> None:
    proc = run([*entry, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("usage: python ")
    assert (
        re.search(r"^\s*pip install \.\s", text, re.M) and "python -m knnmem.bench --quick" in text
    )
    assert "no-build-isolation" not in text
    for option in ("--quick", "--workloads", "--peers", "--json", "--plot", "--tiny"):
        assert option in text


def test_bad_output_directory_fails_before_the_run(tmp_path: Path) -> None:
    proc = run(["-m", "knnmem.bench", "--tiny", "--json", "nowhere/out.json"], tmp_path)
    assert proc.returncode == 2 and "--json: no directory" in proc.stderr


def test_the_package_points_nowhere_outside_itself() -> None:
    """No path into the checkout (the wheel has none) and nothing outside the repository."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"\.\./|shared/|DESIGN\.md|sys\.path|__file__|no-build-isolation", text):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {text.strip()}")
    assert not offenders, "\n".join(offenders)
