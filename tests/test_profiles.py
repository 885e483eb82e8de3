"""Device profiles: every shipped profile loads; malformed YAML gives one line naming file and field."""
from __future__ import annotations

import pytest
import yaml

from device_profiles import QUANTS, list_profiles, load_profile
from edgeprune.errors import EdgepruneError

SHIPPED = ["iphone-15-pro", "pixel-8", "galaxy-s24", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb",
           "macbook-air-m2-16gb", "x86-laptop-16gb-ddr5", "snapdragon-x-elite-laptop", "host"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "ep-cache"))


def test_shipped_list():
    names = list_profiles()
    for n in SHIPPED:
        assert n in names
    assert any(n.startswith("demo") for n in names)


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_loads(name):
    p = load_profile(name)
    assert p.name == name
    assert set(p.allowed_quants) <= set(QUANTS[p.runtime])
    assert 0 < p.effective_bandwidth_factor <= 1 and p.peak_bandwidth_gbps > 0
    assert p.budgets.max_memory_mb <= p.usable_memory_mb <= p.ram_gb * 1024
    for k, src in p.sources.items():          # every figure carries a source or is marked estimated
        assert src, k


def test_host_is_measured_and_cached():
    # calibration=False: other tests may have saved a host calibration (which may also raise the peak bandwidth)
    p = load_profile("host", calibration=False)
    assert p.is_host and p.cores >= 1 and p.peak_bandwidth_gbps > 0.5
    assert p.sources["peak_bandwidth_gbps"].startswith("measured")
    # second load reads the cache
    assert load_profile("host", calibration=False).peak_bandwidth_gbps == p.peak_bandwidth_gbps


def _good() -> dict:
    with open(load_profile("pixel-8").path) as f:
        return yaml.safe_load(f)


def _write(tmp_path, d) -> str:
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump(d))
    return str(f)


def test_user_file_loads(tmp_path):
    assert load_profile(_write(tmp_path, _good())).name == "pixel-8"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["device"].pop("peak_bandwidth_gbps"), "device.peak_bandwidth_gbps"),
    (lambda d: d.pop("context_length"), "context_length"),
    (lambda d: d["budgets"].pop("max_memory_mb"), "budgets.max_memory_mb"),
    (lambda d: d["device"]["peak_bandwidth_gbps"].update(value=-5), "device.peak_bandwidth_gbps"),
    (lambda d: d["device"]["effective_bandwidth_factor"].update(value=1.5), "device.effective_bandwidth_factor"),
    (lambda d: d["allowed_quants"].append("q3_k_s"), "allowed_quants"),
    (lambda d: d.update(allowed_quants=["int8"]), "allowed_quants"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["device"].update(gpu_tflops={"value": 1, "source": "x"}), "device.gpu_tflops"),
    (lambda d: d["budgets"].update(max_latency=3), "budgets.max_latency"),
    (lambda d: d["device"]["ram_gb"].pop("source"), "device.ram_gb.source"),
    (lambda d: d["device"].update(cores=0), "device.cores"),
    (lambda d: d["budgets"].update(max_memory_mb=99999), "budgets.max_memory_mb"),
    (lambda d: d.update({"class": "watch"}), "class"),
    (lambda d: d.update(runtime="tflite"), "runtime"),
    (lambda d: d["budgets"].update(max_decode_ms_per_token="fast"), "budgets.max_decode_ms_per_token"),
])
def test_malformed(tmp_path, mutate, field):
    d = _good()
    mutate(d)
    path = _write(tmp_path, d)
    with pytest.raises(EdgepruneError) as e:
        load_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and f"'{field}'" in msg, msg
    assert e.value.exit_code == 2


def test_bad_yaml_and_unknown_name(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(EdgepruneError, match="broken.yaml: not valid YAML"):
        load_profile(str(f))
    with pytest.raises(EdgepruneError, match="unknown profile 'nokia-3310'"):
        load_profile("nokia-3310")
    f.write_text("- a\n- b\n")
    with pytest.raises(EdgepruneError, match="must be a YAML mapping"):
        load_profile(str(f))
