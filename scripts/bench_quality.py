#!/usr/bin/env python
"""Quality benchmark: prune the reference model with every method × allocation × reconstruction at 20% and 50%
and evaluate.

Each configuration runs ``edgeprune prune`` and ``edgeprune eval`` as separate processes (peak RSS is the
prune process's ``ru_maxrss``). Results are cached per configuration in the JSON (written after every row), so an
interrupted run resumes. Writes ``benchmarks/quality.json`` and ``benchmarks/quality.md``.

A configuration is ``method[:allocation[:reconstruct]]`` (empty allocation: the method's own; reconstruct
``none|bias|lsq|obs``, ``default``: the method's own repair); ``--recons`` crosses every configuration without
an explicit reconstruct with that list. ``--recovery method:ratio:reconstruct:minutes`` rows prune, run the
group-wise fine-tune (``edgeprune finetune --strategy groupwise --data gutenberg``, lr ``--recovery-lr``, default
3e-3) and evaluate the result.

    python scripts/bench_quality.py [--ratios 0.2,0.5] [--configs flap:global,obs] [--recons none,bias,lsq]
    python scripts/bench_quality.py --recovery obs:0.5:lsq:10 --zs-limit 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeprune.paths import reference_model_dir  # noqa: E402

# (method, allocation or None for the method's own default)
CONFIGS = [
    ("magnitude", None), ("wanda-sp", None), ("flap", None), ("flap", "uniform"), ("llm-pruner", None),
    ("llm-pruner", "global"),
    ("saap", None), ("saap", "uniform"), ("mini-llm", None), ("mini-llm", "saap"), ("bip", None), ("bip", "uniform"),
    ("wanda-sp", "self-pruner"),
]
PPL_SETS = ["wikitext2", "ptb", "heldout"]
TASKS = "boolq,piqa,winogrande,arc_easy,arc_challenge,openbookqa"


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, child peak RSS MB, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                                                "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1")})
    wall = time.time() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(rss, before) / 1024, p.stdout


def evaluate(model_dir: str, zs_limit: int | None, max_chunks: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as td:
        js = f"{td}/r.json"
        cmd = [sys.executable, "-m", "edgeprune.cli", "eval", model_dir, "--ppl", ",".join(PPL_SETS), "--json", js,
               "--quiet"]
        if max_chunks:
            cmd += ["--max-chunks", str(max_chunks)]
        if zs_limit != 0:
            cmd += ["--tasks", TASKS] + (["--limit", str(zs_limit)] if zs_limit else [])
        wall, _, _ = run(cmd)
        r = json.loads(Path(js).read_text())
    r["eval_wall_s"] = round(wall, 1)
    return r


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def _parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--configs", default="", help="comma list of method[:allocation]; default: all")
    ap.add_argument("--zs-limit", type=int, default=200, help="examples per zero-shot task (0: skip zero-shot)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--max-chunks", type=int, default=None, help="first N 128-token chunks of each ppl text")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quality"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached results")
    ap.add_argument("--recons", default="", help="comma list of reconstruct modes crossed with every config")
    ap.add_argument("--recovery", default="", help="comma list of method:ratio:reconstruct:minutes recovery rows")
    ap.add_argument("--recovery-lr", default="3e-3", help="learning rate of the recovery rows' fine-tune")
    ap.add_argument("--ppl", default=",".join(PPL_SETS), help="perplexity texts (default: all three, whole)")
    ap.add_argument("--no-dense", action="store_true", help="do not evaluate the dense row here (merge it later)")
    ap.add_argument("--rows-from", default="", help="comma list of DIR=EVAL_JSON=COMMAND: rows from a model pruned "
                    "and evaluated (edgeprune eval --json) outside this script with that prune command")
    ap.add_argument("--merge", nargs="*", default=None, help="merge these result JSONs into --out and render")
    return ap.parse_args()


def _rows_from(a) -> None:
    """--rows-from: rows from models pruned and evaluated outside this script."""
    res = json.loads(Path(a.out + ".json").read_text()) if Path(a.out + ".json").exists() else \
        {"rows": {}, "machine": machine(), "command": "", "protocol": {}}
    for spec in a.rows_from.split(","):
        d, ev, command = spec.split("=", 2)
        rep = json.loads(Path(d, "prune_report.json").read_text())
        row = row_from_dir(d, rep["method"], rep["target_ratio"], rep["timings"]["total_s"], rep["peak_rss_mb"],
                           command)
        row.pop("dir")
        r = json.loads(Path(ev).read_text())
        res["rows"][f"{rep['method']}:default:{row['reconstruct']}@{rep['target_ratio']}"] = {**row, **r}
        res["command"] += f" ; {command} (+ edgeprune eval --ppl heldout --json)"
    Path(a.out + ".json").write_text(json.dumps(res, indent=2) + "\n")


def _merge(a) -> None:
    """--merge: result JSONs merged into --out and rendered."""
    parts = [json.loads(Path(f).read_text()) for f in a.merge]
    res = {**parts[0], "rows": {k: v for p in parts for k, v in p["rows"].items()},
           "command": " ; ".join(p["command"] for p in parts) + " ; python scripts/bench_quality.py "
           + " ".join(sys.argv[1:])}
    Path(a.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    Path(a.out + ".md").write_text(render(res))


def main() -> None:
    a = _parse_args()
    if a.rows_from:
        return _rows_from(a)
    if a.merge:
        return _merge(a)
    ref = str(reference_model_dir())
    ratios = [float(r) for r in a.ratios.split(",") if r]   # empty: the dense row only
    PPL_SETS[:] = [x for x in a.ppl.split(",") if x]
    configs = _configs(a)
    jpath = Path(a.out + ".json")
    res = {} if a.fresh or not jpath.exists() else json.loads(jpath.read_text())
    res.setdefault("rows", {})
    res["machine"] = machine()
    res["protocol"] = {"ppl": "LLM-Pruner protocol: texts joined by '\\n\\n', non-overlapping 128-token chunks; "
                              "wikitext2 = WikiText-2 raw test, ptb = PTB test, heldout = the reference model's "
                              "in-domain held-back text (README of ref-llama-8m)"
                              + (f"; first {a.max_chunks} chunks of each text" if a.max_chunks else "; whole texts"),
                       "zeroshot": "not run (--zs-limit 0)" if a.zs_limit == 0 else
                                   f"lm-eval, local tasks, first {a.zs_limit} examples per task; average of the "
                                   "per-task metric (see edgeprune/zeroshot.py)",
                       "calibration": f"gutenberg (held-back text excluded), {a.calib_samples} x 128 tokens, seed 0",
                       "ratio": "fraction of non-embedding parameters removed"}
    res["command"] = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])

    def save():
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(res, indent=2) + "\n")
        Path(a.out + ".md").write_text(render(res))

    if "dense" not in res["rows"] and not a.no_dense:
        print("evaluating dense", flush=True)
        res["rows"]["dense"] = {"method": "dense", "allocation": "-", "ratio": 0.0, **evaluate(ref, a.zs_limit, a.max_chunks)}
        save()
    with tempfile.TemporaryDirectory() as td:
        for ratio in ratios:
            for method, alloc, recon in configs:
                key = f"{method}:{alloc or 'default'}:{recon or 'default'}@{ratio}"
                if key in res["rows"]:
                    continue
                print(f"running {key}", flush=True)
                row = prune_row(td, ref, method, alloc, recon, ratio, a)
                if row is not None:
                    res["rows"][key] = {**row, **evaluate(row.pop("dir"), a.zs_limit, a.max_chunks)}
                    save()
        for spec in [x for x in a.recovery.split(",") if x]:
            method, ratio, recon, minutes = spec.split(":")
            lr = a.recovery_lr
            key = f"{method}:default:{recon}@{float(ratio)}+groupwise{minutes}" + ("" if lr == "3e-3" else f"-lr{lr}")
            if key in res["rows"]:
                continue
            print(f"running {key}", flush=True)
            row = prune_row(td, ref, method, None, recon, float(ratio), a)
            if row is None:
                continue
            tuned = f"{row['dir']}-ft"
            cmd = [sys.executable, "-m", "edgeprune.cli", "finetune", row["dir"], "--data", "gutenberg", "--strategy",
                   "groupwise", "--minutes", minutes, "--lr", lr, "--out", tuned, "--quiet", "--threads", "1"]
            wall, _, _ = run(cmd)
            row.pop("dir")
            res["rows"][key] = {**row, "recovery": f"groupwise {minutes} min (gutenberg, lr {lr}, teacher auto)",
                                "finetune_wall_s": round(wall, 1), **evaluate(tuned, a.zs_limit, a.max_chunks)}
            save()
    save()
    print(render(res))


def _configs(a) -> list[tuple[str, str | None, str | None]]:
    """(method, allocation or None, reconstruct or None) from ``--configs`` × ``--recons``."""
    base = [c.split(":") for c in a.configs.split(",") if c] or [[m, al or ""] for m, al in CONFIGS]
    recons = [r for r in a.recons.split(",") if r]
    out = []
    for parts in base:
        method, alloc = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        rs = [parts[2]] if len(parts) > 2 else (recons or ["default"])
        out += [(method, alloc, None if r == "default" else r) for r in rs]
    return out


def prune_row(td: str, ref: str, method: str, alloc: str | None, recon: str | None, ratio: float, a) -> dict | None:
    """Run ``edgeprune prune`` for one configuration; the row's prune figures and its output ``dir``."""
    out = f"{td}/{method}-{alloc}-{recon}-{ratio}"
    cmd = [sys.executable, "-m", "edgeprune.cli", "prune", ref, "--method", method, "--ratio", str(ratio),
           "--out", out, "--quiet", "--calib-samples", str(a.calib_samples), "--overwrite"]
    if alloc:
        cmd += ["--allocation", alloc]
    if recon:
        cmd += ["--reconstruct", recon]
    try:
        wall, rss, _ = run(cmd)
    except RuntimeError as e:
        print(f"  skipped: {e}", flush=True)
        return None
    return row_from_dir(out, method, ratio, wall, rss, " ".join(["edgeprune"] + cmd[3:]).replace(td + "/", "$WORK/"))


