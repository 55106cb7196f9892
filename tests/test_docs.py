"""The documentation runs as written: every ```python block of README.md and docs/*.md.

How the blocks run
------------------
* Every block fenced as ```python is executed. A block that is not meant to run (shell
  commands, output, pseudo-code) is fenced as ```text, ```bash, ```console and so on.
* The blocks of one file run in order in one fresh Python interpreter (a subprocess) and
  share one namespace, as for a reader who pastes them top to bottom into one session: a
  block may use what an earlier block of the same file defined, and no file sees the names
  of another. A block must not depend on a block that is skipped (below).
* The interpreter runs with `__name__ == "__main__"` in a fresh temporary directory, so a
  block that writes files leaves nothing in the repository.
* The blocks of a file get KNNMEM_DOCS_TIMEOUT seconds in all (default 300). Shortly before
  that, faulthandler prints the stack of every thread and ends the interpreter (then the
  whole process group is killed at the limit): the block that was running fails as hung,
  with that stack, and the blocks after it fail as not reached.
* Each block is one test, named by its file and the line of its opening fence
  (`test_block[FILE:LINE]`); tracebacks give lines of the markdown file.
* Some blocks also have results checked here (CHECKS).

Markers
-------
An HTML comment on the line right before the opening fence (not shown when the markdown
is rendered) changes how its block runs:

    <!-- skip: REASON -->               never run; reported as a skip, with REASON
    <!-- needs: REQUIREMENT[, ...] -->  run only where every requirement holds, else skip:
        cuda         a usable GPU and knnmem built with its CUDA kernels
                     (knnmem.cuda.available())
        N devices    at least N JAX devices (jax.device_count() >= N; on a CPU,
                     XLA_FLAGS=--xla_force_host_platform_device_count=N provides them)
        NAME         an importable module NAME (for instance faiss)

A marker anywhere else, or one that names an unknown requirement, fails
test_markers_sit_on_python_blocks.

The other tests check that links between the documents resolve (files and headings) and
that no document sends a reader to ../shared, which a clone of the repository lacks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = float(os.environ.get("KNNMEM_DOCS_TIMEOUT", "300"))

# Python expressions that must hold in a file's namespace after one of its blocks:
# (file, 0-based index of the block among the file's python blocks) -> expressions.
CHECKS: dict[tuple[str, int], list[str]] = {
    ("README.md", 0): ["res.keys.shape == (2, 8, 512, 32, 64)"],
}

FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*(skip|needs)\s*:\s*(.*?)\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*(skip|needs)\b")
DEVICES = re.compile(r"^(\d+)\s+devices?$")
MODULE = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    index: int  # among the file's python blocks
    source: str
    marker: tuple[str, str] | None = None
    checks: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The python blocks of a markdown file, and the problems with its markers."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    attached: set[int] = set()  # line numbers of markers that sit on a python block
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = re.match(r"^ {0,3}(`{3,}|~{3,})\s*$", lines[j])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            text = lines[j]
            body.append(text[min(indent, len(text) - len(text.lstrip(" "))) :])
            j += 1
        if info == "python":
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            if marker:
                attached.add(i)  # the marker's 1-based line number is i
            index = len(blocks)
            blocks.append(
                Block(
                    rel,
                    i + 1,
                    index,
                    "\n".join(body) + "\n",
                    (marker.group(1), marker.group(2)) if marker else None,
                    CHECKS.get((rel, index), []),
                )
            )
        i = j + 1
    problems = []
    for n, text in enumerate(lines, start=1):
        if ANY_MARKER.search(text) and n not in attached:
            problems.append(f"{rel}:{n}: marker not on the line right before a ```python fence")
    for b in blocks:
        if b.marker and b.marker[0] == "needs":
            for req in requirements(b.marker[1]):
                if req != "cuda" and not DEVICES.match(req) and not MODULE.match(req):
                    problems.append(f"{b.id}: unknown requirement {req!r}")
    return blocks, problems


def requirements(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


PARSED = {path: parse(path) for path in DOCS}
BLOCKS = [b for blocks, _ in PARSED.values() for b in blocks]


def unmet(req: str) -> str | None:
    """Why a `needs:` requirement does not hold here, or None when it does."""
    if req == "cuda":
        import knnmem.cuda

        return None if knnmem.cuda.available() else f"cuda: {knnmem.cuda.unavailable_reason()}"
    m = DEVICES.match(req)
    if m:
        if importlib.util.find_spec("jax") is None:
            return f"{req}: jax is not installed"
        import jax

        have = jax.device_count()
        if have >= int(m.group(1)):
            return None
        hint = f"XLA_FLAGS=--xla_force_host_platform_device_count={m.group(1)} runs it on CPU"
        return f"{req}: jax.device_count() is {have} ({hint})"
    try:
        found = importlib.util.find_spec(req) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        found = False
    return None if found else f"{req}: module {req} is not installed"


def skip_reason(block: Block) -> str | None:
    if block.marker is None:
        return None
    kind, text = block.marker
    if kind == "skip":
        return f"{block.id}: marked skip: {text}"
    missing = [why for why in map(unmet, requirements(text)) if why]
    return f"{block.id}: needs {'; '.join(missing)}" if missing else None


# Runs in the subprocess: blocks (JSON) on stdin; one JSON line per event to argv[1].
RUNNER = r"""
import faulthandler, json, sys, traceback
blocks = json.load(sys.stdin)
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)
events = open(sys.argv[1], "a")
def event(**kw):
    sys.stdout.flush(); sys.stderr.flush()
    events.write(json.dumps(kw) + "\n"); events.flush()
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
for b in blocks:
    print(f"\n===== {b['id']} =====", flush=True)
    event(id=b["id"], event="start")
    try:
        exec(compile("\n" * b["line"] + b["source"], b["path"], "exec"), namespace)
        for check in b["checks"]:
            if not eval(check, namespace):
                raise AssertionError(f"after this block, `{check}` is false")
    except BaseException as e:  # SystemExit too; the traceback starts in the block
        tb = e.__traceback__.tb_next or e.__traceback__
        event(id=b["id"], event="fail", error="".join(traceback.format_exception(type(e), e, tb)))
    else:
        event(id=b["id"], event="ok")
