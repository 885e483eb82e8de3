"""On-device validation runner: the local transport runs the real push -> benchmark -> parse steps."""
import json

import pytest

from edgeprune.errors import EdgepruneError
from exporters.remote import LocalTransport, parse_llama_bench, parse_time_v, validate


def test_local_transport_end_to_end(tmp_path, ref_model_dir):
    pytest.importorskip("llama_cpp")
    import exporters

    art = tmp_path / "m.gguf"
    exporters.export(str(ref_model_dir), "gguf", str(art), quant="q8_0")
    res = validate(art, LocalTransport(tmp_path / "device"), prompt=16, gen=8, threads=1)
    assert (tmp_path / "device" / "m.gguf").read_bytes() == art.read_bytes()   # pushed
    assert res.decode_tps > 0 and res.prefill_tps > 0 and res.peak_rss_mb > 1
    assert res.transport == "local" and "exporters.speed" in res.command


def test_llama_bench_and_time_parsing():
    out = "build info\n" + json.dumps([
        {"model_filename": "m.gguf", "n_prompt": 128, "n_gen": 0, "avg_ts": 812.5, "stddev_ts": 3.1},
        {"model_filename": "m.gguf", "n_prompt": 0, "n_gen": 32, "avg_ts": 41.25, "stddev_ts": 0.4}])
    assert parse_llama_bench(out) == (812.5, 41.25)
    assert parse_time_v("\tMaximum resident set size (kbytes): 204800\n") == 200.0
    assert parse_time_v("no time output") is None
    with pytest.raises(EdgepruneError, match="not JSON"):
        parse_llama_bench("[not json")


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(EdgepruneError, match="does not exist"):
        validate(tmp_path / "nope.gguf", LocalTransport(tmp_path))
