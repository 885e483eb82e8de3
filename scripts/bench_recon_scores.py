#!/usr/bin/env python
"""Should the importance scores see the pruned inputs? (issue #13 item 2, ``--opt recon_scores=dense|pruned``).

The default ``edgeprune prune`` (OBS importance, global allocation, sequential least-squares refit toward the
dense model with the residual-stream target) at 20 % and 50 % of the non-embedding parameters of the reference
model, with the scores computed once on the dense model (``dense``) or each layer re-scored on the outputs of the
already pruned and refitted layers (``pruned``; same per-layer counts). Each output is evaluated on two whole
texts with ``edgeprune eval --ppl heldout,ptb`` (the reference model's in-domain held-back text — never used for
calibration — and PTB test; 128-token chunks, LLM-Pruner protocol): the choice must hold on both, not on one.

Every prune and eval runs as the CLI in a child process; finished rows are kept in the JSON and skipped on a
rerun (``--fresh`` redoes them). Writes ``benchmarks/recon_scores.json`` and ``.md``.

    python scripts/bench_recon_scores.py --jobs 2              # 4 prunes + 5 whole-text evals
    python scripts/bench_recon_scores.py --ratios 0.2 --scores pruned
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("heldout", "ptb")


def reference_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from edgeprune.paths import reference_model_dir

    return reference_model_dir()


def cli(args: list[str]) -> tuple[float, str]:
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "edgeprune.cli", *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if p.returncode != 0:
        raise SystemExit(f"edgeprune {' '.join(args)} failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
    return time.time() - t, p.stderr


def row(ref: Path, ratio: float, scores: str, td: str) -> dict:
    out, js = f"{td}/{scores}-{ratio}", f"{td}/{scores}-{ratio}.json"
    prune = ["prune", str(ref), "--ratio", str(ratio), "--out", out]
    if scores != "dense":
        prune += ["--opt", f"recon_scores={scores}"]
    wall_p, _ = cli(prune)
    rep = json.loads((Path(out) / "prune_report.json").read_text())
    wall_e, _ = cli(["eval", out, "--ppl", ",".join(TEXTS), "--json", js, "--quiet"])
    ev = json.loads(Path(js).read_text())
    return {"ratio": ratio, "scores": scores, "command": "edgeprune " + " ".join(prune).replace(out, "OUT")
            + f" ; edgeprune eval OUT --ppl {','.join(TEXTS)}",
            "ppl": {t: ev[f"ppl.{t}.seq128"] for t in TEXTS}, "achieved_ratio": rep.get("achieved_ratio"),
            "keep_mlp_per_layer": [len(k) for k in rep["plan"]["keep_mlp"]],
            "keep_kv_per_layer": [len(k) for k in rep["plan"]["keep_kv"]],
            "prune_wall_s": round(wall_p, 1), "eval_wall_s": round(wall_e, 1)}


def render(d: dict) -> str:
    lines = ["# Importance scores on the dense or the pruned stream (`--opt recon_scores`)", "",
             f"Command: `{d['command']}`  ", f"Machine: {d['machine']} (shared with other jobs)  ",
             "Model: the reference model (ref-llama-8m), the default `edgeprune prune` (OBS importance, global "
             "allocation, sequential lsq refit, residual target; 128 × 128 calibration tokens of gutenberg, seed 0) "
             "with `recon_scores=dense` (scores once on the dense model) or `pruned` (each layer re-scored on the "
             "pruned stream, same per-layer counts).  ",
             "Protocol: whole texts, 128-token chunks (LLM-Pruner protocol), `edgeprune eval --ppl heldout,ptb`; "
             + (f"dense model: held-back {d['dense']['heldout']:.2f}, PTB {d['dense']['ptb']:.2f}." if d["dense"]
                else "dense model: not measured in this run."), "",
             "| ratio | scores | held-back ppl | PTB ppl | prune wall |", "|---|---|---|---|---|"]
    for r in sorted(d["rows"], key=lambda r: (r["ratio"], r["scores"])):
        cell = lambda t: f"{r['ppl'][t]:.2f}" if r["ppl"].get(t) is not None else "not reached"
        wall = f"{r['prune_wall_s']:.0f} s" if r.get("prune_wall_s") else "–"
        lines.append(f"| {r['ratio']:.0%} | {r['scores']} | {cell('heldout')} | {cell('ptb')} | {wall} |")
    return "\n".join(lines + [""] + d.get("analysis_md", []))


def dense_ppl(ref: Path, td: str) -> dict:
    cli(["eval", str(ref), "--ppl", ",".join(TEXTS), "--json", f"{td}/dense.json", "--quiet"])
    ev = json.loads(Path(f"{td}/dense.json").read_text())
    return {t: ev[f"ppl.{t}.seq128"] for t in TEXTS}


def main() -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--scores", default="dense,pruned")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once (each a CLI child process)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "recon_scores"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--rows-from", default=None, metavar="JSON",
                    help="add rows pruned and evaluated outside the script by the command each names (a JSON list "
                         "of rows in this script's format); run nothing else")
    a = ap.parse_args()
    js, md = Path(a.out).with_suffix(".json"), Path(a.out).with_suffix(".md")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    old = json.loads(js.read_text()) if js.exists() and not a.fresh else {}
    d = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
         "machine": f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}",
         "rows": old.get("rows", []), "dense": old.get("dense")}
    if a.rows_from:
        extra = json.loads(Path(a.rows_from).read_text())
        keyed = {(r["ratio"], r["scores"]) for r in extra}
        d["rows"] = [r for r in d["rows"] if (r["ratio"], r["scores"]) not in keyed] + extra
        d["command"] += " (rows read from outside runs: each row's command)"
        js.write_text(json.dumps(d, indent=2) + "\n")
        md.write_text(render(d))
        return 0
    ref = reference_model()
    todo = [(r, s) for r in map(float, a.ratios.split(",")) for s in a.scores.split(",")
            if not any(x["ratio"] == r and x["scores"] == s for x in d["rows"])]

    def save():
        js.write_text(json.dumps(d, indent=2) + "\n")
        md.write_text(render(d))
    with tempfile.TemporaryDirectory() as td, ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futs = {pool.submit(row, ref, r, s, td): (r, s) for r, s in todo}
        if d["dense"] is None:
            futs[pool.submit(dense_ppl, ref, td)] = "dense"
        for f in as_completed(futs):
            if futs[f] == "dense":
                d["dense"] = f.result()
            else:
                d["rows"].append(f.result())
            print(f"[bench_recon_scores] {futs[f]}: {json.dumps(d['dense'] if futs[f] == 'dense' else d['rows'][-1]['ppl'])}",
                  flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
