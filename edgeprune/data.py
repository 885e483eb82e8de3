"""Text sources: evaluation texts (perplexity protocols) and seeded calibration samples.

Named sets resolve under the shared data folder (``$EDGEPRUNE_DATA`` or ``../shared/data``):

* ``wikitext2`` — evaluation: WikiText-2 raw **test**, rows as the HF dataset has them (each line keeps its
  newline, blank lines are empty rows), joined by ``"\\n\\n"`` (LLM-Pruner's protocol). Calibration: the
  tokenized **valid** split (the train split is not available; calibrating on test would leak).
* ``ptb`` — evaluation: PTB test, stripped sentences joined by ``"\\n\\n"``. Calibration: PTB valid.
* ``gutenberg`` — calibration / fine-tuning: the 96-book corpus **minus** the held-back tail.
* ``heldout`` — evaluation only: the reference model's in-domain held-back text (pg98 from character 529,111,
  then all of pg99; books joined in sorted order, each followed by ``"\\n"``). Never used for calibration.

Any other value is a path: a ``.txt`` file, a ``.jsonl`` file (fields ``text``, or alpaca-style
``instruction``/``input``/``output``), or a directory of ``.txt`` files.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import torch

from .errors import EdgepruneError
from .paths import data_dir

HELDOUT_BOOK, HELDOUT_START, HELDOUT_LAST = "pg98_", 529_111, "pg99_"
EVAL_SETS = ("wikitext2", "ptb", "heldout")
CALIB_SETS = ("wikitext2", "ptb", "gutenberg")


MAX_TEXT_BYTES = 4 << 30   # a text source is read whole: refuse what could not be (and /dev/zero-like streams)


def _read(p: Path) -> str:
    if p.exists() and not p.is_file():
        raise EdgepruneError(f"{p} is not a regular file (a device, FIFO, socket or folder); pass a text file")
    if not p.is_file():
        raise EdgepruneError(f"data file {p} not found; check EDGEPRUNE_SHARED / EDGEPRUNE_DATA or pass a path")
    if p.stat().st_size > MAX_TEXT_BYTES:
        raise EdgepruneError(f"{p} is {p.stat().st_size / 2**30:.1f} GiB, more than the {MAX_TEXT_BYTES >> 30} GiB a "
                             "text source may have; pass a smaller sample of it")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgepruneError(f"{p} is not UTF-8 text (byte {e.start}); convert it with iconv -t UTF-8") from None


def _books() -> list[Path]:
    d = data_dir() / "gutenberg_books"
    books = sorted(d.glob("*.txt"))
    if not books:
        raise EdgepruneError(f"no books under {d}; check EDGEPRUNE_SHARED")
    return books


@lru_cache(maxsize=8)
def ppl_text(name: str) -> str:
    """The evaluation text of a named set, exactly as the protocol joins it."""
    d = data_dir()
    if name == "wikitext2":
        lines = _read(d / "wikitext-2" / "raw" / "wiki.test.raw").split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        return "\n\n".join("" if not l.strip() else l + "\n" for l in lines)
    if name == "ptb":
        return "\n\n".join(l.strip() for l in _read(d / "ptb" / "ptb.test.txt").splitlines())
    if name == "heldout":
        books = _books()
        tail = next(b for b in books if b.name.startswith(HELDOUT_BOOK))
        last = next(b for b in books if b.name.startswith(HELDOUT_LAST))
        return _read(tail)[HELDOUT_START:] + "\n" + _read(last) + "\n"
    raise EdgepruneError(f"unknown evaluation set '{name}'; use one of {', '.join(EVAL_SETS)}")


def _jsonl_texts(p: Path) -> list[str]:
    out = []
    for i, line in enumerate(_read(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EdgepruneError(f"{p} line {i} is not valid JSON; fix or remove that row") from None
        if not isinstance(row, dict):
            raise EdgepruneError(f"{p} line {i} is not a JSON object; each row needs 'text' or 'instruction'/'output'")
        if "text" in row:
            out.append(str(row["text"]))
        elif "instruction" in row and "output" in row:
            inp = f"\n\n### Input:\n{row['input']}" if row.get("input") else ""
            out.append(f"### Instruction:\n{row['instruction']}{inp}\n\n### Response:\n{row['output']}")
        else:
            raise EdgepruneError(f"{p} line {i} has neither 'text' nor 'instruction'/'output' fields; add a 'text' "
                                 "field or fix that row")
    return out


def source_texts(source: str) -> list[str]:
    """Documents of a calibration/fine-tuning source (named set or path). Never includes the held-back text. A path
    needs no shared data folder."""
    if source in CALIB_SETS:
        d = data_dir()
    if source == "gutenberg":
        texts = []
        for b in _books():
            t = _read(b)
            if b.name.startswith(HELDOUT_BOOK):
                t = t[:HELDOUT_START]
            elif b.name.startswith(HELDOUT_LAST):
                continue
            texts.append(t)
        return texts
    if source == "wikitext2":
        return [_read(d / "wikitext-2" / "tokenized" / "wiki.valid.tokens")]
    if source == "ptb":
        return [_read(d / "ptb" / "ptb.valid.txt")]
    if source in ("heldout",):
        raise EdgepruneError("the held-back text is for evaluation only; calibrate on gutenberg, wikitext2, ptb or a file")
    p = Path(source)
    if p.exists() and not p.is_file() and not p.is_dir():
        raise EdgepruneError(f"calibration source {p} is not a regular file (a device, FIFO or socket); pass a "
                             "text file, a .jsonl file, a folder of them or a named set")
    if p.is_dir():
        files = sorted(p.glob("*.txt")) + sorted(p.glob("*.jsonl"))
        if not files:
            raise EdgepruneError(f"{p} holds no .txt or .jsonl files; pass a text file, a jsonl file or a named set")
        return [t for f in files for t in (_jsonl_texts(f) if f.suffix == ".jsonl" else [_read(f)])]
    if not p.exists():
        raise EdgepruneError(f"calibration source '{source}' is neither a named set ({', '.join(CALIB_SETS)}) "
                             "nor an existing file; pass an existing .txt/.jsonl path or a named set")
    return _jsonl_texts(p) if p.suffix == ".jsonl" else [_read(p)]


def calibration_ids(tokenizer, source: str, n_samples: int = 128, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of exactly ``seq_len`` tokens drawn at seeded random offsets: LongTensor [N, L].

    Each window starts with BOS (as a model sees a document start), then ``seq_len-1`` text tokens.
    """
    if n_samples <= 0 or seq_len < 8:
        raise EdgepruneError(f"calibration needs --calib-samples >= 1 and --calib-len >= 8 (got {n_samples}, "
                             f"{seq_len}); raise them")
    texts = [t for t in source_texts(source) if t.strip()]
    if not texts:
        raise EdgepruneError(f"calibration source '{source}' is empty; pass a file with text in it")
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    need = seq_len - len(bos)
    weights = [len(t) for t in texts]
    out, tries = [], 0
    while len(out) < n_samples:
        tries += 1
        if tries > n_samples * 20:
            raise EdgepruneError(f"calibration source '{source}' is too short for {n_samples} samples of {seq_len} "
                                 "tokens; give more text or lower --calib-samples/--calib-len")
        t = rng.choices(texts, weights=weights)[0]
        span = need * 12
        start = rng.randrange(0, max(1, len(t) - span))
        ids = tokenizer(t[start:start + span], add_special_tokens=False).input_ids
        if start > 0:
            ids = ids[1:]  # first token may be a partial word
        if len(ids) < need:
            if len(t) <= span and len(texts) == 1 and n_samples > 0:
                continue
            continue
        out.append(bos + ids[:need])
    return torch.tensor(out, dtype=torch.long)


def eval_ids(tokenizer, name: str) -> torch.Tensor:
    """Whole evaluation text tokenized once (BOS at the start only), LLM-Pruner's protocol: 1-D LongTensor."""
    return tokenizer(ppl_text(name), return_tensors="pt").input_ids[0]
