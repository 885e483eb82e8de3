"""Bad input to every command: exit 2 (or 3 for a budget that cannot be met), exactly one stderr line naming the
file/field/value and the fix, no traceback, nothing left behind, the input never modified.

Each case runs the real CLI in its own child process: forked from a pre-imported server (``_forkserver.py``) so the
suite stays fast; ``test_contract_in_fresh_interpreter`` re-runs a representative subset through a fresh
``python -m edgeprune.cli`` exactly as a user would. Cases are listed in ``CASES`` (one ``case(...)`` line each).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from robust_helpers import (NOBODY, cached_model, edit_config, error_line, listing, module_root, run_cli_subprocess,
                            server, tiny_dir, tiny_with_ref_tokenizer, write_malicious_bin)

PRUNE = ["--method", "magnitude", "--ratio", "0.3", "--calib-samples", "4", "--calib-len", "16", "--quiet"]


@dataclass
class Case:
    id: str
    build: object                   # ctx -> argv (list) ; may create input files under ctx.inp
    must: tuple[str, ...]           # substrings of the error line: the file/field/value, then the fix
    code: int = 2
    fsize: int | None = None        # RLIMIT_FSIZE for the child (a full disk)
    readonly: bool = False          # output folder read-only (child runs as nobody when we are root)
    marker: bool = False            # the case plants code that would write ctx.marker if it ever ran


class Ctx:
    """A fresh folder per case: inputs under ``in/``, the output path ``out`` (must not exist afterwards)."""

    def __init__(self, work: Path, root: Path, ref: Path):
        self.work, self.root, self.ref = work, root, ref
        self.inp = work / "in"
        self.inp.mkdir(parents=True)
        self.out = work / "out"
        self.marker = work / "MARKER"

    # ---------------------------------------------------------------- models
    def tiny(self) -> Path:
        return cached_model(self.root, "tiny", tiny_dir)

    def tinyref(self) -> Path:
        return cached_model(self.root, "tinyref", lambda d: tiny_with_ref_tokenizer(d, self.ref))

    def tied(self) -> Path:
        return cached_model(self.root, "tied", lambda d: tiny_dir(d, tied=True))

    def text(self) -> Path:
        return self.file("ft.txt", "a b c d e f g h i j k l m n o p q r s t u v w x y z\n" * 400)

    def model(self, mutate=None, base: str = "tiny") -> Path:
        d = self.inp / "model"
        shutil.copytree(getattr(self, base)(), d)
        if mutate:
            mutate(d)
        return d

    def file(self, name: str, data: str | bytes) -> Path:
        p = self.inp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def profile(self, text: str, name: str = "p.yaml") -> Path:
        return self.file(name, text)

    def gguf(self) -> Path:
        return cached_model(self.root, "tinyref.gguf", lambda p: _export_gguf(self.tinyref(), p))


def _export_gguf(model: Path, out: Path) -> Path:
    import exporters

    out.parent.mkdir(parents=True, exist_ok=True)
    exporters.export(str(model), "gguf", str(out), quant="f32")
    return out


PIXEL = (Path(__file__).resolve().parents[2] / "device_profiles" / "pixel-8.yaml").read_text()


def _yaml_budget(mem) -> str:
    return PIXEL.replace("max_memory_mb: 2048", f"max_memory_mb: {mem}")


def _rm(*names):
    def f(d: Path):
        for n in names:
            (d / n).unlink(missing_ok=True)
    return f


def _truncate(d: Path):
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])


def _garbage_header(d: Path):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..." + b"\0" * 64)


def _index_missing_shard(d: Path):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))


def _remote_code(arch: str, marker: Path):
    def f(d: Path):
        (d / "evil.py").write_text("import pathlib\npathlib.Path(%r).write_text('remote code ran')\n"
                                   "class EvilForCausalLM: pass\nclass EvilConfig: pass\n" % str(marker))
        edit_config(d, architectures=[arch], auto_map={"AutoConfig": "evil.EvilConfig",
                                                        "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    return f


def _bad_per_layer(d: Path):
    c = json.loads((d / "config.json").read_text())
    c["pruning"]["per_layer"][1]["num_attention_heads"] = 3     # 3 q heads over 2 KV heads
    (d / "config.json").write_text(json.dumps(c))


def _run(ctx, model, profile, *extra):
    return ["run", model, "--profile", profile, "--out", ctx.out, "--no-host-calibration", *extra]


C = Case
CASES = [
    # ------------------------------------------------------------------ model folders (prune / info / eval / export)
    C("model-missing", lambda c: ["prune", c.inp / "nope", *PRUNE, "--out", c.out], ("nope", "does not exist", "pass a local")),
    C("model-is-file", lambda c: ["info", c.file("model.safetensors", b"x")], ("is a file", "pass the folder")),
    C("model-empty-dir", lambda c: ["prune", c.model(lambda d: [p.unlink() for p in d.iterdir()]), *PRUNE, "--out", c.out],
      ("no config.json", "pass a Hugging Face model directory")),
    C("config-not-json", lambda c: ["info", c.model(lambda d: (d / "config.json").write_text("{not json"))],
      ("config.json", "not valid JSON", "restore")),
    C("config-not-object", lambda c: ["info", c.model(lambda d: (d / "config.json").write_text("[1, 2]"))],
      ("config.json", "not a JSON object", "restore")),
    C("unknown-architecture", lambda c: ["prune", c.model(lambda d: edit_config(d, architectures=["GPT2LMHeadModel"])),
                                         *PRUNE, "--out", c.out], ("GPT2LMHeadModel", "not supported", "LlamaForCausalLM")),
    C("config-field-negative", lambda c: ["info", c.model(lambda d: edit_config(d, hidden_size=-64))],
      ("hidden_size", "-64", "restore")),
    C("no-weights", lambda c: ["prune", c.model(_rm("model.safetensors")), *PRUNE, "--out", c.out],
      ("no model weights", "copy the weight files")),
    C("truncated-safetensors", lambda c: ["prune", c.model(_truncate), *PRUNE, "--out", c.out],
      ("model.safetensors", "truncated", "re-download")),
    C("corrupt-safetensors-header", lambda c: ["info", c.model(_garbage_header)], ("model.safetensors", "re-download")),
    C("index-missing-shard", lambda c: ["info", c.model(_index_missing_shard)],
      ("model-00002-of-00002.safetensors", "missing", "re-download")),
    C("config-weights-shape-mismatch", lambda c: ["prune", c.model(lambda d: edit_config(d, pruning=None, intermediate_size=128)),
                                                  *PRUNE, "--out", c.out],
      ("mlp", "has shape", "config.json implies", "restore the config.json")),
    C("untied-without-lm-head", lambda c: ["info", c.model(lambda d: edit_config(d, tie_word_embeddings=False),
                                                           base="tied")], ("tie_word_embeddings", "fix")),
    C("per-layer-shapes-corrupt", lambda c: ["info", c.model(_bad_per_layer)], ("pruning.per_layer", "re-export")),
    C("tokenizer-missing", lambda c: ["prune", c.model(_rm("tokenizer.json", "tokenizer_config.json")), *PRUNE,
                                      "--out", c.out], ("no tokenizer", "copy the tokenizer files")),
    C("tokenizer-corrupt", lambda c: ["eval", c.model(lambda d: (d / "tokenizer.json").write_text("{")),
                                      "--ppl", "wikitext2", "--max-chunks", "1", "--quiet"],
      ("tokenizer cannot be loaded", "restore the tokenizer files")),
    C("remote-code-architecture", lambda c: ["info", c.model(_remote_code("EvilForCausalLM", c.marker))],
      ("EvilForCausalLM", "not supported"), marker=True),
    C("pickle-bin-refused", lambda c: ["info", c.model(lambda d: (_rm("model.safetensors")(d),
                                                                 write_malicious_bin(d, c.marker)))],
      ("pytorch_model.bin", "cannot be loaded safely", "convert it to safetensors"), marker=True),
    # ------------------------------------------------------------------ ratios, options, budgets
    C("ratio-above-1", lambda c: ["prune", c.tiny(), *PRUNE, "--ratio", "1.5", "--out", c.out], ("--ratio 1.5", "outside (0, 1)", "e.g. 0.2")),
    C("ratio-zero", lambda c: ["prune", c.tiny(), *PRUNE, "--ratio", "0", "--out", c.out], ("--ratio 0", "outside (0, 1)")),
    C("ratio-negative", lambda c: ["prune", c.tiny(), *PRUNE, "--ratio", "-0.2", "--out", c.out], ("-0.2", "outside (0, 1)")),
    C("ratio-nan", lambda c: ["prune", c.tiny(), *PRUNE, "--ratio", "nan", "--out", c.out], ("--ratio nan", "outside (0, 1)")),
    C("ratio-not-a-number", lambda c: ["prune", c.tiny(), *PRUNE, "--ratio", "abc", "--out", c.out], ("'abc'", "--help")),
    C("method-unknown", lambda c: ["prune", c.tiny(), *PRUNE, "--method", "sparsegpt", "--out", c.out],
      ("sparsegpt", "choose one of")),
    C("allocation-unknown", lambda c: ["prune", c.tiny(), *PRUNE, "--allocation", "greedy", "--out", c.out],
      ("greedy", "choose from")),
    C("round-mlp-zero", lambda c: ["prune", c.tiny(), *PRUNE, "--round-mlp", "0", "--out", c.out], ("--round-mlp 0", "must be >= 1")),
    C("min-kv-negative", lambda c: ["prune", c.tiny(), *PRUNE, "--min-kv", "-1", "--out", c.out], ("--min-kv -1", "use 0 to")),
    C("opt-not-key-value", lambda c: ["prune", c.tiny(), *PRUNE, "--opt", "alpha", "--out", c.out], ("'alpha'", "key=value")),
    # one bad value per method's typed options (checked before the model is read: nothing is left behind)
    *[C(f"opt-{m}-{k}", lambda c, m=m, k=k, v=v: ["prune", c.tiny(), *PRUNE, "--method", m, "--opt", f"{k}={v}",
                                                  "--out", c.out], (f"{k}={v}", f"{m}'s {k} must be", *allowed))
      for m, k, v, allowed in (("magnitude", "norm", "3", ("one of 1, 2",)),
                               ("flap", "metric", "BOGUS", ("one of WIFV, IFV, WIFN",)),
                               ("flap", "bias_compensation", "maybe", ("true or false",)),
                               ("llm-pruner", "taylor", "hessian", ("vectorize", "param_first")),
                               ("llm-pruner", "grad_samples", "0", (">= 1",)),
                               ("saap", "sigma", "fixed", ("one of closed, learned",)),
                               ("saap", "sigma_scope", "head", ("global", "module", "layer")),
                               ("mini-llm", "n_perturb", "0", ("an integer >= 1",)),
                               ("mini-llm", "grad", "finite", ("one of spsa, backprop",)),
                               ("bip", "lipschitz", "max", ("one_plus", "residual", "none")),
                               ("bip", "lip_tokens", "2.5", ("an integer >= 1",)))],
    C("opt-stream-propagate", lambda c: ["prune", c.tiny(), *PRUNE, "--opt", "stream_propagate=sideways", "--out", c.out],
      ("stream_propagate=sideways", "dense, pruned")),
    C("calib-samples-zero", lambda c: ["prune", c.tiny(), *PRUNE, "--calib-samples", "0", "--out", c.out], ("--calib-samples 0", "use 1 to")),
    C("calib-len-too-small", lambda c: ["prune", c.tiny(), *PRUNE, "--calib-len", "4", "--out", c.out], ("--calib-len 4", "use 8 to")),
    C("plan-budget-unmeetable", lambda c: ["plan", c.tiny(), "--profile", c.profile(_yaml_budget(1))],
      ("max_memory_mb",), code=3),
    C("run-budget-unmeetable", lambda c: _run(c, c.tiny(), c.profile(_yaml_budget(1))), ("max_memory_mb",), code=3),
    # ------------------------------------------------------------------ calibration / fine-tuning text
    C("calib-file-missing", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.inp / "nope.txt", "--out", c.out],
      ("nope.txt", "neither a named set", "pass an existing")),
    C("calib-empty", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.file("empty.txt", ""), "--out", c.out],
      ("empty.txt", "is empty", "pass a file with text")),
    C("calib-too-short", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.file("short.txt", "a b c d"), "--out", c.out],
      ("short.txt", "too short", "lower --calib-samples")),
    C("calib-not-utf8", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.file("latin1.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 50),
                                   "--out", c.out], ("latin1.txt", "not UTF-8", "iconv")),
    C("jsonl-bad-json-row", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.file("d.jsonl", '{"text": "a b"}\n{"text": \n'),
                                       "--out", c.out], ("d.jsonl", "line 2", "not valid JSON", "fix or remove")),
    C("jsonl-row-not-object", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.file("d.jsonl", '["a", "b"]\n'), "--out", c.out],
      ("d.jsonl", "line 1", "not a JSON object", "'text'")),
    C("jsonl-row-missing-fields", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.file("d.jsonl", '{"prompt": "x"}\n'),
                                             "--out", c.out], ("d.jsonl", "line 1", "neither 'text' nor 'instruction'/'output'", "add a 'text'")),
    C("calib-heldout-refused", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", "heldout", "--out", c.out],
      ("evaluation only", "calibrate on gutenberg")),
    C("calib-dir-without-text", lambda c: ["prune", c.tiny(), *PRUNE, "--calib", c.inp, "--out", c.out],
      ("holds no .txt or .jsonl", "pass a text file")),
    C("finetune-data-not-utf8", lambda c: ["finetune", c.tiny(), "--data", c.file("ft.txt", b"\xff\xfe\x00bad" * 100),
                                           "--steps", "4", "--out", c.out, "--quiet"], ("ft.txt", "not UTF-8", "iconv")),
    # ------------------------------------------------------------------ output paths
    C("out-inside-input-model", lambda c: ["prune", c.model(), *PRUNE, "--out", c.inp / "model" / "pruned"],
      ("inside the input", "outside the input model")),
    C("out-not-empty", lambda c: (c.out.mkdir(), (c.out / "keep.txt").write_text("user data"),
                                  ["prune", c.tiny(), *PRUNE, "--out", c.out])[-1], ("not empty", "--overwrite")),
    C("out-is-a-file", lambda c: (c.out.write_text("x"), ["prune", c.tiny(), *PRUNE, "--out", c.out])[-1],
      ("existing file", "pass a directory path")),
    C("out-parent-is-a-file", lambda c: ["prune", c.tiny(), *PRUNE, "--out", c.file("f", "x") / "sub" / "out"],
      ("is a file, not a folder", "choose an output path")),
    C("out-read-only", lambda c: ["prune", c.model(), *PRUNE, "--out", c.work / "ro" / "out"],
      ("cannot write", "read-only", "choose a writable location"), readonly=True),
    C("disk-full-prune", lambda c: ["prune", c.tiny(), *PRUNE, "--out", c.out], ("File too large", "free disk space"),
      fsize=64 * 1024),
    C("disk-full-export-gguf", lambda c: ["export", c.tinyref(), "--format", "gguf", "--quant", "f16", "--out", c.work / "m.gguf"],
      ("m.gguf", "write failed", "free disk space"), fsize=256 * 1024),
    C("disk-full-info-json", lambda c: ["info", c.tiny(), "--json", c.work / "info.json"], ("File too large", "free disk space"),
      fsize=300),
    # ------------------------------------------------------------------ profiles (plan / run / verify)
    C("profile-unknown-name", lambda c: ["plan", c.tiny(), "--profile", "pixel-9000"], ("pixel-9000", "choose one of")),
    C("profile-yaml-syntax", lambda c: ["plan", c.tiny(), "--profile", c.profile("name: x\nbudgets: [1, 2\n")],
      ("p.yaml", "not valid YAML", "line", "fix the syntax")),
    C("profile-yaml-python-tag", lambda c: ["plan", c.tiny(), "--profile", c.profile(
        "name: !!python/object/apply:os.system ['touch %s']\n" % c.marker)], ("p.yaml", "python/object", "fix"), marker=True),
    C("profile-not-a-mapping", lambda c: ["plan", c.tiny(), "--profile", c.profile("- a\n- b\n")], ("p.yaml", "YAML mapping")),
    C("profile-missing-budgets", lambda c: ["plan", c.tiny(), "--profile", c.profile(PIXEL.split("budgets:")[0])],
      ("p.yaml", "'budgets'", "add it")),
    C("profile-negative-budget", lambda c: ["plan", c.tiny(), "--profile", c.profile(_yaml_budget(-5))],
      ("budgets.max_memory_mb", "-5", "fix the value")),
    C("profile-unknown-quant", lambda c: ["plan", c.tiny(), "--profile", c.profile(PIXEL.replace("q8_0, q6_k", "q3_x, q6_k"))],
      ("allowed_quants", "q3_x", "allowed:")),
    C("run-profile-malformed", lambda c: _run(c, c.tiny(), c.profile("name: [unclosed\n")), ("p.yaml", "not valid YAML")),
    # ------------------------------------------------------------------ run
    C("run-model-truncated", lambda c: _run(c, c.model(_truncate), "pixel-8"), ("truncated", "re-download")),
    C("run-finetune-unknown", lambda c: _run(c, c.tiny(), "pixel-8", "--finetune", "qlora"), ("--finetune qlora", "use none, groupwise or lora")),
    C("run-format-mismatch", lambda c: _run(c, c.tiny(), "pixel-8", "--format", "onnx"), ("--format onnx", "llama.cpp", "drop --format")),
    C("run-out-inside-model", lambda c: ["run", c.model(), "--profile", "pixel-8", "--out", c.inp / "model" / "run"],
      ("inside the input model", "outside")),
    C("run-calib-samples-zero", lambda c: _run(c, c.tiny(), "pixel-8", "--calib-samples", "0"), ("--calib-samples 0", "use 1 to")),
    # ------------------------------------------------------------------ export
    C("export-unknown-format", lambda c: ["export", c.tiny(), "--format", "tflite", "--out", c.out], ("tflite", "choose from")),
    C("export-unknown-quant", lambda c: ["export", c.tinyref(), "--format", "gguf", "--quant", "q3_x", "--out", c.work / "m.gguf"],
      ("q3_x", "use one of")),
    C("export-onnx-bad-dtype", lambda c: ["export", c.tiny(), "--format", "onnx", "--dtype", "int3", "--out", c.out],
      ("int3", "use fp32 or fp16")),
    C("export-onnx-bad-quant", lambda c: ["export", c.tiny(), "--format", "onnx", "--quant", "int4", "--out", c.out],
      ("int4", "use int8")),
    C("export-onnx-int8-fp16", lambda c: ["export", c.tiny(), "--format", "onnx", "--quant", "int8", "--dtype", "fp16",
                                          "--out", c.out], ("int8", "pass --dtype fp32")),
    C("export-out-inside-model", lambda c: ["export", c.model(base="tinyref"), "--format", "gguf", "--out",
                                            c.inp / "model" / "m.gguf"], ("inside the input", "outside")),
    C("export-out-exists", lambda c: (c.file("m.gguf", "old"), ["export", c.tinyref(), "--format", "gguf", "--out",
                                                                c.inp / "m.gguf"])[-1], ("exists", "--overwrite")),
    C("export-tokenizer-not-gguf", lambda c: ["export", c.tiny(), "--format", "gguf", "--out", c.work / "m.gguf"],
      ("WordLevel", "SentencePiece")),
    C("export-odd-head-dim", lambda c: ["export", cached_model(c.root, "odd", lambda d: tiny_dir(d, hidden=60, heads=4, kv_heads=2)),
                                        "--format", "gguf", "--out", c.work / "m.gguf"], ("'head_dim'", "even integer", "15")),
    # ------------------------------------------------------------------ verify / eval / info / finetune / profiles
    C("verify-artifact-missing", lambda c: ["verify", c.work / "m.gguf", "--reference", c.tinyref()], ("m.gguf", "does not exist", "pass a .gguf")),
    C("verify-artifact-corrupt", lambda c: ["verify", c.file("m.gguf", b"GGUF" + os.urandom(256)), "--reference", c.tinyref()],
      ("m.gguf", "llama.cpp cannot load", "re-export")),
    C("verify-artifact-wrong-kind", lambda c: ["verify", c.file("m.txt", "x"), "--reference", c.tinyref()],
      ("m.txt", "neither a .gguf file nor")),
    C("verify-profile-unknown", lambda c: ["verify", c.gguf(), "--reference", c.tinyref(), "--profile", "nokia-3310"],
      ("nokia-3310", "choose one of")),
    C("eval-unknown-set", lambda c: ["eval", c.tiny(), "--ppl", "c4", "--quiet"], ("'c4'", "wikitext2")),
    C("eval-seq-len-zero", lambda c: ["eval", c.tiny(), "--seq-len", "0"], ("--seq-len 0", "use 2 to")),
    C("eval-unknown-task", lambda c: ["eval", c.tiny(), "--tasks", "mmlu"], ("mmlu", "valid names")),
    C("info-json-parent-is-file", lambda c: ["info", c.tiny(), "--json", c.file("f", "x") / "i.json"], ("--json", "is a file", "choose")),
    C("finetune-resume-without-checkpoint", lambda c: ["finetune", c.tiny(), "--data", "gutenberg", "--steps", "4", "--resume",
                                                        "--out", c.out], ("no checkpoint", "run without --resume")),
    C("finetune-resume-pickle-checkpoint", lambda c: (write_malicious_bin(c.work / "out.ckpt", c.marker, "state.pt"),
                                                       ["finetune", c.tiny(), "--data", c.text(), "--steps", "4",
                                                        "--resume", "--out", c.out, "--quiet"])[-1],
      ("state.pt", "cannot be loaded safely", "run without --resume"), marker=True),
    C("finetune-rank-too-large", lambda c: ["finetune", c.tiny(), "--data", c.text(), "--steps", "4", "--rank", "1000",
                                            "--out", c.out, "--quiet"], ("--rank 1000", "use --rank <=")),
    C("finetune-out-inside-model", lambda c: ["finetune", c.model(), "--data", "gutenberg", "--steps", "4",
                                              "--out", c.inp / "model" / "ft"], ("inside the input", "outside")),
    C("finetune-strategy-unknown", lambda c: ["finetune", c.tiny(), "--data", "gutenberg", "--strategy", "full", "--out", c.out],
      ("'full'", "choose from")),
    C("profiles-unknown-option", lambda c: ["profiles", "--all"], ("--all", "--help")),
]


root = module_root("robust")


def _readonly_area(ctx: Ctx) -> tuple[Path, int | None]:
    """``work/ro`` read-only; as root (which ignores permission bits) the child also drops to nobody, so the
    work folder must be traversable by it."""
    ro = ctx.work / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() != 0:
        return ro, None
    p = ctx.work
    while str(p) not in ("/tmp", "/"):   # let nobody traverse down to work/ (pytest's folders are 0700)
        os.chmod(p, p.stat().st_mode | 0o001)
        p = p.parent
    for f in ctx.inp.rglob("*"):         # and read the input model copy
        os.chmod(f, f.stat().st_mode | (0o005 if f.is_dir() else 0o004))
    os.chmod(ctx.inp, ctx.inp.stat().st_mode | 0o005)
    return ro, NOBODY


def run_case(case: Case, root: Path, ref: Path, tmp_path: Path) -> Ctx:
    """``case`` in a fresh :class:`Ctx` under ``tmp_path``, through the module's fork server (:func:`check_case`);
    returns the context (for a test's extra checks)."""
    srv, ctx = server(root), Ctx(tmp_path / "w", root, ref)
    check_case(case, ctx, lambda argv, **kw: srv.run(*argv, **kw))
    return ctx


def check_case(case: Case, ctx: Ctx, run) -> str:
    argv = case.build(ctx)
    models = [Path(a) for a in argv[1:] if isinstance(a, Path) and (Path(a) / "config.json").is_file()]
    digests = {m: __import__("edgeprune.models", fromlist=["dir_digest"]).dir_digest(m) for m in models}
    before = listing(ctx.work)
    out_existed = ctx.out.exists()
    uid = None
    if case.readonly:
        _, uid = _readonly_area(ctx)
        before = listing(ctx.work)
    r = run(argv, fsize=case.fsize, uid=uid)
    line = error_line(r, case.code, *case.must)
    after = listing(ctx.work)
    assert after == before, f"output left behind: {sorted(after - before)}"
    assert ctx.out.exists() == out_existed
    if (ctx.out / "keep.txt").exists():
        assert (ctx.out / "keep.txt").read_text() == "user data"
    for m, d in digests.items():
        from edgeprune.models import dir_digest

        assert dir_digest(m) == d, f"input {m} was modified"
    if case.marker:
        assert not ctx.marker.exists(), "code from the input ran"
    print(f"[{case.id}] {line}")
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, root, ref_model_dir, tmp_path):
    run_case(case, root, ref_model_dir, tmp_path)


FRESH = ("model-missing", "truncated-safetensors", "profile-yaml-python-tag", "plan-budget-unmeetable",
         "disk-full-prune", "pickle-bin-refused")


def test_contract_in_fresh_interpreter(root, ref_model_dir, tmp_path):
    """The same contract through ``python -m edgeprune.cli`` (full imports, the process exactly as a user runs it);
    the file-size limit is set in the child before exec, and the CLI itself ignores SIGXFSZ."""
    import resource

    by_id = {c.id: c for c in CASES}
    for i, cid in enumerate(FRESH):
        case = by_id[cid]
        ctx = Ctx(tmp_path / f"w{i}", root, ref_model_dir)

        def run(argv, fsize=None, uid=None):
            pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
            return run_cli_subprocess(*argv, preexec_fn=pre)

        check_case(case, ctx, run)


def test_case_count():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_marker_cases_would_really_run_code(tmp_path):
    """The planted payloads are live: unpickled without weights_only, the .bin would write its marker."""
    import torch

    m = tmp_path / "MARKER"
    write_malicious_bin(tmp_path, m)
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert m.exists()
