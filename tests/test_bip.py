"""LLM-BIP: MLP-channel scores are the exact block-output change; attention-group changes stay under the bound."""
import pytest
import torch

from edgeprune import testing as T
from edgeprune.calibrate import layer_forward, layer0_inputs
from edgeprune.groups import model_groups
from edgeprune.engine import score
from edgeprune.importance import Context, get_method
from edgeprune.importance.bip import attn_group_change, ffn_jacobian_ops, mlp_channel_change, token_lipschitz


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(kind):
    m = T.tiny_model(kind, layers=2, seed=3).double()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    hs, kw = layer0_inputs(m, ids)
    return m, ids, torch.cat(hs), kw


def _run(layer, x, kw):
    cap = {}
    hk = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: cap.__setitem__("a", a[0])),
          layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: cap.__setitem__("o", a[0])),
          layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: cap.__setitem__("h", a[0]))]
    with torch.no_grad():
        y = layer_forward(layer, x, kw)
    for h in hk:
        h.remove()
    return y.reshape(-1, y.shape[-1]), {k: v.reshape(-1, v.shape[-1]) for k, v in cap.items()}


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_mlp_channel_prediction_is_exact_and_attention_bound_holds(kind):
    m, ids, x, kw = _setup(kind)
    ctx = Context(model=m, calib_ids=ids, options={"lip_tokens": 10_000}, batch_size=4, progress=False)
    with torch.no_grad():
        s = score(get_method("bip"), m, ctx)
    g = torch.Generator().manual_seed(1)
    for i, (layer, lg) in enumerate(zip(m.model.layers, model_groups(m))):
        y, cap = _run(layer, x, kw)
        pred = mlp_channel_change(layer.mlp.down_proj.weight, cap["a"])
        for j in torch.randperm(lg.n_mlp, generator=g)[:6].tolist():
            w = layer.mlp.gate_proj.weight.data[j].clone()
            layer.mlp.gate_proj.weight.data[j] = 0          # a_j = silu(0)·up = 0: channel j deleted
            y2, _ = _run(layer, x, kw)
            layer.mlp.gate_proj.weight.data[j] = w
            meas = (y - y2).norm(dim=1)
            assert torch.allclose(meas, pred[:, j], rtol=1e-9, atol=1e-12)
            assert abs(float(meas.pow(2).mean().sqrt()) - float(s.mlp[i][j])) < 1e-9 * float(s.mlp[i][j]) + 1e-12
        dh = attn_group_change(layer.self_attn.o_proj.weight, cap["o"], lg)
        K = s.info["K"][i]
        span = lg.n_rep * lg.head_dim
        for gi in range(lg.n_kv):
            w = layer.self_attn.o_proj.weight.data[:, gi * span:(gi + 1) * span].clone()
            layer.self_attn.o_proj.weight.data[:, gi * span:(gi + 1) * span] = 0
            y2, _ = _run(layer, x, kw)
            layer.self_attn.o_proj.weight.data[:, gi * span:(gi + 1) * span] = w
            meas = (y - y2).norm(dim=1)
            assert (meas <= K * dh[:, gi] * (1 + 1e-9)).all(), float((meas / (K * dh[:, gi])).max())
            assert float(meas.mean()) <= float(s.attn[i][gi]) * (1 + 1e-9)
        x = y.view_as(x)  # the next layer sees this layer's dense output


def test_analytic_jacobian_matches_autograd():
    m, _, x, kw = _setup("gqa")
    layer = m.model.layers[0]
    _, cap = _run(layer, x, kw)
    h = cap["h"][:5]
    jv, jtw = ffn_jacobian_ops(layer, h)
    f = lambda t: layer.mlp(layer.post_attention_layernorm(t))
    v = torch.randn_like(h)
    for t in range(h.shape[0]):
        J = torch.autograd.functional.jacobian(f, h[t])
        assert torch.allclose(jv(v)[t], J @ v[t], atol=1e-6)  # HF RMSNorm computes in float32
        assert torch.allclose(jtw(v)[t], J.T @ v[t], atol=1e-6)  # HF RMSNorm computes in float32
        assert abs(float(token_lipschitz(layer, h[t:t + 1], iters=200)) - float(torch.linalg.matrix_norm(J, 2))) < 1e-5


def test_single_forward_no_grad():
    m = T.tiny_model("gqa", layers=2)
    ids = torch.randint(3, 128, (4, 16))
    calls = []
    hk = m.model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        score(get_method("bip"), m, Context(model=m, calib_ids=ids, batch_size=4, progress=False))
    hk.remove()
    assert len(calls) == 1 and all(p.grad is None for p in m.parameters())


def test_blockwise_upcast_matmul_matches_whole_upcast():
    """bip's Jacobian products on bf16 weights convert W one block of output columns at a time (several here)."""
    from edgeprune.numerics import block_len
    from edgeprune.importance.bip import mm

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2 * block_len(300) + 7, 300, generator=g) * 0.02).bfloat16()
    x, y = torch.randn(5, 300, generator=g), torch.randn(3, w.shape[0], generator=g)
    torch.testing.assert_close(mm(x, w, torch.float32, t=True), x @ w.float().T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mm(y, w, torch.float32), y @ w.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(mm(x, w.float(), torch.float32, t=True), x @ w.float().T)
