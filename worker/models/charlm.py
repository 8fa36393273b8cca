"""A character-level language model: the previous `context` characters predict the next one."""
from __future__ import annotations

import numpy as np

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import Model, dense, dense_params, meta_get


class CharLM(Model):
    """Embeds each of the `context` previous characters (``embed.table``, by gather), joins the
    embeddings into one vector, applies a tanh layer of width ``hidden[0]`` (``hidden``) and a
    softmax over the vocabulary (``output``).

    Inputs are integer ids of shape (n, context); labels are the ids of the next characters.
    """

    name = "charlm"
    tables = frozenset({"embed.table"})

    def __init__(self, cfg, data_meta):
        super().__init__(cfg, data_meta)
        self.vocab_size = int(meta_get(data_meta, "vocab_size", self.num_classes))
        self.num_classes = self.vocab_size
        self.context, self.embed_dim, self.width = cfg.context, cfg.embed_dim, cfg.hidden[0]

    def init_params(self, rng):
        table = (rng.standard_normal((self.vocab_size, self.embed_dim)) * 0.1).astype(np.float32)
        params = {"embed.table": table}
        params.update(dense_params("hidden", rng, self.context * self.embed_dim, self.width, relu=False))
        params.update(dense_params("output", rng, self.width, self.vocab_size, relu=False))
        return params

    def logits(self, params, x, training: bool = False, rng=None):
        emb = ops.gather(params["embed.table"], x)  # (n, context, embed_dim)
        joined = ops.reshape(emb, (-1, self.context * self.embed_dim))  # concatenation, as one view
        return dense(params, "output", ops.tanh(dense(params, "hidden", joined)))

    def sample(self, params: dict, rng: np.random.Generator, prime, length: int,
               temperature: float = 0.6, vocab=None) -> str:
        """`length` new characters following `prime` (a string over `vocab`, or a list of ids).

        Each character is drawn from softmax(logits / temperature); contexts shorter than
        `context` are left-padded with id 0. Returns only the new characters.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if vocab is None:
            raise ValueError("sample needs the vocabulary (the characters, in id order)")
        window = [0] * self.context + _encode(prime, vocab)
        out = []
        for _ in range(length):
            logits = self.logits(params, np.array([window[-self.context:]])).value[0]
            probs = ops.softmax(logits.astype(np.float64) / temperature).value
            nxt = min(int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum())), len(probs) - 1)
            window.append(nxt)
            out.append(vocab[nxt])
        return "".join(out)


def _encode(prime, vocab) -> list[int]:
    if not isinstance(prime, str):
        return [int(i) for i in prime]
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(prime) - set(index))
    if unknown:
        raise ValueError(f"prime has characters outside the vocabulary: {unknown!r}")
    return [index[c] for c in prime]
