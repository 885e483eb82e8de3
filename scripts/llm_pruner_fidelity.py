"""LLM-Pruner fidelity checks (benchmarks/llm_pruner_fidelity.md). Two modes, JSON lines on stdout:

``official --lp DIR``: run the official LLM-Pruner code from a local checkout DIR of horseee/LLM-Pruner (nothing
is copied from it; it is imported from DIR) the way its ``llama3.py --block_wise --pruner_type taylor --taylor
param_first`` path runs, on the reference model, layers 1..L-2, then print the kept KV heads / MLP width per layer
and the whole-text held-back perplexity. Adaptations, all outside the pruning math: the two dependency-tracing
prompts are taken modulo the vocabulary (the official ids are LLaMA-vocabulary ids), the trace calls the model
with ``use_cache=False`` and keeps the logits (the vendored tracer cannot walk a transformers 4.57 cache object),
float32 on the CPU, and ``get_examples('bookcorpus')`` is replaced by the same sampler over local rows
(``--calib books|paras``: random row with at least ``seq_len`` tokens, not drawn before, then a random window),
or by edgeprune's own calibration rows (``--calib edgeprune``: first 10 rows, first 64 tokens).

``margins``: how often each calibration construction / GQA fold makes each layer drop which KV head (edgeprune's
scorer, no pruning), over ``--seeds`` draws; the layer-4 decision is the one that moves the perplexity here.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys

import torch

from edgeprune import models
from edgeprune.data import calibration_ids, eval_ids, source_texts
from edgeprune.evaluate import perplexity_ids
from edgeprune.groups import model_groups
from edgeprune.importance.taylor import backward_grads, gradient_windows, group_taylor

REF = "../shared/models/ref-llama-8m"


def rows_sampler(tok, texts: list[str], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """The official get_bookcorpus draw (re-implemented): a random row with >= seq_len tokens (tokenized with BOS),
    not drawn before, then a random seq_len window of it; ``random`` seeded as the official set_random_seed."""
    random.seed(seed)
    out, seen = [], []
    for _ in range(n):
        while True:
            i = random.randint(0, len(texts) - 1)
            t = tok(texts[i], return_tensors="pt").input_ids
            if t.shape[1] >= seq_len and i not in seen:
                seen.append(i)
                break
        j = random.randint(0, t.shape[1] - seq_len)
        out.append(t[:, j:j + seq_len])
    return torch.cat(out, 0)


def windows(tok, calib: str, seed: int, n: int = 10, seq_len: int = 64, keep_bos: bool = True) -> torch.Tensor:
    if calib == "books":
        return rows_sampler(tok, source_texts("gutenberg"), n, seq_len, seed)
    if calib == "paras":
        paras = [p for t in source_texts("gutenberg") for p in t.split("\n\n") if p.strip()]
        return rows_sampler(tok, paras, n, seq_len, seed)
    return gradient_windows(calibration_ids(tok, "gutenberg", 128, 128, seed), n, seq_len, tok.bos_token_id, keep_bos)


def kept_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    return torch.cdist(new.float(), old.float()).argmin(1).tolist()


def official(a) -> None:
    sys.path.insert(0, a.lp)
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    import LLMPruner.torch_pruning as tp
    from LLMPruner.pruner import hf_llama_pruner as llama_pruner

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    tok = models.load_tokenizer(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    orig = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    layers, L = model.model.layers, model.config.num_hidden_layers
    prompts = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338],
                            [1, 3439, 17632, 1925, 29892, 278, 6368, 310]]) % model.config.vocab_size
    pruner = tp.pruner.MetaPruner(
        model, prompts, forward_fn=lambda m, x: m(x, use_cache=False).logits,
        importance=llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first"),
        global_pruning=False, iterative_steps=1, ch_sparsity=a.ratio, ignored_layers=[], channel_groups={},
        consecutive_groups={l.self_attn.k_proj: l.self_attn.head_dim for l in layers},
        customized_pruners={LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner}, root_module_types=None,
        root_instances=[layers[i].self_attn.k_proj for i in range(1, L - 1)] +
                       [layers[i].mlp.gate_proj for i in range(1, L - 1)])
    model.zero_grad()
    ex = windows(tok, a.calib, a.seed if a.calib in ("books", "paras") else a.calib_seed)
    model(ex, labels=ex).loss.backward()
    pruner.step()
    rec = {"mode": "official", "calib": a.calib, "seed": a.seed, "ratio": a.ratio, "layers": []}
    for i, layer in enumerate(layers):
        at = layer.self_attn
        at.num_key_value_groups = at.q_proj.weight.shape[0] // at.k_proj.weight.shape[0]
        kv = sorted({x // at.head_dim for x in kept_rows(at.k_proj.weight.data, orig[f"model.layers.{i}.self_attn.k_proj.weight"])})
        rec["layers"].append({"kv": kv, "mlp": layer.mlp.gate_proj.weight.shape[0]})
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        rec["ppl_heldout"] = perplexity_ids(model.eval(), eval_ids(tok, "heldout"), 128)
    print(json.dumps(rec), flush=True)


def margins(a) -> None:
    tok, model = models.load_tokenizer(a.model), models.load(a.model)
    groups = model_groups(model)
    for calib in a.calib.split(","):
        for s in range(a.seeds):
            ex = windows(tok, calib.replace("-bos", ""), s, keep_bos=calib.endswith("-bos"))
            grads, _ = backward_grads(model, ex, batch_size=1)
            for fold in ("heads", "official"):
                attn, _ = group_taylor(model, groups, lambda i, p: grads[(i, p)], None, "param_first", fold)
                print(json.dumps({"mode": "margins", "calib": calib, "seed": s, "fold": fold,
                                  "drop": [int(torch.argmin(x)) for x in attn],
                                  "scores": [[round(float(v), 5) for v in x] for x in attn]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["official", "margins"])
    ap.add_argument("--model", default=REF)
    ap.add_argument("--lp", help="local checkout of horseee/LLM-Pruner (official mode)")
    ap.add_argument("--calib", default="books", help="official: books|paras|edgeprune; margins: comma list of "
                    "edgeprune (no BOS), edgeprune-bos, books, paras")
    ap.add_argument("--ratio", type=float, default=0.27, help="official --pruning_ratio (0.27: 3/4 KV heads, 560 MLP)")
    ap.add_argument("--seed", type=int, default=42, help="official --seed")
    ap.add_argument("--calib-seed", type=int, default=0, help="edgeprune calibration seed (--calib edgeprune)")
    ap.add_argument("--seeds", type=int, default=20, help="margins: draws per construction")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.mode == "official" and not a.lp:
        ap.error("official mode needs --lp, a local checkout of horseee/LLM-Pruner")
    (official if a.mode == "official" else margins)(a)


if __name__ == "__main__":
    main()
