"""GGUF export: arch choice, exact logits in llama.cpp (F32 KV), greedy, biases, empty layers, vocabularies,
quantization fallbacks. Real llama.cpp, no mocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from export_helpers import hf_greedy, make_model, prompt_ids, ref_logits

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from exporters.gguf import export_gguf, write_gguf  # noqa: E402
from exporters.runtimes import LlamaCppRuntime  # noqa: E402


def _arch(path) -> str:
    r = gguf.GGUFReader(str(path))
    f = r.fields["general.architecture"]
    return bytes(f.parts[f.data[0]]).decode()


def _check_exact(model, path, vocab, tol=1e-4):
    rt = LlamaCppRuntime(path, n_ctx=96, threads=1, kv="f32")
    try:
        ids = prompt_ids(vocab)
        ref, got = ref_logits(model, ids), rt.logits(ids)
        assert np.abs(got - ref).max() < tol
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        assert rt.greedy(ids[:8], 12) == hf_greedy(model, ids[:8], 12)   # KV-cache path
    finally:
        rt.close()


@pytest.mark.parametrize("kind,bias,tied,tok", [("gqa", False, False, "spm"), ("mha", True, False, "spm"),
                                                ("qwen2", False, True, "bpe"), ("mistral", False, True, "spm")])
def test_per_layer_is_deci_and_exact(tmp_path, kind, bias, tied, tok):
    m, d = make_model(tmp_path, kind, kind, bias=bias, tied=tied, tok=tok)
    s = write_gguf(m, d, tmp_path / "m.gguf", "f32")
    assert s.arch == "deci" == _arch(s.path) and len(set(zip(s.heads, s.kv_heads, s.ffn))) > 1
    if kind == "qwen2" or bias:
        assert {"attn_q", "attn_k", "attn_v"} <= set(s.biases)
    r = gguf.GGUFReader(s.path)
    assert ("output.weight" in {t.name for t in r.tensors}) == (not tied)
    _check_exact(m, s.path, m.config.vocab_size)


def test_uniform_is_llama_and_f16_close(tmp_path):
    m, d = make_model(tmp_path, "dense", "gqa", tied=True, prune=False)
    s = write_gguf(m, d, tmp_path / "m.gguf", "f32")
    assert s.arch == "llama" == _arch(s.path)
    _check_exact(m, s.path, m.config.vocab_size)
    s16 = write_gguf(m, d, tmp_path / "m16.gguf", "f16")
    assert s16.file_mb < 0.6 * s.file_mb
    rt = LlamaCppRuntime(s16.path, n_ctx=64, threads=1, kv="f32")
    ids = prompt_ids(m.config.vocab_size)
    assert np.abs(rt.logits(ids) - ref_logits(m, ids)).max() < 2e-2
    rt.close()


def test_flap_biases_and_empty_layers(tmp_path):
    """o_proj/down_proj compensation biases are written (both archs load them); a layer with zero MLP channels
    gets a zero FFN (deci's n_ff=0 would skip the attention too); zero-head layers become attention-free, or one
    zero head when the o_proj bias must survive."""
    def edit(plan, model):
        plan.keep_mlp[1] = []        # no MLP
        plan.keep_kv[2] = []         # no attention, with a compensation bias
        plan.keep_kv[3] = []         # no attention (bias dropped below -> attention-free)
        g = torch.Generator().manual_seed(0)
        H, F = model.config.hidden_size, model.config.intermediate_size
        return [{"o": torch.randn(H, generator=g), "down": torch.randn(F, generator=g)} for _ in range(4)]

    m, d = make_model(tmp_path, "flap", "gqa", edit=edit)
    m.model.layers[3].self_attn.o_proj.bias = None
    s = write_gguf(m, d, tmp_path / "m.gguf", "f32")
    assert {"attn_output", "ffn_down"} <= set(s.biases)
    assert s.padded_ffn_layers == [1] and s.padded_attn_layers == [2] and s.attn_free_layers == [3]
    assert s.heads[3] == 0 and s.ffn[1] == 32 and s.notes
    _check_exact(m, s.path, m.config.vocab_size)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quant_fallbacks_reported(tmp_path, quant):
    m, d = make_model(tmp_path, "q", "gqa")          # n_ff 50..96 and hidden 64: rows break 32 / 256 blocks
    s = export_gguf(d, tmp_path / f"m.{quant}.gguf", quant, threads=1)
    rep = s.quant_report
    assert s.quant == quant and rep.fallbacks and rep.growth_bytes > 0 and not rep.predicted_not_seen
    assert all(f.predicted for f in rep.fallbacks)              # the row-length rule explains every fallback
    bad = {f.tensor for f in rep.fallbacks}
    if quant == "q8_0":
        assert bad == {f"blk.{i}.ffn_down.weight" for i, n in enumerate(s.ffn) if n % 32}
        assert all(f.got == "f16" for f in rep.fallbacks)
    else:
        assert "blk.0.ffn_up.weight" in bad and {f.got for f in rep.fallbacks} <= {"q5_0", "q5_1", "q8_0", "f16"}
    assert not [f.name for f in tmp_path.iterdir() if ".tmp-" in f.name]     # the f32 intermediate removed
    rt = LlamaCppRuntime(s.path, n_ctx=64, threads=1)
    ids = prompt_ids(m.config.vocab_size)
    assert np.isfinite(rt.logits(ids)).all()
    rt.close()


def test_an_interrupt_after_the_intermediate_is_written_leaves_nothing(tmp_path, monkeypatch):
    """A SIGTERM that lands between the f32 intermediate's final rename and its quantization (the clean-clone CI's
    chaos test, 0.2 s into an export) removes the intermediate: nothing beside the output, and no output."""
    import exporters.gguf as G

    _, d = make_model(tmp_path, "i", "gqa")
    real = G.write_gguf

    def written_then_interrupted(*a, **k):
        real(*a, **k)
        assert Path(a[2]).is_file()                          # the intermediate is in place, finished
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "write_gguf", written_then_interrupted)
    out = tmp_path / "o" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        G.export_gguf(d, out, "q8_0", threads=1)
    assert list(out.parent.iterdir()) == []


def test_rounded_shapes_do_not_fall_back(tmp_path):
    def edit(plan, model):
        plan.keep_mlp[:] = [list(range(n)) for n in (64, 32, 96, 64)]      # multiples of 32
    m, d = make_model(tmp_path, "r", "gqa", edit=edit)
    s = export_gguf(d, tmp_path / "m.gguf", "q8_0", threads=1)
    assert s.quant_report.fallbacks == [] and s.quant_report.growth_bytes == 0


@pytest.mark.parametrize("tok", ["spm", "bpe"])
def test_vocab_tokenizes_like_hf(tmp_path, tok):
    from edgeprune.models import load_tokenizer

    m, d = make_model(tmp_path, tok, "gqa", tok=tok)
    s = write_gguf(m, d, tmp_path / "m.gguf", "f16")
    hf = load_tokenizer(d)
    rt = LlamaCppRuntime(s.path, n_ctx=64, threads=1)
    for text in ("The quick brown fox jumps over the lazy dog.", "Once upon a time, 1905 papers!"):
        assert rt.tokenize(text, add_bos=hf.bos_token_id is not None and tok == "spm") == hf(text).input_ids
    r = gguf.GGUFReader(s.path)
    model = bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode()
    assert model == ("llama" if tok == "spm" else "gpt2")
    if tok == "bpe":
        assert "tokenizer.chat_template" in r.fields and "tokenizer.ggml.merges" in r.fields
        assert len(r.fields["tokenizer.ggml.tokens"].data) == 320          # padded to vocab_size
    rt.close()


def test_bad_requests_refused(tmp_path):
    m, d = make_model(tmp_path, "x", "gqa")
    with pytest.raises(EdgepruneError, match="quant"):
        export_gguf(d, tmp_path / "m.gguf", "q3_weird")
    from edgeprune.testing import save_tiny
    save_tiny(m, tmp_path / "wordlevel")                      # word-level tokenizer: not representable
    with pytest.raises(EdgepruneError, match="tokenizer"):
        write_gguf(m, tmp_path / "wordlevel", tmp_path / "w.gguf", "f32")
    assert not (tmp_path / "w.gguf").exists()
