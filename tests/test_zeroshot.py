"""Zero-shot evaluation through lm-eval on the real reference model (offline, local data, limit=20 per task)."""
from __future__ import annotations

import json
import socket

import pytest
import torch

from edgeprune import models, paths, zeroshot
from edgeprune.errors import EdgepruneError

LIMIT = 20


@pytest.fixture(scope="module")
def ref():
    d = paths.reference_model_dir()
    return models.load(d), models.load_tokenizer(d)


def _no_network(*a, **k):
    raise AssertionError("zero-shot evaluation tried to open a network connection")


@pytest.fixture(scope="module")
def run(ref):
    """One lm-eval run of all six tasks (with per-doc samples), with sockets blocked: proves nothing downloads."""
    model, tok = ref
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        out = zeroshot._run(model, tok, list(zeroshot.DEFAULT_TASKS), LIMIT, 16, log_samples=True)
    return out, zeroshot._summarise(out, list(zeroshot.DEFAULT_TASKS))


def test_all_six_tasks_run(run):
    _, res = run
    assert set(res) == set(zeroshot.DEFAULT_TASKS) | {"average"}
    for t in zeroshot.DEFAULT_TASKS:
        r = res[t]
        assert r["n"] == LIMIT
        assert 0.0 <= r["acc"] <= 1.0
        # acc is a mean over LIMIT docs of 0/1
        assert abs(r["acc"] * LIMIT - round(r["acc"] * LIMIT)) < 1e-9
        if t in ("boolq", "winogrande"):
            assert "acc_norm" not in r
        else:
            assert 0.0 <= r["acc_norm"] <= 1.0
    prim = [res[t][zeroshot.PRIMARY_METRIC[t]] for t in zeroshot.DEFAULT_TASKS]
    assert res["average"] == pytest.approx(sum(prim) / len(prim))


