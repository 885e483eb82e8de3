"""Recovery fine-tuning on tiny random models: loss goes down, merge is exact, resume is bitwise, bad input fails."""
import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from edgeprune import models as M
from edgeprune import surgery as S
from edgeprune import testing as T
from edgeprune.cli import main as cli_main
from edgeprune.errors import EdgepruneError
from edgeprune.recovery import finetune
from edgeprune.recovery.finetune import eval_loss, layer_severity, make_groups
from edgeprune.recovery.quant import dequantize_weight, quantize_weight
from edgeprune.recovery.tokens import TokenStream

FAST = dict(seq_len=32, batch_size=4, lr=5e-3, eval_every=5, progress=False, threads=1)


def _text(n_words: int = 6000, seed: int = 0) -> str:
    """Learnable text over the tiny word-level vocabulary: noisy cycles of a few words."""
    rng = random.Random(seed)
    words = [chr(ord("a") + i) for i in range(26)]
    out = []
    for i in range(n_words):
        out.append(words[(i * 3) % 17] if rng.random() < 0.8 else rng.choice(words))
        if i % 40 == 39:
            out.append("\n")
    return " ".join(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(_text())
    return str(p)


def _pruned(tmp_path, kind="gqa", seed=3, prune=True, **kw):
    m = T.tiny_model(kind, **kw)
    if prune:
        S.apply_plan(m, T.random_plan(m, seed=seed))
    return T.save_tiny(m, tmp_path / f"{kind}-{seed}-{prune}")


@pytest.mark.parametrize("strategy", ["groupwise", "lora"])
def test_strategies_lower_loss_and_merge_exactly(tmp_path, data, strategy):
    src = _pruned(tmp_path)
    res = finetune(src, data, tmp_path / "out", strategy=strategy, steps=20, groups=2, **FAST)
    assert res.complete and res.eval_loss_after < res.eval_loss_before - 0.05
    first, last = [h["loss"] for h in res.history if "loss" in h][:3], [h["loss"] for h in res.history if "loss" in h][-3:]
    assert sum(last) < sum(first)
    assert res.merge_max_abs_diff < 1e-4  # tuned PeftModel before merging vs edgeprune.models.load(out)
    out = M.load(tmp_path / "out")
    assert M.layer_shapes(out) == M.layer_shapes(M.load(src))
    prov = json.loads((tmp_path / "out" / "config.json").read_text())["pruning"]["provenance"]
    assert prov["finetune"]["strategy"] == strategy and prov["finetune"]["steps_done"] == 20
    assert not (tmp_path / "out.ckpt").exists()
    assert len(res.groups) == (2 if strategy == "groupwise" else 1)


def test_groups_by_severity_and_position(tmp_path):
    src = _pruned(tmp_path, layers=6)
    sev = layer_severity(M.load(src), src)
    groups = make_groups(sev, 3)
    assert sorted(sum(groups, [])) == list(range(6))
    worst = max(range(6), key=lambda i: sev[i])
    assert worst in groups[0]  # most severely pruned group first
    assert make_groups([0.0] * 6, 3) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_nonuniform_gqa_and_dense_models(tmp_path, data, kind):
    src = _pruned(tmp_path, kind=kind, seed=5)
    assert not M.is_uniform(M.layer_shapes(M.load(src)))
    res = finetune(src, data, tmp_path / "o1", steps=8, groups=3, **FAST)
    assert res.merge_max_abs_diff < 1e-4 and res.eval_loss_after <= res.eval_loss_before
    dense = _pruned(tmp_path, kind=kind, prune=False)
    res = finetune(dense, data, tmp_path / "o2", steps=8, groups=2, **FAST)
    assert res.groups == [[0, 1], [2, 3]] and res.merge_max_abs_diff < 1e-4


@pytest.mark.parametrize("strategy,quantize,teacher", [("groupwise", "none", False), ("lora", "none", False),
                                                      ("groupwise", "int4", False), ("groupwise", "none", True)])
def test_resume_equals_uninterrupted(tmp_path, data, strategy, quantize, teacher):
    src = _pruned(tmp_path)
    kw = dict(strategy=strategy, steps=12, groups=3, ckpt_every=3, quantize=quantize, **FAST)
    if teacher:
        kw["teacher"] = str(_pruned(tmp_path, prune=False))
    full = finetune(src, data, tmp_path / "full", **kw)
    part = finetune(src, data, tmp_path / "part", stop_after=7, **kw)  # "killed" after step 7; last ckpt at step 6
    assert not part.complete and not (tmp_path / "part").exists() and (tmp_path / "part.ckpt" / "state.pt").is_file()
    with pytest.raises(EdgepruneError, match="--resume"):
        finetune(src, data, tmp_path / "part", **kw)
    res = finetune(src, data, tmp_path / "part", resume=True, **kw)
    assert res.resumed_from_step == 6 and res.complete
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.history == res.history


def test_resume_after_kill_via_cli(tmp_path, data):
    src = _pruned(tmp_path)
    args = ["finetune", str(src), "--data", data, "--steps", "10", "--groups", "2", "--seq-len", "32",
            "--batch-size", "4", "--ckpt-every", "2", "--threads", "1", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--stop-after", "5"]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits,tol", [("int8", 0.01), ("int4", 0.2)])
def test_quantized_base(tmp_path, data, bits, tol):
    w = torch.randn(37, 91)
    q, s = quantize_weight(w, bits, 64)
    assert q.dtype in (torch.int8, torch.uint8)
    err = (dequantize_weight(q, s, bits, 91) - w).abs().max() / w.abs().max()
    assert err < tol
    src = _pruned(tmp_path)
    res = finetune(src, data, tmp_path / "q", steps=12, groups=2, quantize=bits, **FAST)
    assert res.eval_loss_after < res.eval_loss_before
    out = M.load(tmp_path / "q")  # full precision: the deltas merged into the original fp weights
    assert all(p.dtype == torch.float32 for p in out.parameters())
    blocks = TokenStream(M.load_tokenizer(src), data, 32).eval_blocks
    assert eval_loss(out, blocks) < eval_loss(M.load(src), blocks)


def test_distillation_from_the_recorded_dense_model(tmp_path, data):
    """teacher='auto' finds the dense source in the provenance; tuning lowers KL(teacher || student) on held-out text."""
    dense_m = T.tiny_model("gqa")
    dense = T.save_tiny(dense_m, tmp_path / "dense")
    S.apply_plan(dense_m, T.random_plan(dense_m, seed=3))
    src = T.save_tiny(dense_m, tmp_path / "pruned", provenance={"source_model": str(dense)})
    res = finetune(src, data, tmp_path / "kd", steps=16, groups=2, **FAST)
    prov = json.loads((tmp_path / "kd" / "config.json").read_text())["pruning"]["provenance"]["finetune"]
    assert prov["teacher"] == str(dense.resolve()) and "KL" in prov["recipe"]
    blocks = TokenStream(M.load_tokenizer(src), data, 32).eval_blocks
    teacher = M.load(dense)
    kl = lambda d: eval_loss(M.load(d), blocks, teacher=teacher)  # noqa: E731
    assert kl(tmp_path / "kd") < 0.9 * kl(src)
    assert res.eval_loss_before == pytest.approx(kl(src), rel=1e-5)
    assert eval_loss(M.load(dense), blocks, teacher=teacher) < 1e-6  # KL of a model to itself
    ce = finetune(src, data, tmp_path / "ce", steps=4, groups=2, teacher="none", **FAST)
    assert ce.eval_loss_before == pytest.approx(eval_loss(M.load(src), blocks), rel=1e-5)
    assert json.loads((tmp_path / "ce" / "config.json").read_text())["pruning"]["provenance"]["finetune"]["teacher"] is None
    other = T.save_tiny(T.tiny_model("gqa", vocab=64), tmp_path / "other")
    with pytest.raises(EdgepruneError, match="vocabulary"):
        finetune(src, data, tmp_path / "bad", steps=4, teacher=str(other), **FAST)
    assert not (tmp_path / "bad").exists()


def _fails(capsys, *args):
    rc = cli_main(["finetune", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_input(tmp_path, data, capsys):
    src = _pruned(tmp_path)
    out = tmp_path / "out"
    assert "missing.txt" in _fails(capsys, src, "--data", tmp_path / "missing.txt", "--out", out)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    empty.with_name("short.txt").write_text("a b c\n\nd e f")
    assert "empty" in _fails(capsys, src, "--data", empty, "--out", out)
    assert "--rank" in _fails(capsys, src, "--data", data, "--rank", 1000, "--seq-len", 32, "--out", out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert "not empty" in _fails(capsys, src, "--data", data, "--out", busy)
    assert "too short" in _fails(capsys, src, "--data", empty.with_name("short.txt"), "--out", out)
    assert "--resume" in _fails(capsys, src, "--data", data, "--resume", "--out", out)
    _fails(capsys, src, "--data", data, "--steps", 3, "--minutes", 1, "--out", out)
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()


def _rss_script(model_dir, data, strategy, out):
    return textwrap.dedent(f"""
        import json, resource, torch
        from edgeprune.recovery import finetune
        r = finetune({str(model_dir)!r}, {data!r}, {str(out)!r}, strategy={strategy!r}, steps=4, groups=4, seq_len=128,
                     batch_size=8, eval_every=100, progress=False, threads=1)
        print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "trainable": r.peak_trainable_params}}))
    """)


@pytest.mark.heavy
def test_peak_memory_groupwise_below_lora(tmp_path):
    """smollm2-135m shape (4 layers, random weights): one group's adapters/activations vs all layers'."""
    m = T.shaped_model("smollm2-135m", layers=4)
    src = T.save_tiny(m, tmp_path / "m")
    txt = tmp_path / "d.txt"
    txt.write_text(_text(40000))
    rss = {}
    for strategy in ("groupwise", "lora"):
        r = subprocess.run([sys.executable, "-c", _rss_script(src, str(txt), strategy, tmp_path / strategy)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        rss[strategy] = json.loads(r.stdout.strip().splitlines()[-1])
    print("peak RSS MB / peak trainable params:", rss)
    assert rss["groupwise"]["trainable"] * 3 < rss["lora"]["trainable"]
    assert rss["groupwise"]["rss"] < rss["lora"]["rss"], rss
