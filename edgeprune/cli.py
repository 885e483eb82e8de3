"""The ``edgeprune`` command line. Bad input → one line on stderr, exit 2; unmeetable budget → exit 3.

Commands: prune, eval, info, export, verify, finetune, profiles, plan, run.
"""
from __future__ import annotations

import _thread
import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import EdgepruneError, Terminated


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message otherwise)
        raise EdgepruneError(f"{self.prog}: {message} (see --help)")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def _kv_options(items: list[str] | None) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise EdgepruneError(f"--opt {it!r} must look like key=value")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _input_path(v) -> Path | None:
    """An option value that names an existing file or folder (a --calib/--data/--profile path), else None."""
    return Path(v) if v and os.path.exists(str(v)) else None


def _guard_json(a, *inputs, outputs=()) -> None:
    """The output-path guard for ``--json`` (a regular file there is replaced), before any work."""
    if getattr(a, "json", None):
        from .paths import guard_output

        guard_output(a.json, kind="file", inputs=inputs, outputs=outputs, overwrite=True, flag="--json")


def _write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    from .paths import atomic_file, json_text

    with atomic_file(path) as tmp:
        tmp.write_text(json_text(obj, sort_keys=True))


# ------------------------------------------------------------------------------------------------ commands
def cmd_prune(a) -> int:
    from .prune import DEFAULT_METHOD, PruneConfig, run_prune

    from .options import check_prune
    from .paths import guard_output

    check_prune(a)
    guard_output(a.out, kind="dir", inputs=(a.model, _input_path(a.calib)), overwrite=a.overwrite)
    if a.target_format:   # what that format cannot compute, refused before any work
        from exporters.features import check_dir

        check_dir(a.model, a.target_format, a.max_context)

    cfg = PruneConfig(method=a.method or DEFAULT_METHOD, ratio=a.ratio or 0.0, allocation=a.allocation, calib=a.calib,
                      calib_samples=a.calib_samples, calib_len=a.calib_len, seed=a.seed, skip_first=a.skip_first,
                      skip_last=a.skip_last, multiple=a.round_mlp, min_kv=a.min_kv, options=_kv_options(a.opt),
                      stream=a.stream, device=a.device, device_map=a.device_map, ray=a.ray,
                      uniform_kv=a.uniform_kv, uniform_shapes=a.uniform_shapes,
                      reconstruct=a.reconstruct, sequential=a.sequential)
    cfg.check_options()   # every --opt key and value before --target-mb's host measurement (and any other work)
    target = _fit_target(a)
    if target is not None:
        cfg.ratio, cfg.target = 0.0, target
    res = run_prune(a.model, a.out, cfg, overwrite=a.overwrite, progress=not a.quiet)
    print(f"pruned with {res.method} ({res.allocation}): non-embedding params {res.nonemb_before:,} -> "
          f"{res.nonemb_after:,} (removed {res.achieved_ratio:.2%}, target {res.target_ratio:.1%}"
          + (f", the least that fits {a.target_mb:g} MB at {a.quant}" if target is not None else "") + "); "
          f"total {res.params_before:,} -> {res.params_after:,}")
    print(res.table())
    print(f"saved to {res.out}  ({res.timings['total_s']} s, peak RSS {res.peak_rss_mb:.0f} MB)")
    return 0


def _add_target_args(s) -> None:
    s.add_argument("--target-mb", type=float, default=None,
                   help="instead of --ratio: prune the least that fits N MB peak memory on llama.cpp (weights + KV "
                        "cache + this host's calibrated overhead)")
    s.add_argument("--quant", default=None, help="with --target-mb: the GGUF type the budget is for (default f16)")
    s.add_argument("--ctx", type=int, default=None,
                   help="with --target-mb: context the KV cache is counted at (default: the one verify measures at)")


def _fit_target(a):
    """``--target-mb N [--quant q] [--ctx C]`` -> a FitTarget on this host's calibrated llama.cpp figures; or None
    with ``--ratio``. Exactly one of the two is required."""
    if (a.ratio is None) == (a.target_mb is None):
        raise EdgepruneError("pass exactly one of --ratio (fraction of non-embedding parameters) and --target-mb "
                             "(peak memory on llama.cpp, MB)")
    if a.target_mb is None:
        if a.quant is not None or a.ctx is not None:
            raise EdgepruneError("--quant and --ctx go with --target-mb; drop them or use --target-mb")
        return None
    from .models import resolve_dir
    from .planner.fit import host_profile_for, memory_target, verify_context

    memory_target(a.target_mb, a.quant or "f16", a.ctx)          # bad values: exit 2 before any measurement
    ctx = a.ctx or verify_context()
    return memory_target(a.target_mb, a.quant or "f16", ctx, host_profile_for(resolve_dir(a.model), ctx))


