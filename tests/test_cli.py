"""CLI end to end on the reference model and on bad input (real subprocesses)."""
import json
import shutil

import pytest
import torch

from conftest import run_cli
from edgeprune import models as M
from edgeprune import testing as T


@pytest.fixture(scope="module")
def flap20(ref_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flap") / "D"
    r = run_cli("prune", ref_model_dir, "--method", "flap", "--ratio", "0.2", "--calib-samples", "32", "--out", out,
                "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_flap_prune_hits_ratio_and_reloads_exactly(flap20, ref_model_dir):
    from edgeprune.prune import PruneConfig, prune_model

    rep = json.loads((flap20 / "prune_report.json").read_text())
    assert abs(rep["achieved_ratio"] - 0.2) <= 0.015
    cfg = json.loads((flap20 / "config.json").read_text())
    prov = cfg["pruning"]["provenance"]
    assert prov["method"] == "flap" and prov["allocation"] == "global" and prov["calibration"]["samples"] == 32
    assert len({(s["num_key_value_heads"], s["intermediate_size"]) for s in cfg["pruning"]["per_layer"]}) > 1
    # the in-memory pruned model equals the reloaded one exactly
    m = M.load(ref_model_dir)
    tok = M.load_tokenizer(ref_model_dir)
    prune_model(m, tok, PruneConfig("flap", 0.2, calib_samples=32), progress=False)
    ids = tok("It was the best of times, it was the worst of times.", return_tensors="pt").input_ids
    assert torch.equal(M.load(flap20)(ids).logits, m(ids).logits)


def test_eval_json_has_protocol_keys(flap20, tmp_path):
    js = tmp_path / "r.json"
    r = run_cli("eval", flap20, "--ppl", "wikitext2", "--max-chunks", "20", "--json", js, "--quiet")
    assert r.returncode == 0, r.stderr
    d = json.loads(js.read_text())
    v = d["ppl.wikitext2.seq128"]
    assert 1 < v < 1e5 and "128-token" in d["protocol"]["ppl"]


def test_info_json(flap20, tmp_path):
    js = tmp_path / "i.json"
    r = run_cli("info", flap20, "--json", js)
    assert r.returncode == 0, r.stderr
    d = json.loads(js.read_text())
    assert d["total_params"] > d["non_embedding_params"] > 0 and len(d["layers"]) == 8
    assert d["bytes"]["f16"] == 2 * d["total_params"]


def test_same_seed_same_bytes(ref_model_dir, tmp_path):
    outs = []
    for k in range(2):
        o = tmp_path / f"o{k}"
        r = run_cli("prune", ref_model_dir, "--method", "wanda-sp", "--ratio", "0.3", "--calib-samples", "16",
                    "--seed", "7", "--out", o, "--quiet")
        assert r.returncode == 0, r.stderr
        outs.append((o / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def _bad_model_dirs(tmp, ref):
    from transformers import GPT2Config

    d = {}
    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2).to_dict()
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    d["not supported"] = gpt2
    noconf = tmp / "noconf"
    noconf.mkdir()
    d["no config.json"] = noconf
    trunc = tmp / "trunc"
    shutil.copytree(ref, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    d["truncated"] = trunc
    untied = tmp / "untied"
    m = T.tiny_model("gqa", tied=True)
    T.save_tiny(m, untied)
    c = json.loads((untied / "config.json").read_text())
    c["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(c))
    d["tie_word_embeddings"] = untied
    d["does not exist"] = tmp / "missing"
    return d


@pytest.mark.parametrize("case", ["ratio_high", "ratio_zero", "method", "out_nonempty", "models"])
def test_bad_input_one_line_exit_2_no_output(case, ref_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["prune", ref_model_dir, "--method", "flap", "--ratio", "0.2", "--out", out, "--quiet", "--calib-samples", "8"]
    expect = {"ratio_high": ("--ratio", "1.5", "outside (0, 1)"), "ratio_zero": ("--ratio", "0", "outside (0, 1)"),
              "method": ("--method", "sparsegpt", "unknown method")}
    runs = []
    if case in expect:
        flag, val, msg = expect[case]
        a = list(args)
        a[a.index(flag) + 1] = val
        runs.append((a, msg, out))
    elif case == "out_nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
        runs.append((args, "not empty", None))
    else:
        for msg, d in _bad_model_dirs(tmp_path, ref_model_dir).items():
            a = list(args)
            a[1] = d
            runs.append((a, msg, tmp_path / f"o-{d.name}"))
            a[a.index("--out") + 1] = tmp_path / f"o-{d.name}"
    for a, msg, o in runs:
        r = run_cli(*a)
        assert r.returncode == 2, (a, r.stderr)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and msg in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        if o is not None:
            assert not o.exists()
    if case == "out_nonempty":
        assert (out / "keep.txt").read_text() == "user data"


def test_input_model_is_never_modified(ref_model_dir, tmp_path):
    before = M.dir_digest(ref_model_dir)
    r = run_cli("prune", ref_model_dir, "--method", "magnitude", "--ratio", "0.5", "--out", tmp_path / "m", "--quiet")
    assert r.returncode == 0, r.stderr
    assert M.dir_digest(ref_model_dir) == before
