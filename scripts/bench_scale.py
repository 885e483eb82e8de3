#!/usr/bin/env python
"""Scale benchmark: prune models larger than memory by layer streaming (issue 7).

Builds random models with public shapes as bf16 safetensors on disk (written tensor by tensor, one shard per
decoder layer, so creation itself stays low-memory; never inside the repository) with a LLaMA SentencePiece
tokenizer (/work/shared/data/llama_tokenizer/tokenizer.model, 32000 pieces), then:

* **LLaMA-7B shape** (32 × 4096, ffn 11008, vocab 32000, untied; ≈13.5 GB bf16): prune 20 % with ``wanda-sp``,
  ``mini-llm`` and ``bip`` under ``--stream``; each output is evaluated with the streamed forward
  (:func:`edgeprune.stream.streamed_perplexity`, a few 128-token chunks of WikiText-2) and then deleted; plus a
  *forward-only streamed pass* (the streamed LM-loss forward over the same calibration rows) as the reference
  for MINI-LLM's memory.
  The *recon* step: the same streamed wanda-sp prune with ``--reconstruct lsq`` (sequential least-squares refit
  of o_proj/down_proj toward the dense model, issue #13), whose peak must stay within 1.5× the forward-only pass.
* **LLaMA-3.2-1B shape** (16 × 2048, ffn 8192, vocab 128256, tied; ≈2.5 GB bf16): the same three methods with
  and without streaming; the two outputs are compared tensor by tensor (identical tensors ⇔ identical kept
  groups and weights), and the non-streamed output is loaded with ``edgeprune.models.load`` and run.

Every step runs in its own child process; peak RSS is the child's ``VmHWM`` from ``/proc/self/status``.
Writes ``benchmarks/scale.json`` and ``benchmarks/scale.md`` (updated after every step).

    python scripts/bench_scale.py --work /tmp/edgeprune-scale            # everything (7B part ≈ 40-60 min)
    python scripts/bench_scale.py --work /tmp/edgeprune-scale --only 1b
    python scripts/bench_scale.py --work /tmp/edgeprune-scale --only 7b --steps recon --keep   # the lsq step alone
    python scripts/bench_scale.py --only 7b --steps recon --recon-layers 2   # on 2 full-size 7B layers
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path("/work/shared/data/llama_tokenizer/tokenizer.model")
CALIB = {"calib": "gutenberg", "calib_samples": 8, "calib_len": 64, "seed": 0}
METHOD_OPTS = {
    "wanda-sp": {},
    # SPSA cost per layer is (2Q + Q) draws of the layer's weights: Q=2 keeps the 7B run in minutes on 2 cores
    "mini-llm": {"n_perturb": 2, "spsa_samples": 2, "spsa_len": 64, "spsa_batch": 2},
    # power iteration on the FFN Jacobian is the costly part of bip: fewer tokens/iterations than the defaults
    "bip": {"lip_tokens": 32, "lip_iters": 10},
}
EVAL_CHUNKS, EVAL_LEN = 2, 128
RECON_STEP = "prune wanda-sp --stream --reconstruct lsq"
RECON_STEPS = {"wanda-sp": RECON_STEP,   # the default method: OBS importance (global) + its default lsq repair
               "obs": "prune --stream (default: obs, global, lsq)"}
# The recon step calibrates as a default ``edgeprune prune`` does (128 x 128 = 16,384 tokens): a least-squares
# refit needs at least as many tokens as kept inputs (down_proj keeps 8,807 of 11,008 at 20 %); on fewer it is
# skipped as rank-deficient and falls back to bias compensation (8 x 64 = 512 tokens measured no solve at all).
RECON_CALIB = {"calib_samples": 128, "calib_len": 128}


# ------------------------------------------------------------------------------------------------ child jobs
def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def job_create(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaTokenizer

    from edgeprune.stream import ShardWriter
    from edgeprune.testing import SHAPES

    out = Path(spec["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = dict(SHAPES[spec["shape"]])
    if spec.get("layers"):
        s["num_hidden_layers"] = spec["layers"]
    cfg = LlamaConfig(**s, head_dim=s["hidden_size"] // s["num_attention_heads"], max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    d = cfg.to_dict()
    d["torch_dtype"] = "bfloat16"
    d.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    LlamaTokenizer(vocab_file=str(TOKENIZER), legacy=True).save_pretrained(str(tmp))
    H, L, F, V = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["vocab_size"]
    hd = H // s["num_attention_heads"]
    nq, nkv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    tied = s["tie_word_embeddings"]
    w = ShardWriter(tmp, L + 2)

    def rnd(shape, seed):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))

    w.write({"model.embed_tokens.weight": rnd((V, H), 1)})
    for i in range(L):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (nq, H), "self_attn.k_proj.weight": (nkv, H),
                  "self_attn.v_proj.weight": (nkv, H), "self_attn.o_proj.weight": (H, nq),
                  "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H), "mlp.down_proj.weight": (H, F)}
        t = {p + k: rnd(v, 1000 * (i + 1) + j) for j, (k, v) in enumerate(shapes.items())}
        t[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        w.write(t)
        del t
    head = {"model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    if not tied:
        head["lm_head.weight"] = rnd((V, H), 2)
    w.write(head)
    w.finish()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"bytes": dir_bytes(out)}


def _calib(spec: dict) -> dict:
    """The job's calibration: :data:`CALIB` with the spec's overrides (the recon step's :data:`RECON_CALIB`)."""
    return {**CALIB, **spec.get("calib", {})}


def job_prune(spec: dict) -> dict:
    from edgeprune.prune import PruneConfig, run_prune

    c = _calib(spec)
    cfg = PruneConfig(spec["method"], spec["ratio"], calib=c["calib"], calib_samples=c["calib_samples"],
                      calib_len=c["calib_len"], seed=c["seed"], options=dict(spec["options"]),
                      stream=spec["stream"], reconstruct=spec.get("reconstruct"))
    r = run_prune(spec["model"], spec["out"], cfg, overwrite=True, progress=False)
    res = {"achieved_ratio": r.achieved_ratio, "timings": r.timings, "bytes": dir_bytes(Path(spec["out"]))}
    prov = json.loads((Path(spec["out"]) / "config.json").read_text())["pruning"].get("provenance", {})
    rec = prov.get("reconstruction")
    if rec:   # which fit each projection got: lsq solved, or the fallback
        modes = [m for layer in rec["layers"] for m in layer["modes"].values()]
        res["repair_modes"] = {m: modes.count(m) for m in sorted(set(modes))}
    return res


def _eval_ids(model_dir):
    from edgeprune.data import ppl_text
    from edgeprune.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    return tok(ppl_text("wikitext2")[:40000], return_tensors="pt").input_ids[0]


def job_ppl(spec: dict) -> dict:
    ids = _eval_ids(spec["model"])
    if spec["stream"]:
        from edgeprune.stream import streamed_perplexity

        ppl = streamed_perplexity(spec["model"], ids, EVAL_LEN, max_chunks=EVAL_CHUNKS)
    else:
        from edgeprune.evaluate import perplexity_ids
        from edgeprune.models import load

        ppl = perplexity_ids(load(spec["model"]), ids, EVAL_LEN, max_chunks=EVAL_CHUNKS)
    return {"ppl": ppl, "protocol": f"wikitext2 first {EVAL_CHUNKS} x {EVAL_LEN}-token chunks"
                                    + (", streamed forward" if spec["stream"] else ", edgeprune.models.load")}


def job_fwd(spec: dict) -> dict:
    """Forward-only streamed pass: the streamed LM-loss forward over the calibration rows."""
    from edgeprune.data import calibration_ids
    from edgeprune.models import load_tokenizer
    from edgeprune.stream import streamed_perplexity

    c = _calib(spec)
    ids = calibration_ids(load_tokenizer(spec["model"]), c["calib"], c["calib_samples"], c["calib_len"], c["seed"])
    return {"ppl_calib": streamed_perplexity(spec["model"], ids, batch_size=8)}


def job_compare(spec: dict) -> dict:
    import torch

    from edgeprune.stream import Checkpoint

    a, b = Checkpoint(spec["a"]), Checkpoint(spec["b"])
    ka, kb = set(a.keys()), set(b.keys())
    diff = sorted(ka ^ kb)
    same = not diff
    for k in sorted(ka & kb):
        if not torch.equal(a.get(k), b.get(k)):
            same = False
            diff.append(k)
    ca = json.loads((Path(spec["a"]) / "config.json").read_text())["pruning"]["per_layer"]
    cb = json.loads((Path(spec["b"]) / "config.json").read_text())["pruning"]["per_layer"]
    return {"identical_tensors": same, "same_per_layer_shapes": ca == cb, "differing": diff[:5]}


JOBS = {"create": job_create, "prune": job_prune, "ppl": job_ppl, "fwd": job_fwd, "compare": job_compare}


def child(spec: dict) -> None:
    from edgeprune.procmem import peak_rss_mb

    t = time.time()
    res = JOBS[spec["kind"]](spec)
    res.update({"wall_s": round(time.time() - t, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------ parent
def machine() -> dict:
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": os.getloadavg(), "python": platform.python_version()}


def commit() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None if r.returncode == 0 else None


class Bench:
    """The results file: ``runs`` (command, machine, commit of each invocation), ``steps`` (the latest figure of
    each step, tagged with its run) and ``replaced`` (the figures a later run replaced: the denominators of the
    new/old ratios in the Markdown)."""

    def __init__(self, work: Path, out_json: Path, out_md: Path):
        self.work, self.out_json, self.out_md = work, out_json, out_md
        self.data = {"runs": [], "calibration": CALIB, "method_options": METHOD_OPTS,
                     "protocol": "each step in a fresh child process; peak_rss_mb = VmHWM of that child "
                                 "(/proc/self/status); wall_s = the child's own wall time",
                     "steps": [], "replaced": []}
        if out_json.exists():   # keep the earlier runs' results; a step run again replaces its row
            old = json.loads(out_json.read_text())
            self.data.update({k: v for k, v in old.items() if k not in ("command", "machine")})
            self.data.setdefault("replaced", [])
            if "runs" not in old:   # a file from before runs were recorded: one run
                self.data["runs"] = [{"command": old["command"], "machine": old["machine"], "commit": None}]
                self.data["steps"] = [{**s, "run": 0} for s in self.data["steps"]]
        self.run_id = None

    def start(self, command: str, mach: dict, rev: str | None) -> None:
        self.data["runs"].append({"command": command, "machine": mach, "commit": rev})
        self.run_id = len(self.data["runs"]) - 1

    def record(self, res: dict) -> None:
        old = [s for s in self.data["steps"] if s["name"] == res["name"]]
        self.data["replaced"] = [s for s in self.data["replaced"] if s["name"] != res["name"]] + \
            [s for s in old if s["run"] != self.run_id]
        new, steps = {**res, "run": self.run_id}, self.data["steps"]
        at = next((k for k, s in enumerate(steps) if s["name"] == res["name"]), len(steps))
        self.data["steps"] = steps[:at] + [new] + [s for s in steps[at:] if s["name"] != res["name"]]
        self.write()

    def absorb(self, other: dict, rev: str | None) -> None:
        """Take the steps of another results file (one run, written elsewhere) as a new run of this one."""
        r = other["runs"][-1] if other.get("runs") else other
        self.start(r["command"], r["machine"], rev or r.get("commit"))
        for s in other["steps"]:
            self.record({k: v for k, v in s.items() if k != "run"})

    def run(self, name: str, spec: dict, part: str) -> dict:
        print(f"[bench_scale] {name} ...", flush=True)
        t = time.time()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                           env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
        res.update({"name": name, "part": part, "spec": {k: v for k, v in spec.items() if k not in ("out",)},
                    "outer_s": round(time.time() - t, 1)})
        print(f"[bench_scale] {name}: {json.dumps({k: v for k, v in res.items() if k != 'spec'})}", flush=True)
        self.record(res)
        return res

    def write(self) -> None:
        self.out_json.write_text(json.dumps(self.data, indent=2) + "\n")
        self.out_md.write_text(render_md(self.data))


def _gib(s: dict | None) -> str:
    return f"{s['peak_rss_mb'] / 1024:.2f} GiB" if s and "peak_rss_mb" in s else "–"


def _secs(s: dict | None) -> str:
    return f"{s['wall_s']:.0f} s" if s and "wall_s" in s else "–"


def _ratio(new: dict, old: dict | None, key: str) -> str:
    return f"{new[key] / old[key]:.3f}" if old and key in old and key in new else "–"


def _run_line(k: int, r: dict) -> str:
    m, rev = r["machine"], f" (commit {r['commit']})" if r.get("commit") else ""
    return (f"Run {k}: `{r['command']}`{rev}; "
            f"{m['cpu']}, {m['cores']} cores (shared with other jobs; load average at start "
            f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}), {m['ram_gib']} GiB RAM, CPU only.  ")


def _part_table(d: dict, part: str) -> list[str]:
    """One part's steps; where a later run replaced a step, the replaced figures and the new/old ratios."""
    rows = [s for s in d["steps"] if s["part"] == part]
    old = {s["name"]: s for s in d.get("replaced", []) if s["part"] == part}
    cols = "| step | run | peak RSS | wall | output size | result |"
    if old:
        cols += " replaced: run, peak RSS, wall | peak new/old | wall new/old |"
    lines = [cols, "|" + "---|" * (cols.count("|") - 1)]
    for s in rows:
        res = s.get("error") or ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()
            if k in ("ppl", "ppl_calib", "achieved_ratio", "identical_tensors", "same_per_layer_shapes"))
        if s.get("repair_modes"):
            res += "; fits: " + ", ".join(f"{m} {n}" for m, n in s["repair_modes"].items())
        gb = f"{s['bytes'] / 1e9:.2f} GB" if isinstance(s.get("bytes"), (int, float)) else "–"
        line = f"| {s['name']} | {s['run']} | {_gib(s)} | {_secs(s)} | {gb} | {res} |"
        if old:
            o = old.get(s["name"])
            line += (f" {o['run']}, {_gib(o)}, {_secs(o)} |" if o else " – |") + \
                f" {_ratio(s, o, 'peak_rss_mb')} | {_ratio(s, o, 'wall_s')} |"
        lines.append(line)
    return lines + [""]


def _summary(d: dict) -> list[str]:
    st = {s["name"]: s for s in d["steps"]}
    fwd, mini = st.get("7b fwd-only (streamed LM loss)"), st.get("7b prune mini-llm --stream")
    lines = []
    same = lambda a, b: a and b and "peak_rss_mb" in a and "peak_rss_mb" in b and a["run"] == b["run"]
    if same(fwd, mini):   # ratios only between figures of one run
        r = mini["peak_rss_mb"] / fwd["peak_rss_mb"]
        lines += [f"MINI-LLM streamed prune peak RSS (the whole `prune --stream`: scoring, surgery and writing) / "
                  f"forward-only streamed pass = {mini['peak_rss_mb']:.0f} / {fwd['peak_rss_mb']:.0f} MB = "
                  f"**{r:.3f}×** (acceptance ≤ 1.15×).", ""]
        others = [(m, st.get(f"7b prune {m} --stream")) for m in ("wanda-sp", "bip")]
        others = [f"{m} {s['peak_rss_mb'] / fwd['peak_rss_mb']:.3f}×" for m, s in others if same(fwd, s)]
        if others:
            lines += ["The same ratio for the other streamed prunes: " + ", ".join(others) + ".", ""]
    for name, lsq in st.items():
        f = st.get(name.replace(RECON_STEP, "fwd-only (streamed LM loss)"))
        if not name.endswith(RECON_STEP) or not f or "peak_rss_mb" not in f or "peak_rss_mb" not in lsq:
            continue
        t = lsq.get("timings", {})
        lines += [f"`{name}` (sequential least-squares refit, residual target): peak RSS / the same model's "
                  f"forward-only streamed pass = {lsq['peak_rss_mb']:.0f} / {f['peak_rss_mb']:.0f} MB = "
                  f"**{lsq['peak_rss_mb'] / f['peak_rss_mb']:.3f}×** (acceptance ≤ 1.5×); wall {lsq['wall_s']:.0f} s "
                  f"(pass 1 scoring {t.get('score_s', float('nan')):.0f} s, pass 2 refit + surgery "
                  f"{t.get('allocate_apply_s', float('nan')):.0f} s). The refit's memory bound: "
                  "`edgeprune/reconstruct.py`, docs/methods.md.", ""]
    p7 = [s for s in d["steps"] if s["part"] == "7b" and s["name"].startswith("7b prune")]
    if p7 and all("peak_rss_mb" in s for s in p7):
        mx = max(s["peak_rss_mb"] for s in p7)
        lines += [f"7B-shaped pruning peak RSS (max over methods, latest figure of each: runs "
                  f"{', '.join(sorted({str(s['run']) for s in p7}))}): **{mx / 1024:.2f} GiB** (acceptance ≤ 4 GB).", ""]
    return lines


def render_md(d: dict) -> str:
    c = d["calibration"]
    lines = ["# Scale benchmark: layer streaming", ""] + [_run_line(k, r) for k, r in enumerate(d["runs"])] + [
        f"Calibration: {c['calib_samples']} × {c['calib_len']} tokens of {c['calib']} (seed {c['seed']}), LLaMA "
        "SentencePiece tokenizer (32000 pieces). Ratio 20 % of non-embedding parameters, each method's default "
        "allocation (uniform).  ", f"Method options: `{json.dumps(d['method_options'])}`.  ",
        f"Protocol: {d['protocol']}. Models are random (bf16, N(0, 0.02) weights) with the public shapes; "
        "their perplexities only show the outputs load and run (finite), not quality. The `run` column names the "
        "run (above) that measured the row.", ""]
    for part, title in (("7b", "LLaMA-7B shape (32 layers × 4096, ffn 11008, vocab 32000), streamed"),
                        ("1b", "LLaMA-3.2-1B shape (16 layers × 2048, ffn 8192, vocab 128256, tied)")):
        if any(s["part"] == part for s in d["steps"]):
            lines += [f"## {title}", ""] + _part_table(d, part)
    lines += _summary(d)
    lines += ["Notes: streamed outputs are sharded (`model.safetensors.index.json`); the 7B outputs are evaluated "
              "with the streamed forward (a fully loaded pruned 7B would need ≈11 GB in bf16) and deleted after. "
              "Under streaming MINI-LLM's SPSA loss is block-local (logit lens of the layer output, see "
              "docs/methods.md, \"Streaming\"), so its 1B streamed/non-streamed outputs differ by design; the "
              "gradient-free methods must be identical.", ""]
    return "\n".join(lines + d.get("notes_md", []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/edgeprune-scale", help="scratch folder for models (outside the repo)")
    ap.add_argument("--only", choices=["1b", "7b"], default=None)
    ap.add_argument("--methods", default="wanda-sp,mini-llm,bip")
    ap.add_argument("--eval-all", action="store_true", help="7B: evaluate every method's output (default: the first)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "scale.json"),
                    help="results file (steps already in it are kept and replaced by name); the .md is written beside")
    ap.add_argument("--keep", action="store_true", help="keep the random models afterwards")
    ap.add_argument("--absorb", default=None, metavar="JSON",
                    help="run nothing: add the steps of another results file (one run, e.g. made from a snapshot "
                         "of the tree with --json elsewhere) to --json as a new run; replaced steps give new/old")
    ap.add_argument("--commit", default=None, help="with --absorb: the commit the absorbed run measured")
    ap.add_argument("--steps", default="fwd,methods,recon",
                    help="7B steps to run (comma list of fwd, methods, recon; the model is created when missing)")
    ap.add_argument("--recon-methods", default=",".join(RECON_STEPS),
                    help=f"methods of the recon step (of {', '.join(RECON_STEPS)})")
    ap.add_argument("--recon-layers", type=int, default=None,
                    help="the recon step on a 7B shape cut to N layers (own model and forward-only pass)")
    a = ap.parse_args()
    steps = set(a.steps.split(","))
    if set(a.recon_methods.split(",")) - set(RECON_STEPS):
        ap.error(f"--recon-methods {a.recon_methods!r}: use a comma list of {', '.join(RECON_STEPS)}")
    if a.child:
        child(json.loads(a.child))
        return 0
    work = Path(a.work).resolve()
    if REPO in work.parents or work == REPO:
        raise SystemExit("--work must be outside the repository")
    js = Path(a.json).resolve()
    b = Bench(work, js, js.with_suffix(".md"))
    if a.absorb:
        b.absorb(json.loads(Path(a.absorb).read_text()), a.commit)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    b.start("python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), machine(), commit())
    methods = a.methods.split(",")
    if a.only in (None, "1b"):
        dense = work / "llama-3.2-1b-shape"
        if not (dense / "model.safetensors.index.json").exists():
            b.run("1b create (bf16, tensor by tensor)", {"kind": "create", "shape": "llama-3.2-1b", "out": str(dense)}, "1b")
        for mth in methods:
            outs = {}
            for stream in (False, True):
                o = work / f"1b-{mth}-{'stream' if stream else 'mem'}"
                outs[stream] = o
                b.run(f"1b prune {mth} {'--stream' if stream else '(in memory)'}",
                      {"kind": "prune", "model": str(dense), "out": str(o), "method": mth, "ratio": 0.2,
                       "options": METHOD_OPTS[mth], "stream": stream}, "1b")
            b.run(f"1b {mth}: streamed vs in-memory output", {"kind": "compare", "a": str(outs[False]),
                                                               "b": str(outs[True])}, "1b")
            if mth == methods[0]:
                b.run(f"1b {mth} output: load + ppl", {"kind": "ppl", "model": str(outs[True]), "stream": False}, "1b")
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(dense, ignore_errors=True)
    if a.only in (None, "7b"):
        dense = work / "llama-7b-shape"
        full = "fwd" in steps or "methods" in steps or ("recon" in steps and not a.recon_layers)
        if full and not (dense / "model.safetensors.index.json").exists():
            b.run("7b create (bf16, tensor by tensor)", {"kind": "create", "shape": "llama-7b", "out": str(dense)}, "7b")
        if "fwd" in steps:
            b.run("7b fwd-only (streamed LM loss)", {"kind": "fwd", "model": str(dense)}, "7b")
        for mth in (methods if "methods" in steps else []):
            o = work / f"7b-{mth}"
            b.run(f"7b prune {mth} --stream", {"kind": "prune", "model": str(dense), "out": str(o), "method": mth,
                                               "ratio": 0.2, "options": METHOD_OPTS[mth], "stream": True}, "7b")
            if mth == methods[0] or a.eval_all:   # reading an 11 GB output again costs minutes on a shared disk
                b.run(f"7b {mth} output: streamed ppl", {"kind": "ppl", "model": str(o), "stream": True}, "7b")
            shutil.rmtree(o, ignore_errors=True)
        if "recon" in steps:
            recon_7b(b, dense, work, a.recon_layers, tuple(a.recon_methods.split(",")))
        if not a.keep:
            shutil.rmtree(dense, ignore_errors=True)
    return 0


def recon_7b(b: Bench, dense: Path, work: Path, layers: int | None = None,
             methods: tuple[str, ...] = tuple(RECON_STEPS)) -> None:
    """The streamed prune with the least-squares refit (issue #13 item 5) at 20 %, for each of ``methods``:
    wanda-sp (uniform) ``--reconstruct lsq``, and the default ``prune`` (OBS importance, global, lsq; its
    d_in² Gram is the largest statistic), each followed by a streamed ppl of the output (loads and runs).
    With ``layers``: on a 7B-shaped model cut to that many (full-size) layers, with its own forward-only pass —
    the peak is a per-layer quantity, so a machine too loaded for 32 layers still measures the ratio."""
    cal = f"{RECON_CALIB['calib_samples']}x{RECON_CALIB['calib_len']} calibration"
    tag = f"7b-shape {layers} layers, {cal}:" if layers else f"7b, {cal}:"
    if layers:
        dense = work / f"llama-7b-shape-{layers}l"
        if not (dense / "model.safetensors.index.json").exists():
            b.run(f"{tag} create", {"kind": "create", "shape": "llama-7b", "layers": layers, "out": str(dense)}, "7b")
    b.run(f"{tag} fwd-only (streamed LM loss)", {"kind": "fwd", "model": str(dense), "calib": RECON_CALIB}, "7b")
    for mth in methods:
        o = work / f"7b-{mth}-lsq{layers or ''}"
        b.run(f"{tag} {RECON_STEPS[mth]}", {"kind": "prune", "model": str(dense), "out": str(o), "method": mth,
                                            "ratio": 0.2, "options": METHOD_OPTS.get(mth, {}), "stream": True,
                                            "reconstruct": "lsq", "calib": RECON_CALIB}, "7b")
        b.run(f"{tag} {mth} + lsq output: streamed ppl", {"kind": "ppl", "model": str(o), "stream": True}, "7b")
        shutil.rmtree(o, ignore_errors=True)
    if layers:
        shutil.rmtree(dense, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
