"""The engine's extension points (edgeprune/engine.py): the per-layer repair stage sees the layer after its kept
groups are chosen and before surgery, with the calibration inputs of the dense path or, in sequential mode, of the
already pruned (and repaired) layers; calibration hooks run once per layer; what repair writes is kept."""
from __future__ import annotations

import pytest
import torch

from edgeprune import testing as T
from edgeprune.calibrate import layer0_inputs, layer_forward
from edgeprune.engine import EngineConfig, run
from edgeprune.importance import get_method
from edgeprune.layer_io import ResidentSink, ResidentSource
from edgeprune.models import count_params, decoder_layers
from edgeprune.prune import PruneConfig, engine_config

CAL = dict(calib_samples=6, calib_len=24)


def _run(model, allocation, propagate, repair=None, hooks=()):
    cfg = PruneConfig("wanda-sp", 0.3, allocation=allocation, options={"stream_propagate": propagate}, **CAL)
    method = get_method("wanda-sp")
    tok_ids = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    from edgeprune.importance import Context

    ctx = Context(model=model, calib_ids=tok_ids, progress=False)
    ecfg = engine_config(cfg, method, len(decoder_layers(model)), count_params(model)[1], False,
                         repair=repair, hooks=hooks)
    return run(ResidentSource(model), ResidentSink(None, None), method, ctx, ecfg), tok_ids


def _inputs_of(model, ids):
    """Hidden states entering every layer of ``model`` (as the engine cuts the batches)."""
    hs, kw = layer0_inputs(model, ids, 16)
    out = []
    with torch.no_grad():
        for layer in decoder_layers(model):
            out.append(torch.cat(hs))
            hs = [layer_forward(layer, h, kw) for h in hs]
    return out


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("propagate", ["dense", "pruned"])
def test_repair_sees_kept_groups_and_the_right_inputs(allocation, propagate):
    dense = T.tiny_model("gqa", seed=2, layers=3)
    model = T.tiny_model("gqa", seed=2, layers=3)
    seen, hook_calls = [], []

    def repair(work):
        assert work.layer.mlp.down_proj.in_features == work.groups.n_mlp      # before surgery
        seen.append((work.index, list(work.keep_kv), list(work.keep_mlp), torch.cat(work.inputs).clone()))
        with torch.no_grad():                                                  # a visible "repair"
            work.layer.mlp.down_proj.weight[:, work.keep_mlp[0]] *= 2

    def hook(i, layer):
        hook_calls.append(i)
        return []

    res, ids = _run(model, allocation, propagate, repair, [hook])
    assert [s[0] for s in seen] == [0, 1, 2] and hook_calls == [0, 1, 2]
    assert [s[1] for s in seen] == res.plan.keep_kv and [s[2] for s in seen] == res.plan.keep_mlp
    want = _inputs_of(model if propagate == "pruned" else dense, ids)
    for (i, *_, got), w in zip(seen, want):
        assert torch.equal(got, w), i
    for layer, dl, keep in zip(decoder_layers(model), decoder_layers(dense), res.plan.keep_mlp):
        assert torch.equal(layer.mlp.down_proj.weight[:, 0], 2 * dl.mlp.down_proj.weight[:, keep[0]])


def test_sequential_differs_from_dense_only_through_the_inputs():
    a, _ = _run(T.tiny_model("gqa", seed=4, layers=3), "uniform", "dense")
    b, _ = _run(T.tiny_model("gqa", seed=4, layers=3), "uniform", "pruned")
    assert a.plan.keep_kv[0] == b.plan.keep_kv[0] and a.plan.keep_mlp[0] == b.plan.keep_mlp[0]   # layer 0: same inputs
    assert a.passes == b.passes == 1


def test_engine_config_defaults_are_no_ops():
    cfg = EngineConfig(allocation="uniform", alloc=None)
    assert cfg.repair is None and cfg.hooks == [] and cfg.propagate == "dense"
