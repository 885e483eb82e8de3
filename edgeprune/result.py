"""What a prune returns and writes into ``prune_report.json``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PruneResult:
    out: str
    method: str
    allocation: str
    target_ratio: float
    achieved_ratio: float
    params_before: int
    params_after: int
    nonemb_before: int
    nonemb_after: int
    per_layer: list[dict]
    timings: dict
    peak_rss_mb: float

    def table(self) -> str:
        rows = ["| layer | q heads | kv heads | mlp | removed |", "|---|---|---|---|---|"]
        for r in self.per_layer:
            rows.append(f"| {r['layer']} | {r['num_attention_heads']} | {r['num_key_value_heads']} | "
                        f"{r['intermediate_size']} | {r['removed_frac']:.1%} |")
        return "\n".join(rows)


def jsonable(x):
    """``x`` with tensors as lists, floats rounded to 6 digits and keys as strings (for JSON reports)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float):
        return round(x, 6)
    return x
