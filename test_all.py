"""
nanoMellum test suite: CPU-only, every fast path against an independent reference.
Run: python -m pytest -q test_all.py        (slow end-to-end tests: -m slow; skip them: -m "not slow")
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import model as M  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def _tiny_model(seed=0, **overrides):
    cfg = M.get_config("test", **overrides)
    torch.manual_seed(seed)
    return M.Mellum(cfg).init_weights(seed).eval()


# =============================================================================
# model.py


def _naive_attention(q, k, v, window):
    """Softmax attention with an explicit mask, K/V heads repeated for GQA; q (B,H,T,hd), k/v (B,K,T,hd)."""
    H, K, T = q.size(1), k.size(1), q.size(2)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 1, 5, 64])
def test_attention_matches_naive_masked_softmax(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 19, 16), torch.randn(2, 2, 19, 16), torch.randn(2, 2, 19, 16)
    torch.testing.assert_close(M.attention(q, k, v, window), _naive_attention(q, k, v, window),
                               rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_rotation():
    # RoPE as multiplication by e^{i * pos * freq} on pairs (x_j, x_{j + hd/2}) (rotate-half layout)
    torch.manual_seed(0)
    cfg = M.get_config("test")
    hd, T = cfg.head_dim, 11
    x = torch.randn(1, 2, T, hd)
    for lt, theta in [(M.FULL, 500_000.0), (M.SLIDING, 10_000.0)]:
        cos, sin = M.rope_cos_sin(cfg, lt, torch.arange(T), torch.float32)
        got = M.apply_rope(x, cos, sin)
        freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2:].double())
        z = z * torch.exp(1j * torch.arange(T, dtype=torch.float64)[:, None] * freqs)
        want = torch.cat([z.real, z.imag], dim=-1).float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moe_matches_per_token_loop():
    torch.manual_seed(0)
    cfg = M.get_config("test")
    moe = M.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 7, cfg.hidden_size)
    with torch.no_grad():
        got = moe(x)
    want = torch.zeros_like(x).view(-1, cfg.hidden_size)
    Fe = cfg.moe_intermediate_size
    for t, xt in enumerate(x.view(-1, cfg.hidden_size)):
        probs = torch.softmax((moe.gate.weight @ xt).double(), dim=0)
        top = sorted(range(cfg.num_experts), key=lambda e: -probs[e])[: cfg.num_experts_per_tok]
        norm = sum(probs[e] for e in top)
        for e in top:
            gate_up = moe.experts.gate_up_proj[e] @ xt
            h = F.silu(gate_up[:Fe]) * gate_up[Fe:]
            want[t] += float(probs[e] / norm) * (moe.experts.down_proj[e] @ h)
    torch.testing.assert_close(got, want.view_as(x), rtol=1e-4, atol=1e-4)
    # load statistics count every routed slot
    assert moe.load.sum().item() == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok


def test_aux_loss_formula():
    torch.manual_seed(0)
    cfg = M.get_config("test")
    moe = M.MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    x = torch.randn(3, 5, cfg.hidden_size)
    moe(x)
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    probs = torch.softmax(x.view(-1, cfg.hidden_size) @ moe.gate.weight.T, dim=-1)
    chosen = probs.topk(K, dim=-1).indices
    f = torch.tensor([(chosen == e).sum().item() for e in range(E)], dtype=torch.float32) / chosen.numel()
    want = E * sum(f[e] * probs[:, e].mean() for e in range(E))
    torch.testing.assert_close(moe.aux_loss, want, rtol=1e-5, atol=1e-6)
    # uniform routing gives exactly 1
    moe.gate.weight.data.zero_()
    moe(x)
    assert abs(moe.aux_loss.item() - 1.0) < 1e-6


@pytest.mark.parametrize("chunks", [[11] + [1] * 19, [5, 12, 13], [30]])
def test_kv_cache_decoding_equals_full_forward(chunks):
    m = _tiny_model()  # sliding window 8 < 30 positions: the ring buffer wraps several times
    idx = torch.randint(0, m.config.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        full, _ = m(idx)
        cache, outs, t = M.KVCache(m.config, 2, 40), [], 0
        for n in chunks:
            outs.append(m(idx[:, t:t + n], cache=cache)[0])
            t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    ring = [c for c, lt in zip(cache.layers, m.config.layer_types) if lt == M.SLIDING]
    assert all(c.k.size(2) == m.config.sliding_window + 4 for c in ring)  # bounded memory on sliding layers


def test_kv_cache_rewind_forgets_rejected_positions():
    m = _tiny_model()
    idx = torch.randint(0, m.config.vocab_size, (1, 26))
    with torch.no_grad():
        full, _ = m(idx)
        cache = M.KVCache(m.config, 1, 40)
        m(idx[:, :20], cache=cache)
        m(torch.randint(0, m.config.vocab_size, (1, 3)), cache=cache)  # three drafted tokens, all rejected
        cache.rewind(3)
        got, _ = m(idx[:, 20:], cache=cache)
    torch.testing.assert_close(got, full[:, 20:], rtol=1e-4, atol=1e-4)


def test_mtp_predicts_token_two_ahead():
    m = _tiny_model()
    idx = torch.randint(0, m.config.vocab_size, (2, 12))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    with torch.no_grad():
        _, losses = m(idx, targets)
        h = m.hidden(idx)
        # position t sees only h[<=t] and tokens <= t+1, and is scored against token t+2
        per_pos = []
        for t in range(idx.size(1) - 2):
            logits_t = m.lm_head(m.mtp_hidden(h[:, : t + 1], idx[:, 1: t + 2]))[:, -1]
            per_pos.append(F.cross_entropy(logits_t, idx[:, t + 2], reduction="none"))
    torch.testing.assert_close(losses["mtp"], torch.stack(per_pos).mean(), rtol=1e-5, atol=1e-5)


def test_mtp_cache_matches_full_mtp_forward():
    m = _tiny_model()
    idx = torch.randint(0, m.config.vocab_size, (1, 20))
    with torch.no_grad():
        h = m.hidden(idx)
        want = m.mtp_hidden(h[:, :-1], idx[:, 1:])
        cache = M.KVCache(m.config, 1, 32)
        got = [m.mtp_hidden(h[:, t:t + 1], idx[:, t + 1:t + 2], cache) for t in range(19)]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-4, atol=1e-4)


def test_mellum2_12b_parameter_counts_on_meta():
    # independent count from the published shapes
    V, D, L, H, K, hd, E, k, Fe = 98_304, 2304, 28, 32, 4, 128, 64, 8, 896
    attn = D * H * hd * 2 + D * K * hd * 2 + 2 * hd
    expert = 3 * D * Fe
    per_layer_total = attn + E * expert + E * D + 2 * D
    per_layer_active = attn + k * expert + E * D + 2 * D
    c = M.count_params(M.get_config("mellum2-12b"))
    assert c["total"] == 2 * V * D + D + L * per_layer_total
    assert c["active"] == 2 * V * D + D + L * per_layer_active
    assert abs(c["total"] / 1e9 - 12.15) < 0.01 and abs(c["active"] / 1e9 - 2.44) < 0.01
    assert c["mtp_total"] == 3 * D + 2 * D * D + per_layer_total


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        M.get_config("test", num_attention_heads=5)
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        M.get_config("test", layer_types=[M.FULL] * 3)
    with pytest.raises(ValueError, match="unknown preset"):
        M.get_config("nope")


def test_save_pretrained_round_trip_and_errors(tmp_path):
    pytest.importorskip("safetensors")
    m = _tiny_model(seed=3)
    m.save_pretrained(str(tmp_path / "ckpt"))
    m2 = M.Mellum.from_pretrained(str(tmp_path / "ckpt"))
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # a config from another model
    import json
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        M.Mellum.from_pretrained(str(tmp_path / "ckpt"))
    # a config whose shapes disagree with the weights names the tensor
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "head_dim": 8}))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.\w+\.weight' has shape"):
        M.Mellum.from_pretrained(str(tmp_path / "ckpt"))


def _hf_pair(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers")
    cfg = M.get_config("test", **overrides)
    hf_cfg = transformers.MellumConfig(**{k: v for k, v in cfg.to_hf().items()
                                          if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    return cfg, transformers.MellumForCausalLM(hf_cfg).float().eval(), transformers


@pytest.mark.parametrize("window", [5, 64])
def test_loads_transformers_checkpoint_with_same_logits(tmp_path, window):
    cfg, hf, _ = _hf_pair(tmp_path, sliding_window=window)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = M.Mellum.from_pretrained(str(tmp_path / "hf"))
    idx = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4


def test_transformers_loads_our_checkpoint_with_same_logits(tmp_path):
    cfg, _, transformers = _hf_pair(tmp_path, sliding_window=5)
    ours = _tiny_model(seed=1, sliding_window=5)
    ours.save_pretrained(str(tmp_path / "ours"))
    hf = transformers.MellumForCausalLM.from_pretrained(str(tmp_path / "ours")).float().eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4


def test_training_checkpoint_round_trip(tmp_path):
    m = _tiny_model(seed=2)
    M.save_checkpoint(str(tmp_path), 7, m, {"stage": "test"}, optim_state={"x": 1})
    m2, meta = M.load_checkpoint(str(tmp_path))
    assert meta["step"] == 7 and meta["stage"] == "test"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert M.load_optim_state(str(tmp_path), 7) == {"x": 1}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        M.load_checkpoint(str(tmp_path / "empty"))
