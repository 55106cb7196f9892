"""The memory wins: short, seeded training runs of examples/torch_memory.py and
examples/jax_memory.py on associative recall across segments (the memory model far
above chance, the identical baseline at chance) and on text repeating a passage from
far back (the memory model's loss on the repeat far below the baseline's and a uniform
guess's); the data asks for what was written; the plots are optional."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# a small recall configuration: 16 pairs, 8 values (chance 0.125), 3 segments of 32
SMALL = dict(dim=64, segment=32, pairs=16, values=8, lr=1e-2, batch=16, eval_batch=32)


def load(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_recall_data_asks_for_what_was_written() -> None:
    tasks = load("memory_tasks")
    task = tasks.Recall(segment=32, pairs=16, values=8)
    tokens, partners, targets = tasks.recall_batch(task, 4, np.random.default_rng(0))
    ids = task.tokens()
    for b in range(4):
        written = partners[b] >= 0
        assert written.sum() == 16 and not written[32:].any()  # all writes in segment 0
        value_of = dict(zip(tokens[b, written], partners[b, written]))
        asked = targets[b] >= 0
        assert asked.sum() == 32 and asked[64:].all()  # the last segment asks
        for key, answer in zip(tokens[b, asked], targets[b, asked]):
            assert value_of[key] == answer and ids["answer"] <= answer < ids["filler"]


def test_torch_recall_memory_beats_baseline(tmp_path) -> None:
    pytest.importorskip("torch")
    ex = load("torch_memory")
    cfg = ex.Config(task="recall", steps=250, eval_every=250, threads=1, **SMALL)
    mem = ex.train(cfg, log=None)["final"]["accuracy"]
    base = ex.train(ex.dataclasses.replace(cfg, memory=False), log=None)["final"]["accuracy"]
    assert base < 0.2  # chance is 1/8: nothing in reach says what was written
    assert mem > 0.45 and mem > base + 0.3, (mem, base)


def test_repeat_data_repeats_an_early_passage() -> None:
    tasks = load("memory_tasks")
    task = tasks.Repeat(segment=32, segments=4, vocab=64, passage=32, near=12)
    tokens, partners, targets = tasks.repeat_batch(task, 4, np.random.default_rng(0))
    for b in range(4):
        last = tokens[b, 96:]
        # the last segment repeats segment 0, out of reach of its XL context
        assert (tokens[b, :32] == last).all() and not (tokens[b, 64:96] == last).all()
        assert (partners[b, 1:] == tokens[b, :-1]).all() and partners[b, 0] == -1
        scored = np.flatnonzero(targets[b] >= 0)
        far = scored[scored >= 96]
        assert list(far) == list(range(96, 127))  # the repeat, less its last word
        assert (targets[b, far] == tokens[b, far + 1]).all()
        for s in (1, 2):  # a nearby repeat of 12 words in each middle segment
            near = scored[(scored >= 32 * s) & (scored < 32 * s + 32)]
            assert len(near) == 11 and near[0] >= 32 * s + 16
            assert (targets[b, near] == tokens[b, near + 1]).all()
        assert not (targets[b, :32] >= 0).any()


def test_torch_repeat_memory_beats_baseline() -> None:
    """The far repeat is only in the memory: the memory model's loss there well below
    the baseline's and below a uniform guess (measured, seeds 0/1/2, 300 steps: memory
    2.66/2.69/2.64 nats/word, baseline 4.61/4.53/4.18, uniform 4.16)."""
    pytest.importorskip("torch")
    ex = load("torch_memory")
    cfg = ex.Config(
        task="repeat", steps=300, eval_every=300, threads=1, batch=16, eval_batch=32, **ex.REPEAT
    )
    mem = ex.train(cfg, log=None)["final"]["loss"]
    base = ex.train(ex.dataclasses.replace(cfg, memory=False), log=None)["final"]["loss"]
    uniform = np.log(cfg.vocab)
    assert base > uniform - 0.2  # nothing in reach says what comes next
    assert mem < uniform - 1.0 and mem < base - 1.0, (mem, base)


def test_jax_repeat_memory_beats_baseline() -> None:
    """As the torch test (lr 3e-3; measured, seeds 0/1/2, 300 steps: memory
    2.67/2.75/2.70 nats/word, baseline 4.57/4.55/4.53, uniform 4.16)."""
    pytest.importorskip("jax")
    ex = load("jax_memory")
    cfg = ex.Config(task="repeat", steps=300, eval_every=300, batch=16, eval_batch=32, **ex.REPEAT)
    mem = ex.train(cfg, log=None)["final"]["loss"]
    base = ex.train(ex.dataclasses.replace(cfg, memory=False), log=None)["final"]["loss"]
    uniform = np.log(cfg.vocab)
    assert base > uniform - 0.2
    assert mem < uniform - 1.0 and mem < base - 1.0, (mem, base)


def test_jax_recall_memory_beats_baseline() -> None:
    pytest.importorskip("jax")
    ex = load("jax_memory")
    cfg = ex.Config(task="recall", steps=300, eval_every=300, **SMALL)
    mem = ex.train(cfg, log=None)["final"]["accuracy"]
    base = ex.train(ex.dataclasses.replace(cfg, memory=False), log=None)["final"]["accuracy"]
    assert base < 0.2
    assert mem > 0.45 and mem > base + 0.3, (mem, base)


def test_plot_is_optional(tmp_path, capsys) -> None:
    tasks = load("memory_tasks")
    path = tmp_path / "curves.png"
    curves = {"memory": [(1, 0.5), (2, 0.9)], "baseline": [(1, 0.1), (2, 0.12)]}
    wrote = tasks.plot(curves, "accuracy", "test", str(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert (
            not wrote
            and not path.exists()
            and "matplotlib is not installed" in capsys.readouterr().out
        )
    else:
        assert wrote and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