def cmd_eval(a) -> int:
    from .data import EVAL_SETS
    from .evaluate import evaluate
    from .models import load, load_tokenizer

    # check every option before loading anything
    for name in _csv(a.ppl):
        if name not in EVAL_SETS:
            raise EdgepruneError(f"--ppl: unknown evaluation set '{name}'; use a comma list of {', '.join(EVAL_SETS)}")
    for flag, v in (("--max-chunks", a.max_chunks), ("--limit", a.limit)):
        if v is not None and v < 1:
            raise EdgepruneError(f"{flag} {v} must be >= 1 (leave it out for all)")
    if _csv(a.tasks):
        from .zeroshot import TASK_FILES

        bad = [t for t in _csv(a.tasks) if t not in TASK_FILES]
        if bad:
            raise EdgepruneError(f"--tasks: unknown task(s) {', '.join(bad)}; valid names: {', '.join(TASK_FILES)}")
    from .options import check_eval

    check_eval(a)
    _guard_json(a, a.model)
    model, tok = load(a.model), load_tokenizer(a.model)
    res = evaluate(model, tok, ppl=_csv(a.ppl), seq_len=a.seq_len, tasks=_csv(a.tasks), limit=a.limit,
                   speed=a.speed, max_chunks=a.max_chunks, progress=not a.quiet)
    res["model"] = str(Path(a.model).resolve())
    for k, v in res.items():
        if k.startswith(("ppl.", "zeroshot.", "speed.")):
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    _write_json(a.json, res)
    return 0


