"""Distributed Self-Pruner search on a local 2-worker Ray cluster (skipped when ray is not installed):
the Ray-backed search equals the serial one with the same seed, and a worker killed mid-search has its candidate
retried elsewhere while the search completes with the same result."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from edgeprune import testing as T  # noqa: E402
from edgeprune.allocation import AllocOptions, allocate  # noqa: E402
from edgeprune.groups import model_groups  # noqa: E402
from edgeprune.engine import score  # noqa: E402
from edgeprune.importance import Context, get_method  # noqa: E402
from edgeprune.models import count_params  # noqa: E402

SEARCH = {"population": 6, "n_crossover": 3, "n_mutation": 3, "generations": 3}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup():
    m = T.tiny_model("gqa", layers=4, hidden=128, heads=4, ffn=256)
    ids = torch.randint(3, 128, (32, 64), generator=torch.Generator().manual_seed(0))
    ctx = Context(model=m, calib_ids=ids, progress=False)
    with torch.no_grad():
        s = score(get_method("wanda-sp"), m, ctx)
    return m, ctx, s, model_groups(m), count_params(m)[1]


def _run(setup, tmp_path, name, **extra):
    m, ctx, s, g, ne = setup
    log = tmp_path / f"{name}.jsonl"
    plan = allocate("self-pruner", s, g, AllocOptions(ratio=0.3, nonemb_params=ne,
                                                      extra={**SEARCH, "log": str(log), **extra}), ctx)
    evals = [(e["p"], e["fitness"]) for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "eval"]
    return plan, evals


@pytest.fixture(scope="module")
def serial(setup, tmp_path_factory):
    return _run(setup, tmp_path_factory.mktemp("serial"), "serial")


def _same(a, b):
    (pa, ea), (pb, eb) = a, b
    assert pa.keep_kv == pb.keep_kv and pa.keep_mlp == pb.keep_mlp
    sa, sb = pa.meta["self_pruner"], pb.meta["self_pruner"]
    assert sa["best_fitness"] == sb["best_fitness"] and sa["history"] == sb["history"]
    assert ea == eb          # every candidate, in the same order, with bit-identical fitness


def test_ray_search_equals_serial(cluster, setup, serial, tmp_path):
    dist = _run(setup, tmp_path, "ray", ray="local")
    _same(serial, dist)
    info = dist[0].meta["self_pruner"]["ray"]
    assert info["tasks"] == len(dist[1])    # one task per distinct candidate, none resubmitted
    assert len(dist[1]) > 2 * SEARCH["population"]


def _our_busy_workers() -> list[psutil.Process]:
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["pid"] in mine and cmd and cmd[0].startswith("ray::fitness_task"):
            out.append(p)
    return out


def test_killed_worker_is_retried_and_search_completes(cluster, setup, serial, tmp_path):
    killed: list[int] = []
    log = tmp_path / "kill.jsonl"
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            n = sum(1 for line in log.read_text().splitlines() if '"eval"' in line) if log.exists() else 0
            if n >= 2:                               # mid-search: the initial population is being evaluated
                busy = _our_busy_workers()
                if busy:
                    os.kill(busy[0].pid, signal.SIGKILL)
                    killed.append(busy[0].pid)
            time.sleep(0.01)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        dist = _run(setup, tmp_path, "kill", ray="local")
    finally:
        stop.set()
        th.join(10)
    assert killed, "no busy Ray worker was seen to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    _same(serial, dist)
