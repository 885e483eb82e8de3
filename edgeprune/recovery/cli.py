"""``edgeprune finetune``: recovery fine-tuning, registered into the main CLI by ``add_parsers``."""
from __future__ import annotations

import json

from ..errors import EdgepruneError


def cmd_finetune(a) -> int:
    import os

    from ..paths import guard_output
    from .finetune import finetune

    from ..options import check_finetune

    check_finetune(a)
    ins = (a.model, *(x for x in (a.data, a.teacher) if x and os.path.exists(x)))
    if a.json:   # before training, not after it
        guard_output(a.json, kind="file", inputs=ins, outputs=(a.out, a.out + ".ckpt"), overwrite=True,
                     flag="--json")
    res = finetune(a.model, a.data, a.out, strategy=a.strategy, steps=a.steps, minutes=a.minutes, lr=a.lr,
                   rank=a.rank, alpha=a.alpha, dropout=a.dropout, groups=a.groups, quantize=a.quantize,
                   seq_len=a.seq_len, batch_size=a.batch_size, seed=a.seed, resume=a.resume, eval_every=a.eval_every,
                   patience=a.patience, ckpt_every=a.ckpt_every, overwrite=a.overwrite, progress=not a.quiet,
                   stop_after=a.stop_after, threads=a.threads, teacher=a.teacher, kd_weight=a.kd_weight,
                   kd_temperature=a.kd_temperature)
    if a.json:
        from ..paths import atomic_file, json_text
        from dataclasses import asdict

        with atomic_file(a.json) as tmp:
            tmp.write_text(json_text(asdict(res)))
    if not res.complete:
        print(f"stopped after {res.steps} steps; checkpoint in {res.checkpoint_dir} (continue with --resume)")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("finetune", help="recovery fine-tuning (group-wise or plain LoRA), merged into the weights")
    s.add_argument("model", help="pruned (or dense) model directory")
    s.add_argument("--data", required=True, help="gutenberg, wikitext2, ptb, or a .txt/.jsonl file or folder")
    budget = s.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the training loop")
    s.add_argument("--strategy", choices=["groupwise", "lora"], default="groupwise")
    s.add_argument("--groups", type=int, default=4, help="groupwise: number of layer groups")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--dropout", type=float, default=0.05)
    s.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="hold frozen base weights quantized while tuning (output stays full precision)")
    s.add_argument("--teacher", default="auto",
                   help="distil from this model's logits: auto (the dense source model named in the provenance, "
                        "when present), none, or a model directory")
    s.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation term (0 = plain CE)")
    s.add_argument("--kd-temperature", type=float, default=1.0)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (steps)")
    s.add_argument("--patience", type=int, default=4, help="evaluations without improvement before a group stops")
    s.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval (steps), kept in OUT.ckpt/")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.ckpt/")
    s.add_argument("--stop-after", type=int, default=None, help="end this run after N steps, leaving the checkpoint")
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    s.add_argument("--json", default=None, help="write the result summary here")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_finetune)
