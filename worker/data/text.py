"""Character-level text for the char LM: a vocabulary, encoding, and (context -> next char) examples.

The default text ships with every Python: the help topics of `pydoc_data.topics` (about 465,000
characters in 3.11), joined in sorted key order so every process builds the same corpus. If a
stripped Python lacks them, the source of a few pure-Python stdlib modules is used instead. A
file given as ``data.text`` replaces both.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

import numpy as np

from asyncps.errors import DataError

UNKNOWN = "\ufffd"  # id 0: every character outside printable ASCII and newline
ALLOWED = frozenset(map(chr, range(32, 127))) | {"\n"}
TEST_FRACTION = 0.1
_FALLBACK_MODULES = ("argparse", "textwrap", "string", "difflib", "fractions")


class Vocab:
    """Id <-> character maps; id 0 is `UNKNOWN`, the others the sorted characters of the corpus."""

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = [UNKNOWN] + sorted(set(chars) - {UNKNOWN})
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """The vocabulary of `text`, restricted to printable ASCII and newline."""
        return cls(set(text) & ALLOWED)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of `text`; characters not in the vocabulary map to 0 (`UNKNOWN`)."""
        return np.fromiter((self._ids.get(c, 0) for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        """The string of `ids` (for sampling)."""
        return "".join(self.chars[int(i)] for i in ids)


def read_text(path: str | Path | None = None) -> str:
    """The corpus: the file at `path`, else Python's own help topics, else stdlib sources."""
    if path is not None:
        return _read_file(Path(path))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return _stdlib_sources()
    return "\n".join(topics[key] for key in sorted(topics))


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path}: no such text file (data.text)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read text file data.text ({exc.strerror})") from None


def _stdlib_sources() -> str:
    texts = []
    for name in _FALLBACK_MODULES:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            texts.append(Path(spec.origin).read_text(encoding="utf-8", errors="replace"))
    if not texts:
        raise DataError("this Python ships neither pydoc_data nor stdlib sources; set data.text to a text file")
    return "\n".join(texts)


def make_examples(ids: np.ndarray, context: int, where: str = "text") -> tuple[np.ndarray, np.ndarray]:
    """Every window of `context` ids (int64, (n, context)) and the id that follows it (int64, (n,))."""
    if len(ids) <= context:
        raise DataError(f"{where}: too short, {len(ids)} characters for context {context} (need more than {context})")
    windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], context)
    return np.ascontiguousarray(windows), ids[context:].copy()


def load_charlm(path: str | Path | None = None, context: int = 8, test_fraction: float = TEST_FRACTION
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Vocab]:
    """``(x_train, y_train, x_test, y_test, vocab)`` from the corpus.

    The last `test_fraction` of the text is held out before windows are cut, so no test target
    is a training target.
    """
    text = read_text(path)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    split = int(len(ids) * (1 - test_fraction))
    where = str(path) if path is not None else "the default corpus"
    x_train, y_train = make_examples(ids[:split], context, f"{where} (training part)")
    x_test, y_test = make_examples(ids[split:], context, f"{where} (held-out last {test_fraction:.0%})")
    return x_train, y_train, x_test, y_test, vocab
