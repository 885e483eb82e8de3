"""Seeded, resumable token stream for fine-tuning: documents → pieces → shuffled → packed ``seq_len`` blocks.

* Every document of the source (``edgeprune.data.source_texts``: a named set, a .txt/.jsonl path or a folder) is cut
  at whitespace into pieces of about ``piece_chars`` characters (instruction rows stay whole).
* The pieces are shuffled with ``random.Random(seed)``; the first ones (≈ ``eval_frac`` of the pieces, at most
  ``eval_blocks`` blocks) form the **held-out slice** used for evaluation/early stopping and are never trained on.
* Training pieces are tokenized lazily in that order (BOS before the first piece of a document) and packed into
  contiguous blocks of ``seq_len`` tokens; after an epoch they are reshuffled with ``Random(seed + epoch)``.
* The position is one integer (blocks consumed), so a checkpoint restores the stream exactly.
"""
from __future__ import annotations

import random

import torch

from ..data import source_texts
from ..errors import EdgepruneError


def _pieces(text: str, size: int) -> list[str]:
    out, i = [], 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            k = text.rfind("\n", i + size // 2, j)
            k = k if k > 0 else text.rfind(" ", i + size // 2, j)
            j = k + 1 if k > 0 else j
        out.append(text[i:j])
        i = j
    return out


class TokenStream:
    def __init__(self, tokenizer, source: str, seq_len: int, seed: int = 0, piece_chars: int = 4000,
                 eval_frac: float = 0.02, eval_blocks: int = 32):
        texts = [t for t in source_texts(source) if t.strip()]
        if not texts:
            raise EdgepruneError(f"fine-tuning data '{source}' is empty; pass a file or set with text in it")
        total = sum(len(t) for t in texts)
        size = max(200, min(piece_chars, total // 40))
        pieces: list[tuple[bool, str]] = []  # (starts a document, text)
        for t in texts:
            pieces += [(k == 0, p) for k, p in enumerate(_pieces(t, size)) if p.strip()]
        if len(pieces) < 2:
            raise EdgepruneError(f"fine-tuning data '{source}' is too short to hold out an evaluation slice; "
                                 "give more text")
        random.Random(seed).shuffle(pieces)
        self.tok, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        target, ev, n_eval = max(1, round(len(pieces) * eval_frac)), [], 0
        while n_eval < len(pieces) // 2 and len(ev) < eval_blocks * seq_len and (n_eval < target or len(ev) < 2 * seq_len):
            ev += self._ids(True, pieces[n_eval][1])
            n_eval += 1
        self.train_pieces = pieces[n_eval:]
        n = min(eval_blocks, len(ev) // seq_len)
        if n == 0:
            raise EdgepruneError(f"fine-tuning data '{source}' is too short: the held-out slice has fewer than "
                                 f"{seq_len} tokens; give more text or lower --seq-len")
        self.eval_blocks = torch.tensor(ev[: n * seq_len]).view(n, seq_len)
        self.position = 0  # training blocks consumed
        self._epoch, self._next_piece, self._buf = 0, 0, []
        self._order = list(range(len(self.train_pieces)))

    def _ids(self, doc_start: bool, text: str) -> list[int]:
        return (self.bos if doc_start else []) + self.tok(text, add_special_tokens=False).input_ids

    def _fill(self, need: int) -> None:
        while len(self._buf) < need:
            if self._next_piece == len(self._order):
                self._epoch += 1
                self._next_piece = 0
                random.Random(self.seed + self._epoch).shuffle(self._order)
            self._buf += self._ids(*self.train_pieces[self._order[self._next_piece]])
            self._next_piece += 1

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` packed blocks as a LongTensor [B, seq_len]."""
        need = batch_size * self.seq_len
        self._fill(need)
        out = torch.tensor(self._buf[:need]).view(batch_size, self.seq_len)
        del self._buf[:need]
        self.position += batch_size
        return out

    def skip_to(self, position: int) -> None:
        """Advance a fresh stream to ``position`` blocks (used when resuming)."""
        while self.position < position:
            self.next_batch(min(64, position - self.position))
