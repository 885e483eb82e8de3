"""scripts/bench_scale.py's results file: a later run replaces a step's row in place and keeps the replaced
figures, and the Markdown shows both with the new/old ratios (no model is built here)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_scale.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(cmd: str, steps: list[dict]) -> dict:
    mach = {"cpu": "cpu", "cores": 2, "ram_gib": 1.0, "load_avg_at_start": [1.0, 1.0, 1.0], "python": "3"}
    return {"command": cmd, "machine": mach, "steps": steps}


def test_absorbed_run_replaces_rows_in_place_and_gives_ratios(tmp_path):
    bs = _bench_module()
    old = _run("old", [{"name": "7b a", "part": "7b", "peak_rss_mb": 1000.0, "wall_s": 10.0},
                       {"name": "7b b", "part": "7b", "peak_rss_mb": 2000.0, "wall_s": 20.0},
                       {"name": "1b c", "part": "1b", "peak_rss_mb": 500.0, "wall_s": 5.0}])
    js = tmp_path / "scale.json"
    js.write_text(json.dumps({**old, "calibration": bs.CALIB, "method_options": bs.METHOD_OPTS, "protocol": "p"}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_run("new", [{"name": "7b a", "part": "7b", "peak_rss_mb": 1100.0, "wall_s": 5.0}])))
    b = bs.Bench(tmp_path, js, js.with_suffix(".md"))
    b.absorb(json.loads(new.read_text()), "abc1234")
    d = json.loads(js.read_text())
    assert [r["command"] for r in d["runs"]] == ["old", "new"] and d["runs"][1]["commit"] == "abc1234"
    assert [(s["name"], s["run"]) for s in d["steps"]] == [("7b a", 1), ("7b b", 0), ("1b c", 0)]
    assert [(s["name"], s["run"], s["peak_rss_mb"]) for s in d["replaced"]] == [("7b a", 0, 1000.0)]
    md = js.with_suffix(".md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 7b a |"))
    assert f"| {1100 / 1000:.3f} | {5 / 10:.3f} |" in row and "0, 0.98 GiB, 10 s" in row
    assert "Run 1: `new` (commit abc1234)" in md
