"""The run report: ``report.json``, ``report.md`` and PNG plots in the run directory.

``report.json`` carries ``predicted`` and ``measured`` blocks with the same keys (``decode_tps``, ``prefill_tps``,
``peak_rss_mb``, ``file_mb``) and a ``verdicts`` map: one entry per budget with the value it was judged on and
whether that value is ``measured`` (host profiles) or ``projected`` (a device, from host-calibrated figures).
"""
from __future__ import annotations

import json
from pathlib import Path


def best_of_repeats(m: dict) -> dict:
    """Use the best-of-N speeds (the machine may be shared; the best run is the least disturbed)."""
    return {**m, "prefill_tps": m.get("prefill_tps_best") or m["prefill_tps"],
            "decode_tps": m.get("decode_tps_best") or m["decode_tps"], "speed_stat": "best of repeats"}


KEYS = ("decode_tps", "prefill_tps", "peak_rss_mb", "file_mb")


def _plots(out: Path, per_layer: list[dict], dense_layers: list[dict], pred: dict, meas: dict, budgets: dict,
           quality: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if per_layer:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = list(range(len(per_layer)))
        kv = [p["num_key_value_heads"] / d["num_key_value_heads"] for p, d in zip(per_layer, dense_layers)]
        ff = [p["intermediate_size"] / d["intermediate_size"] for p, d in zip(per_layer, dense_layers)]
        ax.bar([i - 0.2 for i in x], kv, width=0.4, label="attention (KV groups)")
        ax.bar([i + 0.2 for i in x], ff, width=0.4, label="MLP channels")
        ax.set_xlabel("layer"), ax.set_ylabel("kept fraction"), ax.set_ylim(0, 1.3)
        ax.legend(loc="upper right", ncol=2)  # above the bars, never over them
        ax.set_title("Kept fraction per layer")
        fig.tight_layout(), _savefig(fig, out / "kept_per_layer.png"), plt.close(fig)
        files.append("kept_per_layer.png")
    fig, axs = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, budget, label in ((axs[0], "peak_rss_mb", budgets.get("max_memory_mb"), "peak memory (MB)"),
                                   (axs[1], "decode_ms", budgets.get("max_decode_ms_per_token"), "decode latency (ms/token)")):
        vals = [pred.get(key), meas.get(key)]
        ax.bar(["predicted", "measured"], [v or 0 for v in vals], color=["#8aa", "#36c"])
        if budget:
            ax.axhline(budget, color="r", ls="--", label=f"budget {budget:g}")
            ax.legend(loc="lower right")
        ax.set_title(label)
    fig.tight_layout(), _savefig(fig, out / "budget.png"), plt.close(fig)
    files.append("budget.png")
    q = [(k, quality[k]) for k in ("dense", "pruned", "finetuned") if isinstance(quality.get(k), (int, float))]
    if q:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([k for k, _ in q], [v for _, v in q], color="#6a6")
        ax.set_ylabel("perplexity"), ax.set_title(f"Quality ({quality.get('protocol', '')})", fontsize=8)
        fig.tight_layout(), _savefig(fig, out / "quality.png"), plt.close(fig)
        files.append("quality.png")
    return files


def _frontier(out: Path, plan: dict) -> bool:
    """Predicted quality loss vs predicted peak memory for every candidate of the plan (filled: feasible,
    hollow: misses a budget), one colour per quant, the chosen one starred, the memory budget dashed."""
    rows = plan.get("table") or []
    if not rows or all(r.get("loss_pct") is None for r in rows):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, q in enumerate(dict.fromkeys(r["quant"] for r in rows)):
        pts = [r for r in rows if r["quant"] == q and r.get("loss_pct") is not None]
        col = f"C{i}"
        for feas in (True, False):
            sel = [r for r in pts if r["feasible"] == feas]
            ax.scatter([r["prediction"]["peak_rss_mb"] for r in sel], [r["loss_pct"] for r in sel], s=22,
                       facecolors=col if feas else "none", edgecolors=col,
                       label=f"{q} ({'fits' if feas else 'misses a budget'})")
    ch = plan.get("chosen")
    if ch:
        ax.scatter([ch["prediction"]["peak_rss_mb"]], [ch["loss_pct"]], marker="*", s=220, c="k", zorder=5,
                   label=f"chosen: {ch['quant']} at {ch['ratio']:.3f}")
    mem = (plan.get("budgets") or {}).get("max_memory_mb")
    if mem:
        ax.axvline(mem, color="r", ls="--", lw=1, label=f"memory budget {mem:g} MB")
    ax.set_xlabel("predicted peak memory (MB)"), ax.set_ylabel(f"predicted quality loss (% ppl, {plan.get('quality_basis')})")
    ax.set_title("Candidates: quality loss vs memory")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout(), _savefig(fig, out / "frontier.png"), plt.close(fig)
    return True


def _savefig(fig, path: Path) -> None:
    """PNG written to a temp sibling and renamed (a killed run never leaves a half-written plot)."""
    from .paths import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_report(out: Path, profile, state: dict, cfg) -> dict:
    from device_profiles import load_profile  # noqa: F401

    from . import planner
    from .models import read_config, shapes_from_config
    from .paths import atomic_file, json_text
    from exporters.speed import measure_subprocess

    stages = state["stages"]
    plan = stages["plan"]
    final_dir = out / ("finetuned" if "finetune" in stages else "pruned" if "prune" in stages else "")
    if not (final_dir / "config.json").exists():
        from .models import resolve_dir

        final_dir = resolve_dir(cfg.model)
    art = out / stages["export"]["artifact"]
    ver = json.loads((out / "verify.json").read_text())
    ctx = profile.context_length
    meas_path = out / "measured_speed.json"
    if meas_path.exists():
        m = json.loads(meas_path.read_text())
    else:
        m = best_of_repeats(measure_subprocess(art, threads=cfg.threads, n_ctx=ctx, gen=64, repeats=5))
        with atomic_file(meas_path) as tmp:
            tmp.write_text(json.dumps(m, indent=2) + "\n")
    measured = {"decode_tps": m["decode_tps"], "prefill_tps": m["prefill_tps"], "peak_rss_mb": m["peak_rss_mb"],
                "file_mb": m["file_mb"], "decode_ms": 1000 / m["decode_tps"], "basis": "measured",
                "protocol": f"{m.get('runtime', '')} in a subprocess, n_ctx {ctx}, {m.get('prompt')}-token prefill, "
                            f"{m.get('gen')} decode steps, best of {m.get('repeats')}, {m.get('threads')} thread(s)"}
    p = planner.predict(str(final_dir), plan["quant"], profile, n_ctx=ctx, kv_tokens=m.get("kv_tokens"),
                        n_prompt=m.get("prompt"))
    predicted = {k: getattr(p, k) for k in KEYS} | {"decode_ms": p.decode_ms, "basis": "projected"}
    on_host = getattr(profile, "is_host", False) or profile.name in ("host",) or "host" in str(
        getattr(profile, "sources", {}).get("peak_bandwidth_gbps", ""))
    judged = measured if on_host else predicted
    b = profile.budgets
    quality = stages["verify"]["quality"]
    verdicts = _verdicts(judged, quality, profile)
    cfg_d = read_config(final_dir)
    per_layer = [s.to_dict() for s in shapes_from_config(cfg_d)]
    src_cfg = read_config(Path(cfg.model))
    dense_layers = [s.to_dict() for s in shapes_from_config(src_cfg)]
    errs = {k: round(100 * (predicted[k] - measured[k]) / measured[k], 2) for k in KEYS if measured.get(k)}
    rep = {"model": str(cfg.model), "profile": profile.name, "runtime": profile.runtime, "artifact": art.name,
           "plan": plan, "prune": stages.get("prune"), "finetune": stages.get("finetune"),
           "predicted": predicted, "measured": measured, "prediction_error_pct": errs, "verdicts": verdicts,
           "parity": ver.get("parity"), "ppl": ver.get("ppl"), "quality_pytorch": quality,
           "calibration": stages.get("calibrate", {}).get("calibration"), "per_layer": per_layer}
    plots = _plots(out, per_layer, dense_layers, predicted, measured, {"max_memory_mb": b.max_memory_mb,
                   "max_decode_ms_per_token": b.max_decode_ms_per_token}, quality)
    plan_json = out / "plan.json"
    if plan_json.exists():
        pj = json.loads(plan_json.read_text())
        rep["plan_why"], rep["plan_check"] = pj.get("why"), pj.get("check")
        rep["plan_table"] = pj.get("table_text")
        rep["quality_basis"] = pj.get("quality_basis")
        rep["plan_notes"] = pj.get("notes") or []
        if _frontier(out, pj):
            plots.append("frontier.png")
    rep["plots"] = plots
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json_text(rep))
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(_markdown(rep, profile))
    return rep


