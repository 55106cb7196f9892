"""A short run of examples/torch_memorizing.py (integration test): a tiny model
trains on real text (Python's standard library) with MemorizingAttention; the
loss is finite and falls, memories fill and are cleared at document boundaries;
and the faiss-to-knnmem switch shown in docs/torch.md runs as written."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    path = ROOT / "examples" / "torch_memorizing.py"
    spec = importlib.util.spec_from_file_location("torch_memorizing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_short_training_run() -> None:
    ex = load_example()
    cfg = ex.Config(
        steps=12,
        batch=2,
        segment=32,
        dim=32,
        layers=2,
        heads=2,
        capacity=128,
        k=8,
        lr=1e-2,
        warmup=2,
        max_files=30,
        max_doc_bytes=200,  # short documents: several resets within the run
        eval_segments=4,
        log_every=0,
    )
    try:
        docs = ex.load_documents(cfg)
    except RuntimeError as e:  # a Python installed without its .py sources
        pytest.skip(str(e))
    result = ex.train(cfg, docs)
    losses = np.array(result["losses"])
    assert np.isfinite(losses).all() and abs(losses[0] - np.log(256)) < 0.3  # uniform at start
    assert losses[-3:].mean() < losses[:2].mean() - 1.0
    assert np.isfinite(result["bits_per_byte"])
    assert result["resets"] > 0
    (written,) = result["written"]  # the one memory layer: [batch, heads]
    # Reset at every document start: a memory holds the segments of one document
    # (documents <= 200 bytes: at most 6 segments of 32).
    assert (written > 0).all() and (written <= 192).all() and (written % 32 == 0).all()
    model = result["model"]
    assert [b.attn.memory is not None for b in model.blocks] == [True, False]


def docs_blocks(marker: str) -> list[str]:
    text = (ROOT / "docs" / "torch.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]


def test_docs_knn_memory_example_runs() -> None:
    (block,) = docs_blocks("mem = kt.KNNMemory(shape=")
    namespace: dict = {}
    exec(compile(block, "docs/torch.md", "exec"), namespace)
    assert namespace["res"].keys.shape == (4, 8, 256, 32, 64)
    assert namespace["mem"].count[0].sum() == 0 and (namespace["mem"].count[1:] == 256).all()


def run_memory_list(block: str, name: str):
    """Runs a KNNMemoryList of docs/torch.md through add / search / clear."""
    namespace: dict = {}
    exec(compile(block, f"docs/torch.md ({name})", "exec"), namespace)
    memories = namespace["KNNMemoryList"](dim=16, max_memories=64, num_memories=3)
    torch.manual_seed(0)
    kv = torch.randn(3, 10, 2, 16)  # [batch, tokens, (key, value), dim]
    kv[:, :, 0] = torch.nn.functional.normalize(kv[:, :, 0], dim=-1)
    memories.add(kv)
    found, mask = memories.search(kv[:, :, 0], topk=4)
    assert found.shape == (3, 10, 4, 2, 16) and mask.all()
    assert torch.equal(found[:, :, 0], kv)  # each unit key finds itself (and its value)
    result = memories.search(torch.randn(3, 7, 16), topk=4)
    memories.clear(torch.tensor([True, False, False]))
    _, mask = memories.search(kv[:, :, 0], topk=4)
    assert not mask[0].any() and mask[1:].all()
    return result


def switch_blocks() -> dict[str, str]:
    blocks = docs_blocks("class KNNMemoryList")
    named = {("knnmem" if "import knnmem" in b else "faiss"): b for b in blocks}
    assert set(named) == {"knnmem", "faiss"}, "docs/torch.md lost its faiss -> knnmem example"
    return named


def test_docs_faiss_switch_knnmem_version_runs() -> None:
    run_memory_list(switch_blocks()["knnmem"], "knnmem")


def test_docs_faiss_switch_gives_the_faiss_answers() -> None:
    """Where faiss is installed, its version in the docs gives the same answers
    (10 rows < L = 15 bins for k=4: the knnmem search is exact)."""
    pytest.importorskip("faiss")
    blocks = switch_blocks()
    want = run_memory_list(blocks["faiss"], "faiss")
    got = run_memory_list(blocks["knnmem"], "knnmem")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_readme_torch_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "knnmem.torch" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    counts = namespace["layer"].memory.count
    assert counts.tolist() == [[128] * 4, [384] * 4]