def _raw(rel: str, n: int) -> list[dict]:
    with open(paths.data_dir() / rel) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), computed with the model directly (BOS as the tokenizer adds)."""
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    assert whole[: len(ctx)] == ctx
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _samples(out, task):
    s = sorted(out["samples"][task], key=lambda x: x["doc_id"])
    assert [x["doc_id"] for x in s] == list(range(LIMIT))
    return s


def test_arc_easy_matches_hand_computed_argmax(ref, run):
    """acc / acc_norm of arc_easy equal the argmax of log-likelihoods computed here from the raw jsonl."""
    model, tok = ref
    out, res = run
    samples = _samples(out, "arc_easy")
    acc = acc_norm = 0
    for doc, s in zip(_raw("arc_easy/ARC-Easy-Test.jsonl", LIMIT), samples):
        ctx = f"Question: {doc['question']['stem']}\nAnswer:"
        texts = [c["text"] for c in doc["question"]["choices"]]
        gold = [c["label"] for c in doc["question"]["choices"]].index(doc["answerKey"])
        lls = [_loglik(model, tok, ctx, " " + t) for t in texts]
        theirs = [r[0] for r in s["filtered_resps"]]
        assert theirs == pytest.approx(lls, abs=2e-3)
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(texts[i]))
        assert s["acc"] == float(pred == gold)
        assert s["acc_norm"] == float(pred_norm == gold)
        acc += pred == gold
        acc_norm += pred_norm == gold
    assert res["arc_easy"]["acc"] == pytest.approx(acc / LIMIT)
    assert res["arc_easy"]["acc_norm"] == pytest.approx(acc_norm / LIMIT)


def test_winogrande_partial_scoring_matches_hand_computed(ref, run):
    """WinoGrande scores " " + continuation after each filled-in context and takes the argmax."""
    model, tok = ref
    out, res = run
    correct = 0
    for doc, s in zip(_raw("winogrande/dev.llmfoundry.jsonl", LIMIT), _samples(out, "winogrande")):
        lls = [_loglik(model, tok, c, " " + doc["continuation"].strip()) for c in doc["context_options"]]
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(lls, abs=2e-3)
        pred = max(range(2), key=lambda i: lls[i])
        assert s["acc"] == float(pred == doc["gold"])
        correct += pred == doc["gold"]
    assert res["winogrande"]["acc"] == pytest.approx(correct / LIMIT)


def test_boolq_and_piqa_prompts_and_labels(run):
    out, _ = run
    raw = _raw("boolq/val.jsonl", LIMIT)
    for doc, s in zip(raw, _samples(out, "boolq")):
        assert s["arguments"][0][0] == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        assert [a[1] for a in s["arguments"]] == [" no", " yes"]
        assert s["target"] == (1 if doc["label"] == "true" else 0)
    labels = (paths.data_dir() / "piqa" / "valid-labels.lst").read_text().split()
    for doc, lab, s in zip(_raw("piqa/valid.jsonl", LIMIT), labels, _samples(out, "piqa")):
        assert s["arguments"][0][0] == f"Question: {doc['goal']}\nAnswer:"
        assert [a[1] for a in s["arguments"]] == [" " + doc["sol1"], " " + doc["sol2"]]
        assert s["target"] == int(lab)
    for doc, s in zip(_raw("openbookqa/test.llmfoundry.jsonl", LIMIT), _samples(out, "openbookqa")):
        assert s["arguments"][0][0] == doc["query"]
        assert s["target"] == doc["gold"]


def test_public_api_small_limit_consistent_and_side_effect_free(ref, run):
    model, tok = ref
    out, _ = run
    pad_before, training_before = tok.pad_token, model.training
    res = zeroshot.evaluate_zeroshot(model, tok, ["openbookqa"], limit=3, batch_size=4)
    assert set(res) == {"openbookqa", "average"}
    first3 = _samples(out, "openbookqa")[:3]
    assert res["openbookqa"]["n"] == 3
    assert res["openbookqa"]["acc"] == pytest.approx(sum(s["acc"] for s in first3) / 3)
    assert res["openbookqa"]["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in first3) / 3)
    assert res["average"] == res["openbookqa"]["acc_norm"]
    assert tok.pad_token == pad_before and model.training == training_before


def test_unknown_task_is_one_line_error(ref):
    model, tok = ref
    with pytest.raises(EdgepruneError) as e:
        zeroshot.evaluate_zeroshot(model, tok, ["boolq", "mmlu"])
    msg = str(e.value)
    assert "\n" not in msg and "mmlu" in msg
    for t in zeroshot.DEFAULT_TASKS:
        assert t in msg


def test_missing_data_and_bad_limit(ref, tmp_path, monkeypatch):
    model, tok = ref
    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path))
    with pytest.raises(EdgepruneError, match="not found"):
        zeroshot.evaluate_zeroshot(model, tok, ["piqa"], limit=2)
    assert zeroshot.available_tasks() == []
    monkeypatch.delenv("EDGEPRUNE_DATA")
    with pytest.raises(EdgepruneError, match="limit"):
        zeroshot.evaluate_zeroshot(model, tok, ["piqa"], limit=0)


def test_hellaswag_when_its_folder_appears(ref, tmp_path, monkeypatch):
    """HellaSwag runs from a standard-schema jsonl once data_dir()/hellaswag/ exists (synthetic 3-doc file here)."""
    model, tok = ref
    assert "hellaswag" not in zeroshot.available_tasks() or (paths.data_dir() / "hellaswag").is_dir()
    (tmp_path / "hellaswag").mkdir()
    docs = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he",
             "endings": ["puts it in a pan [title] and stirs.", "flies to the moon.", "reads a book.", "sleeps."],
             "label": i % 4, "split": "val"} for i in range(3)]
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path))
    assert zeroshot.available_tasks() == ["hellaswag"]
    out = zeroshot._run(model, tok, ["hellaswag"], None, 4, log_samples=True)
    s = sorted(out["samples"]["hellaswag"], key=lambda x: x["doc_id"])
    assert len(s) == 3 and [x["target"] for x in s] == [0, 1, 2]
    # lm-eval's hellaswag preprocessing: "activity: ctx_a Ctx_b", " [title]" -> ". ", brackets dropped
    assert s[0]["arguments"][0][0] == "Cooking: A man cuts an onion. He"
    assert s[0]["arguments"][0][1] == " puts it in a pan. and stirs."
    res = zeroshot._summarise(out, ["hellaswag"])
    assert res["hellaswag"]["n"] == 3 and res["average"] == res["hellaswag"]["acc_norm"]