def _verdicts(judged: dict, quality: dict, profile) -> dict:
    """Budget verdicts through :func:`edgeprune.planner.judge`: speed/memory on ``judged`` (measured on the host,
    projected for a device), the perplexity increase always measured (final model vs dense, PyTorch)."""
    from .planner.judge import judge

    v = judge(judged, profile, basis=judged["basis"])
    final_q = quality.get("finetuned", quality.get("pruned", quality.get("dense")))
    if quality.get("dense") and final_q:
        d = judge({"dppl_pct": 100 * (final_q - quality["dense"]) / quality["dense"]}, profile, basis="measured")
        v.update(d)
    return {k: {"budget": x.limit, "value": round(x.value, 3), "basis": x.basis, "verdict": x.verdict,
                "headroom_pct": round(x.headroom_pct, 2)} for k, x in v.items()}


def _markdown(r: dict, profile) -> str:
    L = [f"# edgeprune report: {Path(r['model']).name} on {r['profile']}", "",
         f"Runtime {r['runtime']}, artifact `{r['artifact']}`. Plan: {r['plan']['explanation']}", ""]
    if r.get("plan_why"):
        L += [f"Why this candidate: {r['plan_why']}", ""]
    chk = r.get("plan_check") or {}
    for c in chk.get("candidates", []):
        L.append(f"- check ({chk.get('protocol')}): {c['quant']} at ratio {c['ratio']:.3f}: predicted "
                 f"Δ ln ppl {c['predicted']:+.4f}, measured {c['measured']:+.4f}")
    if chk:
        L.append("")
    if r.get("plan_table"):
        L += ["## Plan (every candidate, predicted)", "", "```", r["plan_table"], "```", ""]
        L += [f"- {n}" for n in r.get("plan_notes", [])] + ([""] if r.get("plan_notes") else [])
    if r.get("prune"):
        L.append(f"Pruned: achieved {r['prune']['achieved_ratio']:.2%} of non-embedding parameters removed, "
                 f"{r['prune']['params_after']:,} parameters.")
    if r.get("finetune"):
        L.append(f"Recovered with {r['finetune']['strategy']} fine-tuning.")
    L += ["", "## Verdicts", "", "| budget | limit | value | basis | headroom | verdict |", "|---|---|---|---|---|---|"]
    for k, v in r["verdicts"].items():
        L.append(f"| {k} | {v['budget']} | {v['value']} | {v['basis']} | {v.get('headroom_pct', 0):+.1f}% | "
                 f"**{v['verdict']}** |")
    L += ["", "## Predicted vs measured (host)", "", "| figure | predicted | measured | error |", "|---|---|---|---|"]
    for k in KEYS:
        L.append(f"| {k} | {r['predicted'][k]:.2f} | {r['measured'][k]:.2f} | {r['prediction_error_pct'].get(k, 0):+.1f}% |")
    L += ["", f"Measured: {r['measured']['protocol']}. Predicted figures are projections from the planner's model "
              "(weights + KV cache + calibrated runtime overhead; bytes per token / effective bandwidth + fixed cost).", ""]
    par = r.get("parity") or {}
    ppl = r.get("ppl") or {}
    L += ["## Accuracy on the runtime", "",
          f"- logits vs PyTorch: max |Δ| {par.get('max_abs_diff')}, argmax agreement {par.get('argmax_agreement')}, "
          f"greedy continuation identical: {par.get('greedy_match')}",
          f"- perplexity (runtime / PyTorch): {ppl.get('runtime')} / {ppl.get('reference')}",
          f"- PyTorch perplexity dense → pruned → recovered: " + " → ".join(
              f"{k} {v:.2f}" for k, v in r["quality_pytorch"].items() if isinstance(v, float))
          + f" ({r['quality_pytorch'].get('protocol')})", ""]
    L += ["## Per-layer shapes", "", "| layer | q heads | kv heads | mlp |", "|---|---|---|---|"]
    for i, s in enumerate(r["per_layer"]):
        L.append(f"| {i} | {s['num_attention_heads']} | {s['num_key_value_heads']} | {s['intermediate_size']} |")
    L += ["", *[f"![{p}]({p})" for p in r.get("plots", [])], ""]
    return "\n".join(L) + "\n"
