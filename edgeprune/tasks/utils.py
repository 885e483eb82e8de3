"""Document processing for edgeprune's offline lm-eval tasks (loaded by lm-eval via ``!function utils.*``).

Each function turns the local file schema (see shared/data/SOURCES.md) into the fields the task YAML uses,
so the prompts are exactly those of lm-eval's own task YAMLs (boolq, piqa, winogrande, arc_*, openbookqa, hellaswag).
"""
from __future__ import annotations

import re


def _gold_index(labels, key, where: str) -> int:
    key = str(key).strip()
    labels = [str(x).strip() for x in labels]
    if key not in labels:
        raise ValueError(f"{where}: answer key {key!r} not among choice labels {labels}")
    return labels.index(key)


# ------------------------------------------------------------------------------------------------ boolq
def boolq_process_docs(dataset):
    """SuperGLUE BoolQ: ``label`` is the string "true"/"false" (or a bool/int); map it to 0=no, 1=yes."""

    def _label(doc):
        v = doc["label"]
        if isinstance(v, str):
            s = v.strip().lower()
            if s not in ("true", "false", "1", "0"):
                raise ValueError(f"boolq: unexpected label {v!r}")
            v = s in ("true", "1")
        return {"label": int(bool(v))}

    return dataset.map(_label)


# ------------------------------------------------------------------------------------------------- piqa
def piqa_process_docs(dataset):
    """PIQA: labels live in ``piqa/valid-labels.lst`` (one 0/1 per line, same order as ``valid.jsonl``)."""
    from edgeprune.paths import data_dir

    path = data_dir() / "piqa" / "valid-labels.lst"
    labels = [int(x) for x in path.read_text().split()]
    if len(labels) != len(dataset):
        raise ValueError(f"piqa: {path} has {len(labels)} labels but valid.jsonl has {len(dataset)} docs")
    if "label" in dataset.column_names:
        dataset = dataset.remove_columns("label")
    return dataset.add_column("label", labels)


# ------------------------------------------------------------------------------------------- winogrande
# llm-foundry ICL schema: context_options = [sentence[:blank] + option1, sentence[:blank] + option2],
# continuation = text after the blank, gold = 0/1. lm-eval's winogrande is a "multiple input" task:
# doc_to_text returns the gold index, doc_to_choice the two contexts, doc_to_target the continuation,
# and each context is scored with " " + continuation (partial scoring).
def winogrande_doc_to_text(doc) -> int:
    return int(doc["gold"])


def winogrande_doc_to_target(doc) -> str:
    return doc["continuation"].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    return list(doc["context_options"])


# -------------------------------------------------------------------------------------------------- arc
def arc_process_docs(dataset):
    """Original AI2 schema (``question.stem``, ``question.choices[{text,label}]``, ``answerKey``)."""

    def _doc(doc):
        q = doc["question"]
        ch = q["choices"]
        if isinstance(ch, dict):  # columnar form {"text": [...], "label": [...]}
            texts, labels = list(ch["text"]), list(ch["label"])
        else:
            texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
        return {
            "question": q["stem"],
            "choices": texts,
            "gold": _gold_index(labels, doc["answerKey"], f"arc {doc.get('id')}"),
        }

    return dataset.map(_doc, remove_columns=dataset.column_names)


# ---------------------------------------------------------------------------------------------- hellaswag
def _hs_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow portion of HellaSwag (as in lm-eval's hellaswag/utils.py).
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    """Standard HellaSwag jsonl (ctx_a/ctx_b/activity_label/endings/label), or the llm-foundry ICL form
    (query/choices/gold), which is already preprocessed."""
    cols = set(dataset.column_names)

    def _doc(doc):
        if "ctx_a" in cols:
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
            return {
                "query": _hs_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hs_preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"]),
            }
        return {"query": doc["query"], "choices": list(doc["choices"]), "gold": int(doc["gold"])}

    return dataset.map(_doc, remove_columns=dataset.column_names)