"""


def run_file(path: str, blocks: list[Block], workdir: Path) -> dict[str, Any]:
    """Runs the given blocks of one file in a fresh interpreter; per block id its outcome
    ("ok", "fail", "hung or ended the interpreter", "not reached"), error text and output."""
    events_path = workdir / "events.jsonl"
    payload = json.dumps(
        [
            {
                "id": b.id,
                "path": str(ROOT / b.path),
                "line": b.line,
                "source": b.source,
                "checks": b.checks,
            }
            for b in blocks
        ]
    )
    dump_after = max(TIMEOUT - 15, TIMEOUT * 0.9)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(events_path), str(dump_after)],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MPLBACKEND": "Agg"},
        start_new_session=True,  # so a hang is killed with everything it started
        text=True,
    )
    started = time.monotonic()
    try:
        output, _ = proc.communicate(payload, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
        output, _ = proc.communicate()
    timed_out = time.monotonic() - started >= dump_after
    sections = re.split(r"\n===== (\S+) =====\n", "\n" + output)
    section_of = dict(zip(sections[1::2], sections[2::2]))
    outcome: dict[str, Any] = {}
    if events_path.exists():
        for text in events_path.read_text().splitlines():
            e = json.loads(text)
            outcome[e["id"]] = {"status": e["event"], "error": e.get("error", "")}
    ended = f"timed out after {dump_after:.0f} s" if timed_out else f"exit status {proc.returncode}"
    for b in blocks:
        if b.id not in outcome:
            outcome[b.id] = {"status": "not reached", "error": f"the interpreter ended ({ended})"}
        elif outcome[b.id]["status"] == "start":  # the interpreter ended inside this block
            outcome[b.id] = {
                "status": "hung or ended the interpreter",
                "error": f"no result: the interpreter ended in this block ({ended}; the"
                f" blocks of a file get {TIMEOUT:.0f} s in all, KNNMEM_DOCS_TIMEOUT)",
            }
        outcome[b.id]["output"] = section_of.get(b.id, "")
    return outcome


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory):
    """Per file, run once on first use: the outcome of each block that runs here."""
    cache: dict[str, dict[str, Any]] = {}

    def get(path: str) -> dict[str, Any]:
        if path not in cache:
            runnable = [b for b in BLOCKS if b.path == path and skip_reason(b) is None]
            workdir = tmp_path_factory.mktemp(Path(path).stem)
            cache[path] = run_file(path, runnable, workdir) if runnable else {}
        return cache[path]

    return get


def test_readme_has_python_examples() -> None:
    assert any(b.path == "README.md" for b in BLOCKS), "README.md has no ```python block"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block(block: Block, outcomes) -> None:
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    results = outcomes(block.path)
    result = results[block.id]
    if result["status"] == "ok":
        return
    earlier = [
        b.id
        for b in BLOCKS
        if b.path == block.path
        and b.index < block.index
        and results.get(b.id, {}).get("status") not in (None, "ok")
    ]
    note = (
        f"\n(an earlier block of this file did not succeed: {', '.join(earlier)})"
        if earlier
        else ""
    )
    output = result["output"].strip()
    shown = "\n".join(output.splitlines()[-60:])
    pytest.fail(
        f"{block.id}: {result['status']}{note}\n{result['error']}"
        + (f"\n--- output of the block (last 60 lines) ---\n{shown}" if shown else ""),
        pytrace=False,
    )


def test_markers_sit_on_python_blocks() -> None:
    problems = [p for _, found in PARSED.values() for p in found]
    assert not problems, "\n".join(problems)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    found: set[str] = set()
    in_fence = False
    for text in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(text):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^#{1,6} ", text):
            slug = re.sub(r"[^\w\- ]", "", text.lstrip("#").strip().lower()).replace(" ", "-")
            base, n = slug, 1
            while slug in found:  # repeated headings get -1, -2, ...
                slug, n = f"{base}-{n}", n + 1
            found.add(slug)
    return found


def test_links_between_documents_resolve() -> None:
    broken = []
    for path in DOCS:
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # a URL
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_document_points_outside_the_repository() -> None:
    # ../shared holds the team's internal notes; a clone of the repository lacks it.
    offenders = []
    for path in [*DOCS, ROOT / "bench" / "run.py"]:
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"\.\./shared|shared/DESIGN|\bDESIGN\.md", text):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {text.strip()}")
    assert not offenders, "\n".join(offenders)
