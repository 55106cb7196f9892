"""Synthetic documents where a kNN memory must be used (numpy only; shared by
examples/torch_memory.py and examples/jax_memory.py).

The tasks cut each document into segments of ``segment`` tokens. A model sees one
segment at a time: its local attention (and a Transformer-XL context, the previous
segment) cannot reach the segments further back, a memory of the document can.

recall: associative recall across segments. Segment 0 writes ``pairs`` key/value pairs
    among filler tokens, each write one position carrying the key and the value together
    (its input is the key's token plus, as a second token at the same position, the
    value's), the middle segments are filler, and the last segment asks for the keys:
    the target at each query position is the value written for that key. Without the
    memory a model can only guess (accuracy 1 / values). The key is what the query
    looks for, and it is already in the write position's input: the memory's keys need
    no training from the layers below, which is what makes the task learnable in
    minutes (a key token followed by its value token is not, see docs/memory.md).

code: synthetic source files. The first segments define functions with random names
    (``def f_123 ( a , b ) :`` and a body); the later segments call them
    (``f_123 ( v_2 , 4 )``, one per line). Which names exist is only in the definitions
    and the earlier calls, many segments back: the memory can retrieve them, the local
    window and the previous segment hold only some. Word
    tokens over a fixed vocabulary (keywords, punctuation, names, small numbers).

repeat: text that repeats a passage from far back. Random words; the last segment
    repeats a passage of segment 0 verbatim, and is scored on it (next-word loss: the
    baseline's is at best log(vocab), a copy's near 0). Optionally (``near``) each middle
    segment's second half repeats a few words of its first half: copies the local
    attention can see, which teach it (and the memory, which shares its projections)
    to copy. Each position's partner is its previous word.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -1  # target of positions without a loss


# -- recall --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recall:
    segment: int = 64
    segments: int = 3  # the first writes, the last asks, the others are filler
    keys: int = 64  # key alphabet
    values: int = 16  # value alphabet: chance accuracy 1 / values
    pairs: int = 32  # pairs written per document (distinct keys)
    fillers: int = 16

    @property
    def vocab(self) -> int:
        return self.keys + self.values + self.fillers

    def tokens(self) -> dict[str, int]:
        """The first id of each kind of token: key (+ key), answer (+ value), filler."""
        return {"key": 0, "answer": self.keys, "filler": self.keys + self.values}


def recall_batch(task: Recall, batch: int, rng: np.random.Generator):
    """(tokens, partners, targets), int64 [batch, segments * segment]: partners is the
    second token of a write position (its value's answer token), IGNORE elsewhere;
    targets IGNORE except at the query positions of the last segment (the answer token
    of the key's value)."""
    if task.pairs > task.segment or task.pairs > task.keys:
        raise ValueError(f"pairs: expected at most segment and keys, got {task.pairs}")
    t, ids = task.segment, task.tokens()
    n = task.segments * t
    tokens = ids["filler"] + rng.integers(0, task.fillers, (batch, n))
    partners = np.full((batch, n), IGNORE, np.int64)
    targets = np.full((batch, n), IGNORE, np.int64)
    for b in range(batch):
        keys = rng.choice(task.keys, task.pairs, replace=False)
        vals = rng.integers(0, task.values, task.pairs)
        where = np.sort(rng.choice(t, task.pairs, replace=False))  # write positions in segment 0
        tokens[b, where] = ids["key"] + keys
        partners[b, where] = ids["answer"] + vals
        asked = rng.integers(0, task.pairs, t)  # every position of the last segment asks
        last = slice(n - t, n)
        tokens[b, last] = ids["key"] + keys[asked]
        targets[b, last] = ids["answer"] + vals[asked]
    return tokens.astype(np.int64), partners, targets


# -- code ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Code:
    segment: int = 64
    segments: int = 9
    define_segments: int = 5  # the definitions fill the first segments
    names: int = 512  # function-name pool (f_0 .. f_511)
    variables: int = 16  # v_0 .. v_15
    numbers: int = 10  # 0 .. 9

    def vocabulary(self) -> list[str]:
        words = "def return ( ) , : = + * - \n <pad>".split(" ")
        words[words.index("\n")] = "\n"
        words += [f"f_{i}" for i in range(self.names)]
        words += [f"v_{i}" for i in range(self.variables)]
        words += [str(i) for i in range(self.numbers)]
        words += [a for a in "abc"]
        return words

    @property
    def vocab(self) -> int:
        return len(self.vocabulary())


def _code_words(task: Code, rng: np.random.Generator) -> tuple[list[str], int]:
    """One document's words, and how many of them are definitions."""
    words: list[str] = []
    defined: list[str] = []
    budget = task.define_segments * task.segment
    args_of = {}
    while True:  # definitions: def f_i ( a , b ) : return a op b
        name = f"f_{rng.integers(task.names)}"
        if name in args_of:
            continue
        nargs = int(rng.integers(1, 4))
        params = list("abc"[:nargs])
        line = ["def", name, "("] + [w for p in params for w in (p, ",")][:-1] + [")", ":"]
        body = ["return", params[0]]
        for p in params[1:]:
            body += [str(rng.choice(["+", "*", "-"])), p]
        line += body + ["\n"]
        if len(words) + len(line) > budget:
            break
        words += line
        defined.append(name)
        args_of[name] = nargs
    words += ["<pad>"] * (budget - len(words))
    n_def = len(words)
    total = task.segments * task.segment
    while len(words) < total:  # calls: f ( x , y )
        name = defined[rng.integers(len(defined))]
        args = []
        for _ in range(args_of[name]):
            args.append(
                f"v_{rng.integers(task.variables)}"
                if rng.random() < 0.5
                else str(rng.integers(task.numbers))
            )
        line = [name, "("]
        line += [w for a in args for w in (a, ",")][:-1] + [")", "\n"]
        words += line
    return words[:total], n_def


def code_batch(task: Code, batch: int, rng: np.random.Generator):
    """(tokens, partners, targets), int64 [batch, segments * segment]: next-word
    prediction (targets are the tokens shifted by one; the last position and padding
    are IGNORE; no second tokens: partners all IGNORE)."""
    index = {w: i for i, w in enumerate(task.vocabulary())}
    n = task.segments * task.segment
    tokens = np.zeros((batch, n), np.int64)
    for b in range(batch):
        words, _ = _code_words(task, rng)
        tokens[b] = [index[w] for w in words]
    targets = np.full((batch, n), IGNORE, np.int64)
    targets[:, :-1] = tokens[:, 1:]
    targets[targets == index["<pad>"]] = IGNORE
    return tokens, np.full_like(tokens, IGNORE), targets


def code_sample(task: Code, seed: int = 0, words: int = 60) -> str:
    """The start of a document and of its calls, as text (for a look at the data)."""
    w, n_def = _code_words(task, np.random.default_rng(seed))
    text = lambda ws: " ".join(ws).replace(" \n ", "\n")  # noqa: E731
    return text(w[:words]) + "\n...\n" + text(w[n_def : n_def + words])


# -- repeat --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Repeat:
    segment: int = 32
    segments: int = 5  # the last repeats a passage of the first; the others are new text
    vocab: int = 128  # word alphabet: the baseline's loss on a repeat is about log(vocab)
    passage: int = 32  # length of the repeated passage (at most segment)
    near: int = 0  # >0: each middle segment's second half repeats `near` words of its first


def repeat_batch(task: Repeat, batch: int, rng: np.random.Generator):
    """(tokens, partners, targets), int64 [batch, segments * segment]: random words;
    the last segment starts with a verbatim copy of ``passage`` consecutive words of
    segment 0 (at a random offset) and continues with new words. partners is each
    position's previous word (IGNORE at the document start): the input of a position
    also says which word came before it, what a copy looks up. targets are the next
    words inside the repeated passage (the words that a copy predicts), IGNORE
    elsewhere."""
    if not 2 <= task.passage <= task.segment:
        raise ValueError(f"passage: expected 2 .. segment, got {task.passage}")
    t, n = task.segment, task.segments * task.segment
    tokens = rng.integers(0, task.vocab, (batch, n))
    targets = np.full((batch, n), IGNORE, np.int64)
    start = n - t  # the repeat opens the last segment
    half = t // 2
    if task.near and not 2 <= task.near <= half:
        raise ValueError(f"near: expected 0 or 2 .. segment / 2, got {task.near}")
    for b in range(batch):
        for s in range(1, task.segments - 1) if task.near else ():
            src = s * t + int(rng.integers(0, half - task.near + 1))
            dst = s * t + half + int(rng.integers(0, t - half - task.near + 1))
            tokens[b, dst : dst + task.near] = tokens[b, src : src + task.near]
            targets[b, dst : dst + task.near - 1] = tokens[b, dst + 1 : dst + task.near]
        src = int(rng.integers(0, t - task.passage + 1))
        tokens[b, start : start + task.passage] = tokens[b, src : src + task.passage]
        targets[b, start : start + task.passage - 1] = tokens[b, start + 1 : start + task.passage]
    partners = np.full((batch, n), IGNORE, np.int64)
    partners[:, 1:] = tokens[:, :-1]
    return tokens.astype(np.int64), partners, targets


# -- plots (optional) -------------------------------------------------------------------------


def plot(curves: dict[str, list[tuple[int, float]]], ylabel: str, title: str, path: str) -> bool:
    """Writes a PNG of the curves {label: [(step, value), ...]}; False (and a message)
    where matplotlib is not installed (pip install knnmem[examples])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no plot written to {path})")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, ms=3)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return True