def model_info(model) -> dict:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    from .models import count_params, layer_shapes

    total, nonemb = count_params(model)
    q8 = GGML_QUANT_SIZES[Q.Q8_0]
    q4 = GGML_QUANT_SIZES[Q.Q4_K]
    layers = []
    hd = model.model.layers[0].self_attn.head_dim
    for i, (s, layer) in enumerate(zip(layer_shapes(model), model.model.layers)):
        n = sum(p.numel() for p in layer.parameters())
        layers.append({"layer": i, **s.to_dict(), "head_dim": hd, "params": n})
    return {"architecture": model.config.architectures[0], "total_params": total, "non_embedding_params": nonemb,
            "bytes": {"f16": total * 2, "q8_0": total * q8[1] // q8[0], "q4_k": total * q4[1] // q4[0]},
            "layers": layers}


def export_support(model) -> dict:
    """Per export format: exact, or the features it approximates / cannot compute (exporters.features table)."""
    from exporters.features import summary

    from .models import read_config, resolve_dir

    sm = summary(read_config(resolve_dir(model)))
    lines = {}
    for fmt in sm["exportable"]:
        bad = [f"{r['feature']} {r['value']}: {r[fmt]}" for r in sm["features"] if not r[fmt].startswith("exact")]
        lines[fmt] = "exact" if not bad else "; ".join(bad)
    return {**sm, "lines": lines}


def cmd_info(a) -> int:
    from .models import load

    _guard_json(a, a.model)
    info = model_info(load(a.model))
    info["export"] = export_support(a.model)
    print(f"{info['architecture']}: {info['total_params']:,} parameters, {info['non_embedding_params']:,} non-embedding")
    print("bytes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["bytes"].items()))
    for fmt, line in info["export"]["lines"].items():
        print(f"export {fmt}: {line}")
    print("| layer | q heads | kv heads | mlp | params |\n|---|---|---|---|---|")
    for r in info["layers"]:
        print(f"| {r['layer']} | {r['num_attention_heads']} | {r['num_key_value_heads']} | {r['intermediate_size']} | "
              f"{r['params']:,} |")
    _write_json(a.json, info)
    return 0


def cmd_export(a) -> int:
    import exporters

    from .paths import guard_output

    guard_output(a.out, kind="file" if a.format == "gguf" else "dir", inputs=(a.model,), overwrite=a.overwrite)
    if a.max_context is not None and a.max_context < 1:
        raise EdgepruneError(f"--max-context {a.max_context} must be >= 1 (the longest context you will run)")
    summary = exporters.export(a.model, a.format, a.out, quant=a.quant, dtype=a.dtype, target=a.target,
                               max_context=a.max_context)
    print(json.dumps(summary, indent=2, default=str))
    for note in export_notes(summary):
        print(f"edgeprune: note: {note}", file=sys.stderr)
    return 0


def export_notes(summary: dict) -> list[str]:
    """Every note an export leaves (approximations accepted, padded layers, quantization fallbacks), for stderr."""
    notes = [f"approximation accepted: {n}" for n in summary.get("approximations") or []]
    notes += [n for n in summary.get("notes") or [] if n not in (summary.get("approximations") or [])]
    fb = fallback_note(summary)
    return notes + ([fb] if fb else [])


def fallback_note(summary: dict) -> str | None:
    """One line explaining a GGUF quantization fallback (tensors whose row length the quant's block cannot take)."""
    rep = summary.get("quant_report") or {}
    fbs = rep.get("fallbacks") or []
    if not fbs:
        return None
    from exporters.gguf import BLOCK

    q = rep.get("quant") or summary.get("quant")
    got = sorted({f["got"] for f in fbs})
    rows = sorted({f["row_len"] for f in fbs})
    return (f"{len(fbs)} of {rep.get('n_tensors_quantized', '?')} quantized tensors could not take {q} (row lengths "
            f"{', '.join(map(str, rows[:6]))}{' ...' if len(rows) > 6 else ''} are not multiples of its "
            f"{BLOCK.get(q, '?')}-value block) and were stored as {', '.join(got)} instead "
            f"({rep.get('growth_mb', 0):+.3f} MB); the file is valid. To avoid it prune with --round-mlp 256 "
            "(K-quants) or 32 (q8_0), or pick q8_0")


def cmd_verify(a) -> int:
    from exporters.verify import verify

    if a.profile is not None:  # fail before minutes of measuring, not after
        from device_profiles import load_profile

        load_profile(a.profile)
    if a.threads is not None and a.threads < 1:
        raise EdgepruneError(f"--threads {a.threads} must be >= 1")
    chunks = _ppl_chunks(a.ppl_chunks)
    _guard_json(a, a.artifact, a.reference, _input_path(a.profile))
    res = verify(a.artifact, a.reference, profile=a.profile, threads=a.threads or 2, json_out=a.json,
                 ppl_chunks=chunks, progress=not a.quiet)
    print(json.dumps(res, indent=2, default=str))
    return verify_exit(res)


def _ppl_chunks(v: str) -> int | None:
    """``--ppl-chunks``: a positive number of randomly sampled chunks, or ``all`` (None: the whole text)."""
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise EdgepruneError(f"--ppl-chunks {v} must be a number >= 1 or 'all' (the whole text)")
    return n


def verify_exit(res: dict) -> int:
    """Exit code of ``verify``: PARITY_FAIL_EXIT when parity failed (approximations and the verdict on stderr)."""
    from .errors import PARITY_FAIL_EXIT

    for n in res.get("approximations") or []:
        print(f"edgeprune: note: approximation in this artifact: {n}", file=sys.stderr)
    v = res.get("parity_verdict") or {}
    if v.get("verdict") == "FAIL":
        print(f"edgeprune: parity FAIL ({v['quant']} thresholds): {'; '.join(v['failed'])}; the artifact does not "
              "compute the reference model's function (docs/troubleshooting.md, 'parity FAIL')", file=sys.stderr)
        return PARITY_FAIL_EXIT
    return 0


def cmd_validate(a) -> int:
    from exporters.remote import ADBTransport, LocalTransport, SSHTransport, validate

    t = a.transport
    if a.threads < 1 or a.threads > 1024:
        raise EdgepruneError(f"--threads {a.threads} is out of range; use 1 to 1024")
    if t.startswith("ssh:"):
        host, _, port = t[4:].partition(":")
        if not host or not (port or "22").isdigit() or not 1 <= int(port or 22) <= 65535:
            raise EdgepruneError(f"--transport {t}: expected ssh:USER@HOST[:PORT] with PORT 1-65535")
    _guard_json(a, a.artifact)
    if t == "local":
        tr = LocalTransport()
    elif t.startswith("ssh:"):
        tr = SSHTransport(host, port=int(port or 22), key=a.ssh_key, known_hosts=a.ssh_known_hosts,
                          **({"remote_dir": a.device_dir} if a.device_dir else {}))
    elif t == "adb" or t.startswith("adb:"):
        tr = ADBTransport(t[4:] or None, **({"remote_dir": a.device_dir} if a.device_dir else {}))
    else:
        raise EdgepruneError(f"--transport {t} unknown; use local, ssh:USER@HOST[:PORT] or adb[:SERIAL]")
    res = validate(a.artifact, tr, threads=a.threads).to_dict()
    print(json.dumps(res, indent=2))
    _write_json(a.json, res)
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgeprune", description="Structured pruning of LLaMA-family models for edge devices")
    p.add_argument("--version", action="version", version=__import__("edgeprune").__version__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_prune(sub)
    _add_model_commands(sub)
    _add_optional(sub)
    return p


def _add_prune(sub) -> None:
    from .allocation import ALLOCATORS
    from .importance import method_names

    s = sub.add_parser("prune", help="prune a model structurally")
    s.add_argument("model")
    s.add_argument("--method", default=None,
                   help=f"importance method (default obs: OBS cost, global allocation, sequential least-squares "
                        f"refit): {', '.join(method_names())}")
    s.add_argument("--ratio", type=float, default=None, help="fraction of non-embedding parameters to remove")
    _add_target_args(s)
    s.add_argument("--allocation", choices=list(ALLOCATORS), default=None, help="default: the method's own")
    s.add_argument("--calib", default="gutenberg", help="named set (gutenberg, wikitext2, ptb) or a .txt/.jsonl path")
    s.add_argument("--calib-samples", type=int, default=128)
    s.add_argument("--calib-len", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--skip-first", type=int, default=None, help="keep the first K layers dense")
    s.add_argument("--skip-last", type=int, default=None, help="keep the last K layers dense")
    s.add_argument("--round-mlp", type=int, default=1, help="round kept MLP width to a multiple (256 suits K-quants)")
    s.add_argument("--min-kv", type=int, default=1, help="minimum KV groups kept per layer (0 allows attention-free)")
    s.add_argument("--uniform-kv", action="store_true",
                   help="same KV heads in every layer, MLP widths free (optimum's ONNX runtime needs it)")
    s.add_argument("--uniform-shapes", action="store_true",
                   help="every layer the same shape (plain from_pretrained, llama.cpp arch 'llama')")
    s.add_argument("--opt", action="append", help="option key=value (repeatable) of the method, the allocation, the "
                   "repair stage or streaming; a key none of them takes is refused; all are in docs/methods.md")
    s.add_argument("--reconstruct", choices=["none", "bias", "lsq", "obs"], default=None,
                   help="refit o_proj/down_proj on the kept columns after removal (default: the method's own; "
                        "FLAP: bias)")
    s.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each layer's repair on the already pruned layers' outputs (default: on for "
                        "lsq/obs)")
    s.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="one decoder layer in memory at a time (default: automatic when the model does not fit)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (calibration and scoring)")
    s.add_argument("--device-map", default=None, help="'auto': spread the model over several GPUs (accelerate)")
    s.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run self-pruner fitness evaluations on this Ray cluster ('local' starts one)")
    s.add_argument("--target-format", choices=["gguf", "onnx"], default=None,
                   help="refuse up front a model that format cannot compute exactly (see edgeprune info)")
    s.add_argument("--max-context", type=int, default=None, help="with --target-format: see export --max-context")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_prune)


def _add_model_commands(sub) -> None:
    """eval, info, export, verify, validate."""
    from exporters.ppl import DEFAULT_CHUNKS as DEFAULT_PPL_CHUNKS

    s = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed in PyTorch")
    s.add_argument("model")
    s.add_argument("--ppl", default="wikitext2", help="comma list of wikitext2, ptb, heldout ('' for none)")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N chunks")
    s.add_argument("--tasks", default="", help="comma list of boolq,piqa,winogrande,arc_easy,arc_challenge,openbookqa")
    s.add_argument("--limit", type=int, default=None, help="first N examples per task")
    s.add_argument("--speed", action="store_true", help="also measure PyTorch generation tokens/s")
    s.add_argument("--json", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("info", help="per-layer shapes, parameters and bytes")
    s.add_argument("model")
    s.add_argument("--json", default=None)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("export", help="export to GGUF (llama.cpp) or ONNX (onnxruntime)")
    s.add_argument("model")
    s.add_argument("--format", choices=["gguf", "onnx"], required=True)
    s.add_argument("--quant", default=None, help="gguf: f32,f16,q8_0,q4_k_m,q5_k_m,q6_k; onnx: int8")
    s.add_argument("--dtype", default="fp32", help="onnx: fp32 or fp16")
    s.add_argument("--target", default=None, choices=["edgeprune", "optimum", "genai"],
                   help="onnx: the runtime that must load the folder; optimum needs the same KV heads in every "
                        "layer, genai (onnxruntime-genai) and edgeprune (default) take per-layer shapes; the folder "
                        "always holds config.json and genai_config.json")
    s.add_argument("--max-context", type=int, default=None,
                   help="the longest context you will run; accepts a format that is exact only up to it "
                        "(e.g. a sliding window llama.cpp does not apply, when N <= the window)")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("verify", help="check an exported artifact on its runtime against the PyTorch model")
    s.add_argument("artifact")
    s.add_argument("--reference", required=True, help="the PyTorch model directory it was exported from")
    s.add_argument("--profile", default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--ppl-chunks", default=str(DEFAULT_PPL_CHUNKS),
                   help=f"perplexity on N randomly sampled 128-token chunks, with a 95%% interval (default "
                        f"{DEFAULT_PPL_CHUNKS}), or 'all' for the whole text")
    s.add_argument("--json", default=None)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("validate", help="push an artifact to a device and run the runtime's benchmark there")
    s.add_argument("artifact")
    s.add_argument("--transport", default="local", help="local, ssh:USER@HOST[:PORT] or adb[:SERIAL]")
    s.add_argument("--device-dir", default=None, help="folder on the device for the run (default /tmp/edgeprune; "
                   "a fresh sub-folder is used and removed afterwards)")
    s.add_argument("--ssh-key", default=None, help="ssh: identity file (key authentication only)")
    s.add_argument("--ssh-known-hosts", default=None, help="ssh: known_hosts file holding the device's host key")
    s.add_argument("--threads", type=int, default=4)
    s.add_argument("--json", default=None)
    s.set_defaults(fn=cmd_validate)


def _add_optional(sub) -> None:
    """Commands whose modules register their own sub-parsers (finetune, profiles, plan, run)."""
    import importlib

    for mod in ("recovery.cli", "pipeline"):
        try:
            m = importlib.import_module(f"edgeprune.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("edgeprune"):
                continue
            raise
        m.add_parsers(sub)


def _one_line(msg, limit: int = 2000) -> str:
    """Any message as one line (a library's multi-line text joined with ' | '), capped in length."""
    s = " | ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# messages of non-OSError exceptions that are really failed writes (safetensors' Rust writer, torch.save's zip writer)
_IO_MARKERS = ("os error", "file too large", "no space left", "read-only file system", "disk quota",
               "inline_container", "pytorchstreamwriter", "unexpected pos")


# a library's own exception while it reads an input file: the input is unreadable (exit 2), not an internal error
_LIBRARY_INPUTS = {
    "onnxruntime": "onnxruntime cannot load the ONNX model ({what}); the file is truncated or corrupt: re-export it",
    "onnx": "the ONNX model cannot be read ({what}); the file is truncated or corrupt: re-export it",
    "google.protobuf": "the ONNX model cannot be parsed ({what}); the file is truncated or corrupt: re-export it",
    "safetensors": "a weights file cannot be read ({what}); re-download or re-export the model",
    "gguf": "the GGUF file cannot be read ({what}); it is truncated or corrupt: re-export it",
}


def _library_error(e: Exception, text: str) -> str | None:
    mod = type(e).__module__ or ""
    for prefix, msg in _LIBRARY_INPUTS.items():
        if mod == prefix or mod.startswith(prefix + "."):
            return msg.format(what=f"{type(e).__name__}: {text}")
    return None


def _ignore_sigxfsz() -> None:
    """Under a file-size limit (``ulimit -f``) the kernel kills the process with SIGXFSZ on the first oversized
    write; ignored, the write fails with EFBIG instead and is reported as one line like any other disk error."""
    try:
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread (main() called from a worker thread)
        pass


# the signal turned into Terminated in this process: raised inside a library, the exception can surface as the
# library's own error (a SIGTERM 0.63 s into a fine-tune ended in torch's "!dynamicLayerStack.empty()" assert)
_RECEIVED: list[int] = []


def _on_signal(signum, frame):
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)   # a second signal must not cut the cleanup short
    _RECEIVED.append(signum)
    raise Terminated(signum)


def _redeliver_swallowed(hook_args) -> None:
    """``sys.unraisablehook`` while a command runs. A signal whose handler ran inside a finaliser (``__del__``, a
    weakref callback) raised there, where Python prints the exception and drops it ("Exception ignored in ..."), so
    the command would run on with the signal lost (test_chaos: a SIGTERM 0.17 s into a fine-tune landed in the regex
    module's ``Group.__del__``). The interrupt is delivered again from outside the finaliser: 50 ms later a timer
    thread calls ``_thread.interrupt_main``, whose handler runs at the main thread's next bytecode (called at once,
    it would run inside this hook); other unraisables go on to the previous hook."""
    exc = hook_args.exc_value
    if not isinstance(exc, KeyboardInterrupt):
        return _PREVIOUS_HOOK[-1](hook_args)
    signum = getattr(exc, "signum", signal.SIGINT)
    if isinstance(exc, Terminated):
        signal.signal(signum, _on_signal)   # _on_signal set it to SIG_IGN, where interrupt_main does nothing
    timer = threading.Timer(0.05, _thread.interrupt_main, (signum,))   # late enough that this hook has returned
    timer.daemon = True
    timer.start()


_PREVIOUS_HOOK: list = []


def _handle_signals() -> dict:
    """SIGTERM and SIGHUP behave like Ctrl-C (an exception unwinds every cleanup); returns the old handlers."""
    old = {}
    try:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            old[s] = signal.getsignal(s)
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGHUP, _on_signal)
    except ValueError:  # not the main thread
        pass
    return old


def main(argv: list[str] | None = None) -> int:
    _RECEIVED.clear()
    _ignore_sigxfsz()
    old = _handle_signals()
    _PREVIOUS_HOOK.append(sys.unraisablehook)
    sys.unraisablehook = _redeliver_swallowed
    try:
        return _main(argv)
    finally:
        from .paths import release_all_outputs

        sys.unraisablehook = _PREVIOUS_HOOK.pop()
        release_all_outputs()
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args) or 0
    except KeyboardInterrupt as e:
        return _interrupted(getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # noqa: BLE001
        if _RECEIVED:   # whatever error the signal's exception turned into on its way up, it is the interrupt
            return _interrupted(_RECEIVED[0])
        return _report(e)


def _interrupted(signum: int) -> int:
    print(f"edgeprune: interrupted ({signal.Signals(signum).name}); partial outputs were removed", file=sys.stderr)
    return 128 + signum


def _report(e: Exception) -> int:
    """One stderr line and the exit code for the exception that ended a command."""
    if isinstance(e, EdgepruneError):
        print(f"edgeprune: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, MemoryError):
        print("edgeprune: error: out of memory; use a smaller model, fewer --calib-samples, or --stream", file=sys.stderr)
        return 1
    if os.environ.get("EDGEPRUNE_DEBUG"):
        raise e
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        what = e.strerror or (f"write failed: {e.args[0]}" if e.errno is None and e.args else str(e))
        print(f"edgeprune: error: {_one_line(what)}{where}; check the path, permissions and free disk "
              "space (and any file-size limit, ulimit -f)", file=sys.stderr)
        return 2
    text = _one_line(e, 300)
    if any(m in text.lower() for m in _IO_MARKERS):
        print(f"edgeprune: error: writing output failed ({type(e).__name__}: {text}); check free disk space, "
              "permissions and any file-size limit (ulimit -f), then re-run", file=sys.stderr)
        return 2
    lib = _library_error(e, text)
    if lib:
        print(f"edgeprune: error: {lib}", file=sys.stderr)
        return 2
    print(f"edgeprune: internal error: {type(e).__name__}: {text} "
          "(set EDGEPRUNE_DEBUG=1 for a traceback and report it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