def row_from_dir(out: str, method: str, ratio: float, wall: float, rss: float, command: str) -> dict:
    """A row's prune figures from a pruned model folder (its prune_report.json and provenance)."""
    rep = json.loads(Path(out, "prune_report.json").read_text())
    prov = json.loads(Path(out, "config.json").read_text())["pruning"]["provenance"]
    rc = prov.get("reconstruction", {})
    return {"method": method, "allocation": rep["allocation"], "ratio": ratio,
            "reconstruct": rc.get("mode", "method default") if rc.get("mode") != "method default" else
            ("bias (FLAP)" if prov.get("bias_compensation") else "none"),
            "sequential": rc.get("sequential"), "achieved_ratio": rep["achieved_ratio"],
            "nonemb_after": rep["nonemb_after"], "params_after": rep["params_after"], "prune_wall_s": round(wall, 1),
            "score_s": rep["timings"].get("score_s"), "prune_peak_rss_mb": round(rss, 1),
            "kept_per_layer": [(r["num_key_value_heads"], r["intermediate_size"]) for r in rep["per_layer"]],
            "command": command, "dir": out}


def dense_params() -> int:
    from edgeprune.models import count_params, load

    return count_params(load(reference_model_dir()))[0]


def render(res: dict) -> str:
    rows = res["rows"]
    if "dense" in rows and "params_after" not in rows["dense"]:
        rows["dense"]["params_after"] = dense_params()
    dense = rows.get("dense", {})
    d = {s: dense.get(f"ppl.{s}.seq128") for s in PPL_SETS}
    zs_d = dense.get("zeroshot.average")
    lines = ["# Quality benchmark: ref-llama-8m", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
             *[f"Protocol ({k}): {v}  " for k, v in res["protocol"].items()], "",
             "ppl columns give the value and, in parentheses, the ratio to the dense model (lower is better). "
             "Zero-shot is the average accuracy over six tasks. Wall time and peak RSS are the prune process's.", "",
             "| method | allocation | reconstruct | target | achieved | params | WikiText-2 | PTB | held-back (in-domain) "
             "| zero-shot avg | prune wall s | scoring s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, s):
        v = r.get(f"ppl.{s}.seq128")
        return "–" if v is None else (f"{v:.2f}" + (f" ({v / d[s]:.2f}×)" if d.get(s) and r is not dense else ""))

    order = sorted(rows.values(), key=lambda r: (r["ratio"], r["method"] != "dense", r["method"], r["allocation"],
                                                 _recon(r)))
    for r in order:
        zs = r.get("zeroshot.average")
        lines.append(f"| {r['method']} | {r['allocation']} | {_recon(r)} | {r['ratio']:.0%} | {r.get('achieved_ratio', 0):.1%} | "
                     f"{r.get('params_after', 0):,} | {cell(r, 'wikitext2')} | "
                     f"{cell(r, 'ptb')} | {cell(r, 'heldout')} | "
                     f"{'–' if zs is None else f'{zs:.3f}'}{'' if zs is None or zs_d is None or r is dense else f' ({zs - zs_d:+.3f})'} | "
                     f"{r.get('prune_wall_s', '–')} | {r.get('score_s', '–')} | {r.get('prune_peak_rss_mb', '–')} |")
    lines += ["", "Kept (KV groups, MLP channels) per layer:", ""]
    for r in order:
        if "kept_per_layer" in r:
            lines.append(f"- {r['method']} / {r['allocation']} / {_recon(r)} @ {r['ratio']:.0%}: "
                         + " ".join(f"{k}/{m}" for k, m in r["kept_per_layer"]))
    cmds = [f"- {r['method']} / {_recon(r)} @ {r['ratio']:.0%}: `{r['command']}`" for r in order if "command" in r]
    if cmds:
        lines += ["", "Prune commands ($WORK: a temporary folder; every row is then evaluated with "
                  f"`edgeprune eval $WORK/... --ppl {','.join(PPL_SETS)}`):", "", *cmds]
    analysis = ROOT / "benchmarks" / "quality_analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text().strip()]
    return "\n".join(lines) + "\n"


def _recon(r: dict) -> str:
    rc = r.get("reconstruct", "-" if r["method"] == "dense" else "method default (before #13)")
    rc = f"{rc}{' seq' if r.get('sequential') else ''}"
    return rc + (f" + {r['recovery']}" if r.get("recovery") else "")


if __name__ == "__main__":
    main()
