"""
nanoMellum test suite: CPU-only, every fast path against an independent reference.
    python -m pytest -q test_all.py                 everything (a few minutes on 2 cores)
    python -m pytest -q test_all.py -m "not slow"   skip the end-to-end runs
Sections: model.py, kernels.py (Triton kernels through the interpreter on CPU), muon.py, data.py, pretrain.py,
sample.py, extend.py. Helpers are prefixed with _ and live next to the tests that use them.
"""
import base64
import copy
import datetime
import functools
import io
import json
import math
import os
import random
import re
import sysconfig
from contextlib import redirect_stdout
from fractions import Fraction

import torch

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU; set before importing them
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import extend  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
import muon  # noqa: E402
from muon import MuonAdamW, newton_schulz, param_groups  # noqa: E402
import pretrain  # noqa: E402
import sample as S  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: one thread is as fast, and immune to oversubscribed cores


def _tiny_model(seed=0, **overrides):
    cfg = M.get_config("test", **overrides)
    torch.manual_seed(seed)
    return M.Mellum(cfg).init_weights(seed).eval()


# =============================================================================
# model.py


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


@pytest.mark.parametrize("shape", [(2, 7), (1, 1)])  # many tokens per expert, and one token (empty experts)
def test_moe_matches_per_token_loop(shape):
    torch.manual_seed(0)
    cfg = M.get_config("test")
    moe = M.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(*shape, cfg.hidden_size)
    with torch.no_grad():
        got = moe(x)
    want = torch.zeros_like(x).view(-1, cfg.hidden_size)
    Fe = cfg.moe_intermediate_size
    for t, xt in enumerate(x.view(-1, cfg.hidden_size)):
        probs = torch.softmax((moe.gate.weight.detach() @ xt).double(), dim=0)
        top = sorted(range(cfg.num_experts), key=lambda e: -probs[e])[: cfg.num_experts_per_tok]
        norm = sum(probs[e] for e in top)
        for e in top:
            gate_up = moe.experts.gate_up_proj[e] @ xt
            h = F.silu(gate_up[:Fe]) * gate_up[Fe:]
            want[t] += float(probs[e] / norm) * (moe.experts.down_proj[e] @ h).detach()
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


# =============================================================================
# kernels.py

_DEV = "cuda" if torch.cuda.is_available() else "cpu"
_CAN_LAUNCH = kernels.HAS_TRITON and (torch.cuda.is_available() or kernels.INTERPRET)
_needs_launch = pytest.mark.skipif(not _CAN_LAUNCH, reason="needs CUDA or TRITON_INTERPRET=1 (and triton)")
_needs_fp8 = pytest.mark.skipif(not _CAN_LAUNCH or (torch.cuda.is_available() and not kernels.fp8_supported("cuda")),
                                reason="needs an FP8 GPU (sm89+) or the Triton interpreter")
_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# fp32 inputs: exact-ish in the interpreter; tl.dot runs in tf32 on a GPU.
_ATTN_TOL = dict(atol=2e-2, rtol=2e-2) if torch.cuda.is_available() else dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def _exact_fp8_cast(monkeypatch):
    """Triton 3.9's interpreter casts float32 -> fp8 without carrying a rounded-up mantissa into the exponent
    (125.3 -> 64, not 128) and rounds ties up. The GPU instruction (cvt.rn.satfinite) is right; so is torch's
    cast, which the interpreter uses here instead. Kernels clamp to the fp8 range before casting, so torch's
    non-saturating cast agrees with the GPU's saturating one."""
    if not kernels.INTERPRET:
        return
    import triton.language as tl
    from triton.runtime import interpreter
    original = interpreter._convert_float
    targets = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def convert(data, src, dst, rounding_mode):
        if dst in targets and src == tl.float32:
            return torch.from_numpy(np.ascontiguousarray(data)).to(targets[dst]).view(torch.uint8).numpy()
        return original(data, src, dst, rounding_mode)
    monkeypatch.setattr(interpreter, "_convert_float", convert)


def _rand(*shape, scale=1.0, grad=False):
    return (torch.randn(*shape, device=_DEV) * scale).requires_grad_(grad)


# -----------------------------------------------------------------------------
# Attention

def _naive_attention(q, k, v, window):
    """One query at a time over its visible keys max(0, i-W+1)..i; GQA by indexing the shared K/V head."""
    B, H, T, hd = q.shape
    kv_head = torch.arange(H) // (H // k.size(1))
    rows = []
    for i in range(T):
        lo = 0 if window is None else max(0, i - window + 1)
        kk, vv = k[:, kv_head, lo:i + 1], v[:, kv_head, lo:i + 1]  # (B, H, n, hd)
        w = torch.softmax((kk @ q[:, :, i, :, None]).squeeze(-1) / math.sqrt(hd), dim=-1)
        rows.append((w[..., None] * vv).sum(2))
    return torch.stack(rows, dim=2)


# (B, H, K, T, hd, window, block_m, block_n): GQA and MHA, T not a multiple of the blocks, windows smaller
# than a block, spanning blocks, of one key, and wider than T.
_ATTN_CASES = [
    (1, 4, 2, 37, 16, None, 32, 16),
    (2, 2, 1, 70, 32, 10, 32, 16),
    (1, 2, 2, 37, 16, 1, 16, 16),
    (1, 4, 1, 70, 16, 40, 32, 32),
    (1, 2, 1, 37, 64, 100, 32, 16),
]


@pytest.mark.parametrize("case", _ATTN_CASES[:3])
def test_attention_ref_matches_naive(case):
    B, H, K, T, hd, window, _, _ = case
    q, k, v = _rand(B, H, T, hd), _rand(B, K, T, hd), _rand(B, K, T, hd)
    torch.testing.assert_close(kernels.attention_ref(q, k, v, window), _naive_attention(q, k, v, window),
                               atol=1e-5, rtol=1e-5)


@_needs_launch
@pytest.mark.parametrize("case", _ATTN_CASES)
def test_flash_attention_forward_backward(case):
    B, H, K, T, hd, window, bm, bn = case
    q, k, v = _rand(B, H, T, hd, grad=True), _rand(B, K, T, hd, grad=True), _rand(B, K, T, hd, grad=True)
    do = _rand(B, H, T, hd)
    o = kernels.flash_attention(q, k, v, window, block_m=bm, block_n=bn)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = _naive_attention(q, k, v, window)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    torch.testing.assert_close(o, o_ref, **_ATTN_TOL)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **_ATTN_TOL, msg=lambda m: f"d{name}: {m}")


@_needs_launch
def test_flash_attention_never_reads_blocks_outside_the_window():
    """NaN in keys/values 0..15: queries whose window starts after key block 0 (T=64, W=8, blocks of 16:
    rows >= 32) stay finite and exact only if that block is skipped rather than masked."""
    T, W, hd = 64, 8, 16
    q, k, v = _rand(1, 2, T, hd, grad=True), _rand(1, 1, T, hd), _rand(1, 1, T, hd)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, :16], v_bad[:, :, :16] = float("nan"), float("nan")
    o = kernels.flash_attention(q, k_bad, v_bad, W, block_m=16, block_n=16)
    (dq,) = torch.autograd.grad(o[:, :, 32:].sum(), q)
    o_ref = _naive_attention(q, k, v, W)
    (dq_ref,) = torch.autograd.grad(o_ref[:, :, 32:].sum(), q)
    torch.testing.assert_close(o[:, :, 32:], o_ref[:, :, 32:], **_ATTN_TOL)
    torch.testing.assert_close(dq[:, :, 32:], dq_ref[:, :, 32:], **_ATTN_TOL)


@_needs_launch
def test_flash_attention_rejects_bad_input():
    q, k = _rand(1, 3, 8, 16), _rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="H % K"):
        kernels.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="window"):
        kernels.flash_attention(q[:, :2], k, k, window=0)


@_needs_cuda
@pytest.mark.parametrize("hd,window", [(64, None), (128, 256)])
def test_flash_attention_bf16_gpu(hd, window):
    B, H, K, T = 2, 8, 2, 1000
    q, k, v = (torch.randn(B, n, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (H, K, K))
    do = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)
    o = kernels.flash_attention(q, k, v, window)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = kernels.attention_ref(q.float(), k.float(), v.float(), window)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do.float())
    torch.testing.assert_close(o.float(), o_ref, atol=2e-2, rtol=2e-2)
    for g, g_ref in zip(grads, grads_ref):  # bf16 P and dS in the matmuls: a few bf16 ulps
        torch.testing.assert_close(g.float(), g_ref, atol=5e-2, rtol=5e-2)


# -----------------------------------------------------------------------------
# Dispatch

def test_dispatch_predicates(monkeypatch):
    assert not kernels.use_kernels("cpu") and not kernels.use_kernels(torch.device("cpu"))
    assert not kernels.fp8_supported("cpu")
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.use_kernels("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_bench_on_cpu_says_it_needs_a_gpu(capsys):
    kernels.bench()
    assert "no CUDA device" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# FP8 quantisation

_FP8 = {  # dtype: (max, half of the relative spacing of normal numbers, spacing of subnormals)
    torch.float8_e4m3fn: (448.0, 2.0**-4, 2.0**-9),
    torch.float8_e5m2: (57344.0, 2.0**-3, 2.0**-16),
}


def _check_round_trip(x, q, scale_per_elem, dtype):
    """Scale = amax / fp8_max per tile (1 for a zero tile); q * scale within half an fp8 step of x."""
    fp8_max, rel, sub = _FP8[dtype]
    deq = q.float() * scale_per_elem
    assert torch.isfinite(deq).all()
    assert ((deq - x).abs() <= rel * x.abs() + sub / 2 * scale_per_elem + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_refs_follow_the_formula(dtype):
    fp8_max = _FP8[dtype][0]
    x = _rand(5, 70, scale=3.0)
    x[1] = 0.0
    x[2, :32] = 0.0  # one zero tile next to a non-zero one
    q, s = kernels.quantize_rowwise_ref(x, dtype, tile=32)
    for r in range(5):
        for t in range(3):
            amax = x[r, 32 * t:32 * (t + 1)].abs().max().item()
            assert s[r, t].item() == pytest.approx(amax / fp8_max if amax else 1.0, rel=1e-6)
    _check_round_trip(x, q, s.repeat_interleave(32, 1)[:, :70], dtype)
    assert (q[1].float() == 0).all()

    w = _rand(2, 40, 50)
    q, s = kernels.quantize_blockwise_ref(w, dtype, tile=32)
    for e in range(2):
        for i in range(2):
            for j in range(2):
                amax = w[e, 32 * i:32 * (i + 1), 32 * j:32 * (j + 1)].abs().max().item()
                assert s[e, i, j].item() == pytest.approx(amax / fp8_max, rel=1e-6)
    _check_round_trip(w, q, s.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :40, :50], dtype)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_colwise_ref_tiles_each_expert_separately(dtype):
    fp8_max = _FP8[dtype][0]
    x = _rand(30, 6)
    x[11:19, 2] = 0.0  # an all-zero column tile
    offs = torch.tensor([0, 11, 11, 30], dtype=torch.int32, device=_DEV)  # empty first and third expert
    qT, s = kernels.quantize_colwise_grouped_ref(x, offs, dtype, tile=8)
    # Expert 1 owns rows 0..10 -> tiles [0, 8), [8, 11); expert 3 owns rows 11..29 -> [11, 19), [19, 27), [27, 30).
    tiles = [(0, 8), (8, 11), (11, 19), (19, 27), (27, 30)]
    scale_rows = torch.empty(30, 6, device=_DEV)
    for t, (a, b) in enumerate(tiles):
        amax = x[a:b].abs().amax(0)
        torch.testing.assert_close(s[t], torch.where(amax > 0, amax / fp8_max, 1.0), atol=0, rtol=1e-6)
        scale_rows[a:b] = s[t]
    assert (s[len(tiles):] == 1).all()
    _check_round_trip(x, qT.t(), scale_rows, dtype)


@_needs_fp8
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_kernels_match_refs(dtype, _exact_fp8_cast):
    x = _rand(37, 80, scale=10.0)
    x[3] = 0.0
    x[:, 5] = 0.0
    q, s = kernels.quantize_rowwise(x, dtype, tile=32)
    q_ref, s_ref = kernels.quantize_rowwise_ref(x, dtype, tile=32)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)

    w = _rand(3, 40, 70)
    q, s = kernels.quantize_blockwise(w, dtype, tile=32)
    q_ref, s_ref = kernels.quantize_blockwise_ref(w, dtype, tile=32)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)

    offs = torch.tensor([5, 5, 30, 37, 37], dtype=torch.int32, device=_DEV)
    q, s = kernels.quantize_colwise_grouped(x, offs, dtype, tile=16)
    q_ref, s_ref = kernels.quantize_colwise_grouped_ref(x, offs, dtype, tile=16)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)


# -----------------------------------------------------------------------------
# FP8 grouped GEMM

def _grouped_fp32(x, w, offs):
    starts = [0] + offs.tolist()[:-1]
    return torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip(starts, offs.tolist()))])


def _dequant_tiles(x, dtype, tile=128):
    """Independent emulation: quantise each 1 x tile piece of every row with scale amax / fp8_max."""
    out = torch.empty_like(x)
    for a in range(0, x.size(-1), tile):
        piece = x[..., a:a + tile]
        scale = piece.abs().amax(-1, keepdim=True).clamp_min(1e-30) / _FP8[dtype][0]
        out[..., a:a + tile] = (piece / scale).to(dtype).float() * scale
    return out


def test_fp8_recipe_matches_an_independent_emulation():
    """y = Q4(x) Q4(w)^T; dx = Q5(dy) Q4(w); dw[e] = Q5c(dy_e)^T Q4c(x_e): Q4/Q5 E4M3/E5M2 with 1x128 row
    tiles, w in 128x128 blocks, Q..c in 128x1 column tiles that restart at each expert's first row."""
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    x, w = _rand(150, 300, grad=True), _rand(3, 140, 300, grad=True)
    offs = torch.tensor([7, 7, 150], dtype=torch.int32, device=_DEV)
    w_deq = torch.empty_like(w)
    for a in range(0, 140, 128):  # one scale per 128 x 128 block
        for b in range(0, 300, 128):
            blk = w[:, a:a + 128, b:b + 128].detach()
            scale = blk.abs().amax(dim=(1, 2), keepdim=True) / 448.0
            w_deq[:, a:a + 128, b:b + 128] = (blk / scale).to(e4).float() * scale
    y = kernels.fp8_grouped_linear_ref(x, w, offs)
    torch.testing.assert_close(y, _grouped_fp32(_dequant_tiles(x.detach(), e4), w_deq, offs), atol=1e-4, rtol=1e-5)
    dy = _rand(*y.shape)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx_expected = _grouped_fp32(_dequant_tiles(dy, e5), w_deq.transpose(1, 2), offs)
    torch.testing.assert_close(dx, dx_expected, atol=1e-4, rtol=1e-5)
    starts = [0] + offs.tolist()[:-1]
    for e, (a, b) in enumerate(zip(starts, offs.tolist())):
        dy_e, x_e = _dequant_tiles(dy[a:b].t(), e5), _dequant_tiles(x[a:b].detach().t(), e4)
        torch.testing.assert_close(dw[e], dy_e @ x_e.t(), atol=1e-4, rtol=1e-5)


def test_fp8_emulation_is_close_to_fp32():
    """Stated tolerance: relative Frobenius error < 6% forward (E4M3), < 10% gradients (E5M2 dy)."""
    x, w = _rand(70, 160, grad=True), _rand(4, 48, 160, scale=0.1, grad=True)
    offs = torch.tensor([0, 30, 30, 70], dtype=torch.int32, device=_DEV)
    y = kernels.fp8_grouped_linear_ref(x, w, offs)
    dy = _rand(*y.shape)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y32 = _grouped_fp32(x, w, offs)
    dx32, dw32 = torch.autograd.grad(y32, (x, w), dy)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, y32) < 0.06 and rel(dx, dx32) < 0.1 and rel(dw, dw32) < 0.1
    assert dw.dtype == torch.float32 and (dw[0] == 0).all() and (dw[2] == 0).all()


@_needs_fp8
@pytest.mark.parametrize("offs", [[0, 30, 30, 70], [12, 40, 70, 70]])
def test_fp8_grouped_linear_kernels_match_emulation(offs, _exact_fp8_cast):
    """Forward and both backward GEMMs (plus their quantisation) against the PyTorch emulation; the
    difference is only fp32 summation order. Empty experts get a zero weight gradient."""
    x, w = _rand(70, 160, grad=True), _rand(4, 48, 160, scale=0.1, grad=True)
    offs = torch.tensor(offs, dtype=torch.int32, device=_DEV)
    y = kernels.fp8_grouped_linear(x, w, offs, use_triton=True)
    dy = _rand(*y.shape)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y_ref = kernels.fp8_grouped_linear_ref(x, w, offs)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-4)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    assert (dw[counts == 0] == 0).all()


@_needs_fp8
def test_fp8_linear_dense(_exact_fp8_cast):
    x, w = _rand(2, 9, 96, grad=True), _rand(40, 96, scale=0.1, grad=True)
    y = kernels.fp8_linear(x, w, use_triton=True)
    y_ref = kernels.fp8_linear(x, w, use_triton=False)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    assert ((y - F.linear(x, w)).norm() / F.linear(x, w).norm()).item() < 0.06
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    dx_ref, dw_ref = torch.autograd.grad(y_ref.sum(), (x, w))
    torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-4)


def test_fp8_output_follows_autocast():
    x, w = torch.randn(6, 32), torch.randn(1, 16, 32)
    offs = torch.tensor([6], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.fp8_grouped_linear(x, w, offs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), kernels.fp8_grouped_linear_ref(x, w, offs), atol=0.05, rtol=0.01)


def test_fp8_grouped_linear_rejects_bad_offsets():
    with pytest.raises(ValueError, match="int32"):
        kernels.fp8_grouped_linear(torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([2, 4]))

# =============================================================================
# muon.py

# A toy model with the real parameter names (D=16, hd=4, E=4 experts of F=6, dense hidden 20, vocab 32) and
# the group each parameter must land in: (kind, split for Muon / decays for AdamW).
_SHAPES = {
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.k_proj.weight": (8, 16),
    "model.layers.0.self_attn.v_proj.weight": (8, 16),
    "model.layers.0.self_attn.o_proj.weight": (16, 16),
    "model.layers.0.self_attn.q_norm.weight": (4,),
    "model.layers.0.self_attn.k_norm.weight": (4,),
    "model.layers.0.post_attention_layernorm.weight": (16,),
    "model.layers.0.mlp.gate.weight": (4, 16),
    "model.layers.0.mlp.experts.gate_up_proj": (4, 12, 16),
    "model.layers.0.mlp.experts.down_proj": (4, 16, 6),
    "model.layers.1.mlp.gate_proj.weight": (20, 16),
    "model.layers.1.mlp.up_proj.weight": (20, 16),
    "model.layers.1.mlp.down_proj.weight": (16, 20),
    "model.norm.weight": (16,),
    "lm_head.weight": (32, 16),
    "mtp.enorm.weight": (16,),
    "mtp.eh_proj.weight": (16, 32),
}
_EXPECTED = {name: ("adamw", False) if len(shape) == 1 else ("muon", 1) for name, shape in _SHAPES.items()}
_EXPECTED.update({"model.embed_tokens.weight": ("adamw", True), "lm_head.weight": ("adamw", True),
                  "model.layers.0.mlp.gate.weight": ("adamw", True),
                  "model.layers.0.mlp.experts.gate_up_proj": ("muon", 2)})
_LR, _WD = 0.02, 0.1
_LR_MULTS = [1.0, 0.5, 0.25]  # a decaying schedule over three steps: group["lr"] = base_lr * mult


def _toy_model(seed=0):
    root = nn.Module()
    gen = torch.Generator().manual_seed(seed)
    for name, shape in _SHAPES.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.randn(shape, generator=gen) * 0.5))
    return root


def _grad(name, shape, step):
    seed = 1000 * step + list(_SHAPES).index(name)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _set_grads(model, step):
    for name, p in model.named_parameters():
        p.grad = _grad(name, p.shape, step)


def _run(model, opt, steps):
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * _LR_MULTS[step]
        _set_grads(model, step)
        opt.step()


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -----------------------------------------------------------------------------
# Naive references, written independently of muon.py

_A, _B, _C = 3.4445, -4.7750, 2.0315


def _poly(s):
    return _A * s + _B * s ** 3 + _C * s ** 5


def _ns_ref(M):
    """Newton-Schulz on one matrix, the polynomial written out term by term."""
    tall = M.shape[0] > M.shape[1]
    X = (M.T if tall else M) / (M.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = _A * X + _B * (A @ X) + _C * (A @ (A @ X))
    return X.T if tall else X


def _muon_ref(W, G, buf, lr, wd, split):
    """One Muon step on a 2-D matrix or a 3-D expert stack, one matrix at a time; returns (W, buf)."""
    buf = 0.95 * buf + G
    U = G + 0.95 * buf
    W = W * (1 - lr * wd)
    W3, U3 = (W, U) if W.ndim == 3 else (W[None], U[None])
    rows = U3.shape[1] // split
    for e in range(U3.shape[0]):
        for k in range(split):  # gate_up: gate rows [0, F), up rows [F, 2F)
            block = U3[e, k * rows:(k + 1) * rows]
            W3[e, k * rows:(k + 1) * rows] -= lr * 0.2 * math.sqrt(max(block.shape)) * _ns_ref(block)
    return W, buf


def _reference_run(steps):
    """Three steps of Muon (naive) + torch.optim.AdamW on a fresh toy model, grouped by _EXPECTED."""
    params = _params(_toy_model())
    adamw_params = {n: nn.Parameter(params[n].clone()) for n, (kind, _) in _EXPECTED.items() if kind == "adamw"}
    adamw = torch.optim.AdamW([{"params": [p for n, p in adamw_params.items() if _EXPECTED[n][1]],
                                "weight_decay": _WD},
                               {"params": [p for n, p in adamw_params.items() if not _EXPECTED[n][1]],
                                "weight_decay": 0.0}],
                              lr=_LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    bufs = {n: torch.zeros(s) for n, s in _SHAPES.items()}
    for step in steps:
        lr = _LR * _LR_MULTS[step]
        for group in adamw.param_groups:
            group["lr"] = lr
        for name, (kind, split) in _EXPECTED.items():
            G = _grad(name, _SHAPES[name], step)
            if kind == "muon":
                params[name], bufs[name] = _muon_ref(params[name], G, bufs[name], lr, _WD, split)
            else:
                adamw_params[name].grad = G
        adamw.step()
    params.update({n: p.detach() for n, p in adamw_params.items()})
    return params


# -----------------------------------------------------------------------------
# Newton-Schulz

def _matrix_with_spectrum(rows, cols, s, gen):
    U, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=gen))
    return U @ torch.diag(s) @ V.T


@pytest.mark.parametrize("rows,cols", [(48, 48), (24, 72), (72, 24)])
def test_newton_schulz_singular_values(rows, cols):
    gen = torch.Generator().manual_seed(rows * cols)
    k = min(rows, cols)
    # Condition number 100 and scale 10 (not normalised). Much smaller singular values (relative to ||G||_F)
    # would need more than 5 steps to climb into the band: slope 3.4445 per step near 0.
    s = torch.logspace(-1, 1, k)
    G = _matrix_with_spectrum(rows, cols, s, gen)
    out = torch.linalg.svdvals(newton_schulz(G))
    # In exact arithmetic NS maps each singular value s of G/||G||_F through the polynomial 5 times.
    want = (s / s.norm()).double()
    for _ in range(5):
        want = _poly(want)
    torch.testing.assert_close(out.double().sort().values, want.sort().values, rtol=1e-4, atol=1e-4)
    # The band the coefficients promise: p maps [p(x2), p(x1)] into itself, x1 < x2 the positive roots of p'.
    x1, x2 = sorted(r.real for r in np.roots([5 * _C, 0, 3 * _B, 0, _A]) if r.real > 0 and abs(r.imag) < 1e-12)
    lo, hi = _poly(x2), _poly(x1)
    assert 0.68 < lo < 0.69 and 1.20 < hi < 1.21
    assert lo - 1e-4 <= out.min() and out.max() <= hi + 1e-4, (out.min(), out.max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 path runs on GPU only")
def test_newton_schulz_bf16_on_gpu_stays_in_band():
    gen = torch.Generator().manual_seed(0)
    G = _matrix_with_spectrum(256, 768, torch.logspace(-1, 1, 256), gen).cuda()
    X = newton_schulz(G)
    assert X.dtype == torch.bfloat16
    out = torch.linalg.svdvals(X.float())
    assert 0.68 - 0.05 <= out.min() and out.max() <= 1.21 + 0.05, (out.min(), out.max())  # bf16 rounding: 0.05


def test_newton_schulz_batched_equals_loop_over_experts():
    G = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(newton_schulz(G), torch.stack([_ns_ref(M) for M in G]), rtol=1e-5, atol=1e-5)
    G4 = torch.randn(2, 3, 20, 12, generator=torch.Generator().manual_seed(1))  # tall, two leading dims
    torch.testing.assert_close(newton_schulz(G4), torch.stack([torch.stack([_ns_ref(M) for M in Gs])
                                                               for Gs in G4]), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Parameter groups and the optimizer step

def _classify(model, **kw):
    found = {}
    for group in param_groups(model, lr=_LR, **kw):
        assert group["base_lr"] == group["lr"] == _LR
        for name, _ in group["params"]:
            key = group["split"] if group["kind"] == "muon" else group["weight_decay"] > 0
            found[name] = (group["kind"], key)
    return found


def test_param_groups_classification_and_wrapper_prefixes():
    assert _classify(_toy_model()) == _EXPECTED
    wrapped, compiled = nn.Module(), nn.Module()  # DDP(torch.compile(model)): module._orig_mod.<name>
    compiled.add_module("_orig_mod", _toy_model())
    wrapped.add_module("module", compiled)
    assert _classify(wrapped) == _EXPECTED
    adamw_only = {n: ("adamw", len(s) > 1) for n, s in _SHAPES.items()}
    assert _classify(_toy_model(), adamw_only=True) == adamw_only


def test_step_matches_naive_muon_and_torch_adamw():
    model = _toy_model()
    opt = MuonAdamW(param_groups(model, lr=_LR, weight_decay=_WD))
    _run(model, opt, range(3))
    want = _reference_run(range(3))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adamw_only_matches_torch_adamw():
    model, ref = _toy_model(), _toy_model()
    opt = MuonAdamW(param_groups(model, lr=_LR, weight_decay=_WD, adamw_only=True))
    decay = [p for p in ref.parameters() if p.ndim > 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": _WD},
                                 {"params": [p for p in ref.parameters() if p.ndim == 1], "weight_decay": 0.0}],
                                lr=_LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = _LR * _LR_MULTS[step]
        _set_grads(model, step)
        _set_grads(ref, step)
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_state_dict_round_trip_is_bit_identical():
    model = _toy_model()
    opt = MuonAdamW(param_groups(model, lr=_LR))
    _run(model, opt, range(2))
    saved = io.BytesIO()
    torch.save({"model": _params(model), "opt": opt.state_dict()}, saved)
    _run(model, opt, [2])

    saved.seek(0)
    ckpt = torch.load(saved)
    resumed = _toy_model(seed=1)  # different init: everything must come from the checkpoint
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            p.copy_(ckpt["model"][name])
    opt2 = MuonAdamW(param_groups(resumed, lr=_LR))
    opt2.load_state_dict(ckpt["opt"])
    _run(resumed, opt2, [2])
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# -----------------------------------------------------------------------------
# Bad input

def test_rejects_bad_groups():
    model = _toy_model()
    norm = ("model.norm.weight", model.get_parameter("model.norm.weight"))
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        MuonAdamW([dict(kind="muon", params=[norm], lr=_LR)])
    with pytest.raises(ValueError, match="kind='muon' or 'adamw'"):
        MuonAdamW([dict(params=[norm], lr=_LR)])
    gate_up = ("gate_up", nn.Parameter(torch.zeros(4, 7, 16)))  # 7 rows cannot be split in two
    with pytest.raises(ValueError, match="divisible by split=2"):
        MuonAdamW([dict(kind="muon", params=[gate_up], lr=_LR, split=2)])


def test_zero_gradient_gives_weight_decay_only():
    model = _toy_model()
    opt = MuonAdamW(param_groups(model, lr=_LR, weight_decay=_WD))
    before = _params(model)
    _set_grads(model, 0)
    q = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    q.grad.zero_()
    opt.step()
    torch.testing.assert_close(q.detach(), before["model.layers.0.self_attn.q_proj.weight"] * (1 - _LR * _WD),
                               rtol=1e-6, atol=0)


def test_nan_gradient_raises_and_updates_nothing():
    model = _toy_model()
    opt = MuonAdamW(param_groups(model, lr=_LR))
    _run(model, opt, [0])
    before = _params(model)
    _set_grads(model, 1)
    model.get_parameter("model.layers.0.mlp.experts.down_proj").grad[2, 3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.experts.down_proj"):
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


def test_load_state_dict_rejects_other_sharding():
    model = _toy_model()
    opt = MuonAdamW(param_groups(model, lr=_LR))
    _run(model, opt, [0])
    state = opt.state_dict()
    first = next(iter(state["state"]))
    state["state"][first]["momentum_buffer"] = state["state"][first]["momentum_buffer"][..., :3]
    with pytest.raises(ValueError, match="another sharding"):
        MuonAdamW(param_groups(_toy_model(), lr=_LR)).load_state_dict(state)


# -----------------------------------------------------------------------------
# Distributed: 2 gloo processes vs the 1-process run

def _dist_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = {}

    # DDP-style: replicated parameters and the identical gradients DDP's all-reduce leaves on every rank.
    calls = []
    ns = muon.newton_schulz
    muon.newton_schulz = lambda G, steps=5: (calls.append(G.shape), ns(G, steps))[1]
    model = _toy_model()
    _run(model, MuonAdamW(param_groups(model, lr=_LR)), range(3))
    muon.newton_schulz = ns
    out["ddp"], out["ns_calls"] = _params(model), len(calls)

    # FSDP2: DTensor shards; run 2 steps, save this rank's state, then step 3 continuously and resumed.
    mesh = init_device_mesh("cpu", (world,))

    def fsdp_run(model, opt, steps):
        for step in steps:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * _LR_MULTS[step]
            for name, p in model.named_parameters():
                p.grad = distribute_tensor(_grad(name, p.shape, step), p.device_mesh, p.placements)
            opt.step()

    model = fully_shard(_toy_model(), mesh=mesh)
    opt = MuonAdamW(param_groups(model, lr=_LR))
    fsdp_run(model, opt, range(2))
    saved = io.BytesIO()
    torch.save({"model": {n: p.to_local().clone() for n, p in model.named_parameters()},
                "opt": opt.state_dict()}, saved)
    fsdp_run(model, opt, [2])
    out["fsdp"] = {n: p.full_tensor() for n, p in model.named_parameters()}

    saved.seek(0)
    ckpt = torch.load(saved, weights_only=False)
    model = fully_shard(_toy_model(seed=1), mesh=mesh)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(ckpt["model"][name])
    opt = MuonAdamW(param_groups(model, lr=_LR))
    opt.load_state_dict(ckpt["opt"])
    fsdp_run(model, opt, [2])
    out["fsdp_resumed"] = {n: p.full_tensor() for n, p in model.named_parameters()}

    # A NaN in rank 0's shard only: every rank must raise (a lone raise would leave the others hanging).
    fsdp_run(model, opt, [0])
    if rank == 0:
        model.get_parameter("model.layers.0.mlp.experts.down_proj").grad.to_local()[0, 0, 0] = float("nan")
    try:
        opt.step()
        out["nan_raised"] = False
    except FloatingPointError:
        out["nan_raised"] = True
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    torch.multiprocessing.spawn(_dist_worker, args=(2, str(tmp_path)), nprocs=2)
    model = _toy_model()
    _run(model, MuonAdamW(param_groups(model, lr=_LR)), range(3))
    want = _params(model)
    n_muon = sum(kind == "muon" for kind, _ in _EXPECTED.values())
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Each rank orthogonalised half of the 10 Muon matrices per step: none twice, none skipped.
    assert [r["ns_calls"] for r in results] == [3 * n_muon // 2] * 2
    assert [r["nan_raised"] for r in results] == [True, True]
    for r in results:
        for key in ("ddp", "fsdp"):
            for name in _SHAPES:
                torch.testing.assert_close(r[key][name], want[name], rtol=1e-6, atol=1e-6, msg=f"{key} {name}")
        for name in _SHAPES:  # resuming from per-rank shards continues bit-identically
            torch.testing.assert_close(r["fsdp_resumed"][name], r["fsdp"][name], rtol=0, atol=0, msg=name)

# =============================================================================
# data.py

def _tok():
    return data.get_tokenizer()


def _write_source(path, lo, n_tokens, eot_every=50):
    """A shard whose tokens all lie in [lo, lo + 1000) (so a row tells which source it came from), with an EOT
    opening every `eot_every` tokens; returns the array written."""
    rng = np.random.default_rng(lo)
    tokens = rng.integers(lo, lo + 1000, size=n_tokens).astype(np.uint32)
    tokens[::eot_every] = 7
    data.write_shard(path, tokens, n_docs=len(tokens[::eot_every]))
    return tokens


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_specials_and_padding():
    tok = _tok()
    # cl100k_base has 100,256 BPE ranks (0..100255); the specials follow in SPECIAL_TOKENS order
    assert tok.n_vocab == 100_256 + len(data.SPECIAL_TOKENS)
    assert tok.vocab_size == 100_352 and tok.vocab_size % 128 == 0
    assert tok.eot == 100_256 and tok.fim_prefix == 100_257 and tok.fim_middle == 100_258 and tok.fim_suffix == 100_259
    assert tok.encode_special("</think>") == 100_256 + data.SPECIAL_TOKENS.index("</think>")
    text = "def f(x):\n    return x  # <|endoftext|> <fim_prefix> <|im_end|> stays text, héllo 世界"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special.values())
    assert tok.decode(ids) == text
    assert tok.encode("hello world") == [15339, 1917]  # known cl100k_base ids
    assert tok.decode([tok.eot]) == "<|endoftext|>"


def test_custom_tiktoken_file(tmp_path):
    # 256 single bytes + two merges, written in tiktoken's "base64(token) rank" format
    tokens = [bytes([i]) for i in range(256)] + [b"ab", b"abc"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    tok = data.get_tokenizer(str(path))
    assert tok.name == str(path) and tok.n_vocab == 258 + len(data.SPECIAL_TOKENS) and tok.vocab_size == 384
    assert tok.encode("abc") == [257] and tok.encode("xab") == [ord("x"), 256]
    assert tok.eot == 258


# -----------------------------------------------------------------------------
# math problems

def test_math_problems_have_exact_checkable_answers():
    rng = random.Random(123)
    checked = 0
    for _ in range(500):
        question, solution, answer = data.make_math_problem(rng)
        assert solution.endswith(f"#### {answer}")
        if m := re.fullmatch(r"Compute (-?\d+) ([-+*]) (-?\d+) ([-+*]) (-?\d+)\.", question):
            assert int(answer) == eval(" ".join(m.groups()))  # Python's precedence as the reference
        elif m := re.fullmatch(r"Solve for x: (-?\d+)x ([-+]) (\d+) = (-?\d+)\.", question):
            a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a * int(answer) + (b if sign == "+" else -b) == c
        elif m := re.match(r"Compute (\d+/\d+|\d+) ([-+]) (\d+/\d+|\d+)\.", question):
            p, q = Fraction(m[1]), Fraction(m[3])
            assert Fraction(answer) == (p + q if m[2] == "+" else p - q)
            assert answer == str(Fraction(answer))  # lowest terms
        else:
            assert int(answer) >= 0  # word problems: non-negative integers by construction
            continue
        checked += 1
    assert checked > 150


# -----------------------------------------------------------------------------
# FIM

def test_fim_inverse_recovers_text_and_psm_layout():
    tok = _tok()
    rng = random.Random(0)
    texts = ["", "x", "def add(a, b):\n    return a + b\n", "ünïcode → λ 世界 " * 7, "a" * 300]
    for text in texts:
        for _ in range(20):
            ids = data.fim_transform(text, rng, tok, rate=1.0)
            # PSM: <prefix> ... <suffix> ... <middle> ..., each marker once
            assert ids[0] == tok.fim_prefix and ids.count(tok.fim_suffix) == 1 and ids.count(tok.fim_middle) == 1
            assert ids.index(tok.fim_suffix) < ids.index(tok.fim_middle)
            assert data.fim_inverse(ids, tok) == text
        assert data.fim_transform(text, rng, tok, rate=0.0) == tok.encode(text)


def test_fim_rate():
    tok = _tok()
    rng, n, rate = random.Random(1), 4000, 0.5
    hits = sum(data.fim_transform("abc def", rng, tok, rate)[0] == tok.fim_prefix for _ in range(n))
    assert abs(hits / n - rate) < 5 * math.sqrt(rate * (1 - rate) / n)  # 5 binomial standard deviations


# -----------------------------------------------------------------------------
# shards

@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_round_trip(tmp_path, dtype):
    path = str(tmp_path / "s.tokens")
    chunks = [np.array([7, 1, 2, 3]), np.array([7, 65535, 4]), np.array([], dtype=np.int64)]
    assert data.write_shard(path, chunks, n_docs=2, dtype=dtype) == 7
    tokens = data.read_shard(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype
    np.testing.assert_array_equal(tokens, [7, 1, 2, 3, 7, 65535, 4])
    assert data.shard_info(path)[:2] == (7, 2)
    np.testing.assert_array_equal(data.doc_starts(tokens, 7), [0, 4])
    assert os.path.getsize(path) == 32 + 7 * np.dtype(dtype).itemsize
    with pytest.raises(ValueError, match="out of range"):
        data.write_shard(path, np.array([70000]), dtype=np.uint16)


def test_corrupt_shards_give_clear_errors(tmp_path):
    good = str(tmp_path / "good.tokens")
    data.write_shard(good, np.arange(100, dtype=np.uint32))
    raw = open(good, "rb").read()

    def _bad(name, content, pattern):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=pattern) as e:
            data.read_shard(str(path))
        assert str(path) in str(e.value)

    _bad("truncated.tokens", raw[:-3], "truncated or corrupt.*delete it to rebuild")
    _bad("trailing.tokens", raw + b"xx", "truncated or corrupt")
    _bad("header_only.tokens", raw[:20], "truncated.*delete it to rebuild")
    _bad("empty.tokens", b"", "truncated")
    _bad("foreign.tokens", b"\x93NUMPY" + bytes(200), "not a nanoMellum token shard")
    _bad("magic.tokens", b"XXTOK" + raw[5:], "not a nanoMellum token shard")
    _bad("version.tokens", raw[:5] + bytes([99]) + raw[6:], "format version 99.*delete it to rebuild")
    _bad("dtype.tokens", raw[:6] + bytes([9]) + raw[7:], "unknown dtype code 9")


# -----------------------------------------------------------------------------
# loader

def _sources(tmp_path, sizes=(30_000, 20_000, 10_000), weights=(0.5, 0.3, 0.2)):
    out = {}
    for i, (n, w) in enumerate(zip(sizes, weights)):
        path = str(tmp_path / f"src{i}.tokens")
        _write_source(path, 1000 * (i + 1), n)
        out[f"src{i}"] = (path, w)
    return out


def _windows(tokens, T):
    """{first T tokens: all T+1 tokens} of the windows starting at multiples of T (the loader's packing)."""
    tokens = np.asarray(tokens).tolist()
    return {tuple(tokens[i:i + T]): tokens[i:i + T + 1] for i in range(0, len(tokens) - T, T)}


def _source_of(row):
    return int(row.min()) // 1000 - 1 if row.min() >= 1000 else int(row.max()) // 1000 - 1


def test_loader_rows_are_shifted_windows_of_the_sources(tmp_path):
    srcs = _sources(tmp_path)
    T = 16
    windows = {n: _windows(data.read_shard(p), T) for n, (p, _) in srcs.items()}
    x, y = data.TokenLoader(srcs, batch_size=8, seq_len=T, seed=3).next_batch()
    assert x.shape == y.shape == (8, T) and x.dtype == y.dtype == torch.int64
    for xr, yr in zip(x, y):
        window = windows[f"src{_source_of(xr)}"][tuple(xr.tolist())]  # KeyError: not a window
        torch.testing.assert_close(yr, torch.tensor(window[1:]), rtol=0, atol=0)


def test_loader_deterministic_and_exact_resume(tmp_path):
    srcs = _sources(tmp_path, sizes=(3000, 2000, 1000))  # small: several epochs wrap within the test
    a = data.TokenLoader(srcs, batch_size=4, seq_len=32, seed=5)
    b = data.TokenLoader(srcs, batch_size=4, seq_len=32, seed=5)
    for _ in range(30):
        for t, u in zip(a.next_batch(), b.next_batch()):
            torch.testing.assert_close(t, u, rtol=0, atol=0)
    state = json.loads(json.dumps(a.state_dict()))  # it must survive a JSON checkpoint
    expected = [a.next_batch() for _ in range(40)]
    resumed = data.TokenLoader(srcs, batch_size=4, seq_len=32, seed=5)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        torch.testing.assert_close(rx, x, rtol=0, atol=0)
        torch.testing.assert_close(ry, y, rtol=0, atol=0)
    assert max(e for e, _ in a.state_dict()["position"].values()) >= 1  # the test did cross an epoch boundary
    other_seed = data.TokenLoader(srcs, batch_size=4, seq_len=32, seed=6)
    assert not torch.equal(other_seed.next_batch()[0], data.TokenLoader(srcs, 4, 32, seed=5).next_batch()[0])
    with pytest.raises(ValueError, match="global_batch"):
        data.TokenLoader(srcs, batch_size=8, seq_len=32, seed=5).load_state_dict(state)


def test_loader_covers_each_window_once_per_epoch(tmp_path):
    path = str(tmp_path / "one.tokens")
    tokens = _write_source(path, 1000, 16 * 40 + 1)  # exactly 40 windows of T+1 = 17 tokens
    loader = data.TokenLoader({"one": (path, 1.0)}, batch_size=8, seq_len=16)
    rows = torch.cat([loader.next_batch()[0] for _ in range(5)])
    assert {tuple(r.tolist()) for r in rows} == set(_windows(tokens, 16)) and len(rows) == 40


def test_loader_respects_mixture_weights(tmp_path):
    weights = (0.5, 0.3, 0.2)
    srcs = _sources(tmp_path, weights=weights)
    loader = data.TokenLoader(srcs, batch_size=16, seq_len=8, seed=11)
    counts = np.zeros(3)
    for _ in range(250):
        for row in loader.next_batch()[0]:
            counts[_source_of(row)] += 1
    n = counts.sum()
    for c, p in zip(counts, weights):  # each row's source is an independent draw: binomial, 5 sigma
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n), (counts, weights)


def test_ranks_disjoint_and_union_equals_single_process(tmp_path):
    srcs = _sources(tmp_path, sizes=(60_000, 60_000, 60_000))  # > 3 * 3750 windows: no epoch wraps below
    W, B, T = 2, 4, 16
    single = data.TokenLoader(srcs, batch_size=W * B, seq_len=T, seed=2)
    ranks = [data.TokenLoader(srcs, batch_size=B, seq_len=T, rank=r, world_size=W, seed=2) for r in range(W)]
    seen = set()
    for _ in range(50):
        x, _ = single.next_batch()
        per_rank = [loader.next_batch()[0] for loader in ranks]
        torch.testing.assert_close(torch.cat(per_rank), x, rtol=0, atol=0)
        for r in per_rank:
            for row in r:
                key = tuple(row.tolist())
                assert key not in seen  # within an epoch no window is handed out twice, on any rank
                seen.add(key)
    # the state does not depend on the rank: a rank's state resumes another rank's loader
    s0 = ranks[0].state_dict()
    moved = data.TokenLoader(srcs, batch_size=B, seq_len=T, rank=1, world_size=W, seed=2)
    moved.load_state_dict(s0)
    torch.testing.assert_close(moved.next_batch()[0], ranks[1].next_batch()[0], rtol=0, atol=0)


def test_val_batches_fixed_and_split_across_ranks(tmp_path):
    path = str(tmp_path / "val.tokens")
    tokens = _write_source(path, 1000, 16 * 100 + 1)
    first = list(data.val_batches(path, batch_size=4, seq_len=16, max_batches=5))
    again = list(data.val_batches(path, batch_size=4, seq_len=16, max_batches=5))
    assert len(first) == 5
    for (x, y), (x2, y2) in zip(first, again):
        torch.testing.assert_close(x, x2, rtol=0, atol=0)
        torch.testing.assert_close(y[:, :-1], x[:, 1:], rtol=0, atol=0)
    order = {w: i for i, w in enumerate(_windows(tokens, 16))}
    picked = {order[tuple(r.tolist())] for x, _ in first for r in x}
    assert len(picked) == 20 and max(picked) >= 90  # distinct windows spread over the whole shard
    r0 = list(data.val_batches(path, batch_size=2, seq_len=16, max_batches=5, rank=0, world_size=2))
    r1 = list(data.val_batches(path, batch_size=2, seq_len=16, max_batches=5, rank=1, world_size=2))
    for (x, _), (a, _), (b, _) in zip(first, r0, r1):
        torch.testing.assert_close(torch.cat([a, b]), x, rtol=0, atol=0)
    small = str(tmp_path / "small.tokens")
    tokens = _write_source(small, 1000, 16 * 3 + 1)  # 3 windows, fewer than a batch of 4 rows
    (x, _), = data.val_batches(small, batch_size=4, seq_len=16)
    assert {tuple(r.tolist()) for r in x} == set(_windows(tokens, 16))


# -----------------------------------------------------------------------------
# mixture files and prepare_data

def test_load_mixture_validation(tmp_path):
    (tmp_path / "a.txt").write_text("hello")

    def _mix(spec, suffix=".json"):
        path = tmp_path / f"mix{suffix}"
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        return data.load_mixture(str(path))

    ok = _mix({"sources": {"mine": {"paths": ["a.txt"]}},
               "phases": {"1": {"weights": {"mine": 1, "code": 2}, "tokens": 100}}})
    assert ok.sources["mine"].paths == [str(tmp_path / "a.txt")] and ok.phases[1].weights == {"mine": 1, "code": 2}
    toml = _mix('[sources.mine]\npaths = ["*.txt"]\nfim = true\n[phases.2]\nweights = {mine = 0.5}\ntokens = 10\n',
                ".toml")
    assert toml.sources["mine"].fim and toml.phases[2].tokens == 10
    phase = lambda w: {"sources": {"mine": {"paths": ["a.txt"]}}, "phases": {"1": {"weights": w, "tokens": 5}}}
    with pytest.raises(ValueError, match="unknown source 'web'"):
        _mix(phase({"web": 1.0}))
    with pytest.raises(ValueError, match="weights must be numbers >= 0"):
        _mix(phase({"mine": -1}))
    with pytest.raises(ValueError, match="sum to 0"):
        _mix(phase({"mine": 0}))
    with pytest.raises(FileNotFoundError, match=r"source 'gone': '.*nope/\*\.jsonl' matches no file"):
        _mix({"sources": {"gone": {"paths": ["nope/*.jsonl"]}}, "phases": {"1": {"weights": {"gone": 1}, "tokens": 5}}})
    with pytest.raises(ValueError, match="not valid JSON"):
        _mix("{")


def test_prepare_data_user_sources(tmp_path):
    tok = _tok()
    docs = [f"document number {i}: " + "some words " * (i % 7 + 1) for i in range(60)]
    (tmp_path / "dir").mkdir()
    for i, d in enumerate(docs[:30]):
        (tmp_path / "dir" / f"{i}.txt").write_text(d)
    (tmp_path / "dir" / "dup.txt").write_text("  " + docs[0].replace(" ", "\n") + "\n")  # same after normalising
    (tmp_path / "dir" / "blob.bin").write_bytes(b"\x00\xff" * 10)  # binary: skipped
    with open(tmp_path / "more.jsonl", "w") as f:
        for d in docs[30:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    code = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]
    with open(tmp_path / "code.jsonl", "w") as f:
        f.writelines(json.dumps({"text": c}) + "\n" for c in code)
    spec = {"sources": {"mine": {"paths": ["dir", "m*.jsonl"]}, "py": {"paths": ["code.jsonl"], "fim": True}},
            "phases": {"1": {"weights": {"mine": 1, "py": 1}, "tokens": 1000}}, "fim_rate": 1.0}
    (tmp_path / "mix.json").write_text(json.dumps(spec))
    mixture = data.load_mixture(str(tmp_path / "mix.json"))
    out = data.prepare_data(mixture, tok, str(tmp_path / "cache"), phases=(1,), log=lambda *a: None)

    def _decoded(s, inverse):
        got = []
        for split in ("train", "val"):
            tokens = np.asarray(data.read_shard(getattr(s, split)))
            bounds = list(data.doc_starts(tokens, tok.eot)) + [len(tokens)]
            assert bounds[0] == 0 and len(bounds) - 1 == getattr(s, f"{split}_docs")
            got += [inverse(tokens[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]
        return got

    mine = out["mine"]
    assert sorted(_decoded(mine, tok.decode)) == sorted(docs)  # dedup dropped dup.txt, blob.bin skipped
    assert mine.val_docs >= data.MIN_VAL_DOCS and mine.train_docs + mine.val_docs == 60
    assert sorted(_decoded(out["py"], lambda ids: data.fim_inverse(ids, tok))) == sorted(code)
    train = np.asarray(data.read_shard(out["py"].train))
    assert np.count_nonzero(train == tok.fim_prefix) == out["py"].train_docs  # rate 1: every train doc rewritten
    assert np.count_nonzero(np.asarray(data.read_shard(out["py"].val)) == tok.fim_prefix) == 0  # val stays plain
    mtime = os.path.getmtime(mine.train)
    again = data.prepare_data(mixture, tok, str(tmp_path / "cache"), phases=(1,), log=lambda *a: None)
    assert again["mine"] == mine and os.path.getmtime(mine.train) == mtime  # reused, not rebuilt
    loader = data.TokenLoader(data.phase_sources(mixture, out, 1), batch_size=2, seq_len=8)
    assert loader.next_batch()[0].shape == (2, 8)


def test_jsonl_without_text_field_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
    source = data.Source("bad", [str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"text\" field"):
        list(data._user_documents(source))


@pytest.mark.slow
def test_default_corpus_small_caps(tmp_path):
    caps = data.CorpusCaps(code_chars=300_000, comment_chars=100_000, doc_chars=100_000, math_problems=300)
    mixture = data.Mixture(data.DEFAULT_MIXTURE.sources, data.DEFAULT_MIXTURE.phases, corpus=caps)
    lines = []
    out = data.prepare_data(mixture, _tok(), str(tmp_path), log=lines.append)
    assert set(out) == {"prose", "code", "math"}
    for s in out.values():
        # every source has both splits; small sources give at most half of their documents to validation
        assert s.train_tokens > 0 and s.val_docs >= min(data.MIN_VAL_DOCS, (s.train_docs + s.val_docs) // 2)
    assert any("tokens train" in line for line in lines)
    math_tokens = np.asarray(data.read_shard(out["math"].train))
    assert "\n#### " in _tok().decode(math_tokens[:400].tolist())


# =============================================================================
# pretrain.py

_REPO = os.path.dirname(os.path.abspath(__file__))


def _mixture_file(tmp_path, tokens=(4000, 2000, 2000)):
    """A user mixture of generated math documents in a .jsonl file (no default-corpus build: seconds)."""
    rng = random.Random(0)
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        with open(docs, "w") as f:
            for _ in range(400):
                q, solution, _ = data.make_math_problem(rng)
                f.write(json.dumps({"text": f"Question: {q}\nAnswer: {solution}"}) + "\n")
    spec = {"sources": {"drill": {"paths": [str(docs)]}},
            "phases": {str(p): {"weights": {"drill": 1.0}, "tokens": n} for p, n in zip((1, 2, 3), tokens)}}
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _pretrain(tmp_path, out, *extra):
    argv = ["--phase", "1", "--preset", "test", "--tokenizer", "cl100k_base:256", "--mixture", _mixture_file(tmp_path),
            "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / out), "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "1000", "--ckpt-every", "1000", "--eval-batches", "2",
            "--log-every", "1000", "--device", "cpu", *extra]
    return pretrain.main(argv)


def _losses(tmp_path, out, phase=1):
    with open(tmp_path / out / f"phase{phase}" / "metrics.jsonl") as f:
        return [r["ce"] for r in map(json.loads, f) if "ce" in r]


def test_whd_schedule_boundaries():
    total, warmup, decay = 100, 10, 30
    values = [pretrain.whd_schedule(s, total, warmup, decay) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(v == 1.0 for v in values[10:70])  # hold
    assert values[70] == pytest.approx(1.0) and values[85] == pytest.approx(0.5)  # linear decay ...
    assert values[100] == 0.0 and values[99] == pytest.approx(1 / 30)  # ... reaching zero at the end
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_pretrain_loss_drops_and_phases_chain(tmp_path):
    _pretrain(tmp_path, "run", "--steps", "30", "--lr", "1e-2")
    ce = _losses(tmp_path, "run")
    assert len(ce) == 30 and np.mean(ce[-5:]) < np.mean(ce[:5]) - 0.5, ce
    _pretrain(tmp_path, "run", "--phase", "2", "--steps", "2")  # phase 2 starts at phase 1's final step
    assert pretrain.latest_step(str(tmp_path / "run" / "phase2")) == 32
    with pytest.raises(SystemExit, match="ends at step"):  # phase 3 before phase 2 finished its plan
        with open(tmp_path / "run" / "phase2" / "step_000032" / "meta.json") as f:
            meta = json.load(f)
        meta["phase_steps"]["2"] = 5
        with open(tmp_path / "run" / "phase2" / "step_000032" / "meta.json", "w") as f:
            json.dump(meta, f)
        _pretrain(tmp_path, "run", "--phase", "3")


def test_pretrain_phase2_without_phase1_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="run `python pretrain.py --phase 1`"):
        _pretrain(tmp_path, "none", "--phase", "2")


def test_pretrain_fp8_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--fp8 needs a CUDA GPU"):
        _pretrain(tmp_path, "fp8", "--fp8")


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
    _pretrain(tmp_path, "full", "--phase", "1", "--steps", "8")
    _pretrain(tmp_path, "cut", "--phase", "1", "--steps", "8", "--stop-after", "3")
    assert len(_losses(tmp_path, "cut")) == 3
    _pretrain(tmp_path, "cut", "--phase", "1", "--steps", "8", "--resume")
    assert _losses(tmp_path, "cut") == _losses(tmp_path, "full")  # bit-identical loss sequence
    a, _ = pretrain.load_checkpoint(str(tmp_path / "full" / "phase1"))
    b, _ = pretrain.load_checkpoint(str(tmp_path / "cut" / "phase1"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    import subprocess
    import sys
    _pretrain(tmp_path, "one", "--phase", "1", "--steps", "4")  # builds the shards too
    common = ["--preset", "test", "--tokenizer", "cl100k_base:256", "--mixture", _mixture_file(tmp_path),
              "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "two"), "--batch-size", "2",
              "--seq-len", "32", "--eval-every", "1000", "--ckpt-every", "1000", "--eval-batches", "2",
              "--phase", "1", "--steps", "4", "--device", "cpu"]
    port = str(29500 + os.getpid() % 1000)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.join(_REPO, "pretrain.py"), *common], check=True, env=env, cwd=_REPO, timeout=600)
    # same global batch (2 ranks x 2 rows = 4 rows): same losses up to the per-rank aux-loss statistics
    np.testing.assert_allclose(_losses(tmp_path, "two"), _losses(tmp_path, "one"), rtol=2e-3, atol=2e-3)


# -----------------------------------------------------------------------------
# Checkpoints (DCP), meta-device construction, expert parallelism: gloo CPU ranks vs one process

def test_checkpoint_round_trip_one_process(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model = M.Mellum(M.get_config("test")).init_weights(2)
    opt = MuonAdamW(param_groups(model, lr=_LR))
    _ckpt_steps(model, opt, range(1))
    pretrain.save_checkpoint(ckpt, 7, model, opt, {"stage": "test"}, {"loader": 3})
    os.makedirs(os.path.join(ckpt, "step_000009.tmp"))  # a save that died half-way does not count
    os.makedirs(os.path.join(ckpt, "step_000008"))  # nor does a step without meta.json
    assert pretrain.latest_step(ckpt) == 7
    loaded, meta = pretrain.load_checkpoint(ckpt)
    assert meta["step"] == 7 and meta["stage"] == "test" and meta["world_size"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    fresh = M.Mellum(M.get_config("test")).init_weights(3)
    fresh_opt = MuonAdamW(param_groups(fresh, lr=_LR))
    assert pretrain.resume_checkpoint(ckpt, None, fresh, fresh_opt) == {"loader": 3}
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for i in want:
        for key, value in want[i].items():
            assert torch.equal(value, got[i][key]) if torch.is_tensor(value) else value == got[i][key], (i, key)
    pretrain.main(["--export-hf", ckpt, str(tmp_path / "hf")])
    hf = M.Mellum.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hf.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain.load_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="config differs"):
        pretrain.resume_checkpoint(ckpt, None, M.Mellum(M.get_config("test", num_experts=4)), None)


def test_expert_parallel_flag_errors():
    with pytest.raises(SystemExit, match="--ep 2 needs 2 or a multiple of 2 processes"):
        pretrain.compute_init("cpu", ep=2)  # one process holds all experts
    with pytest.raises(SystemExit, match="--ep 3 must divide the number of processes"):
        pretrain._meshes(torch.device("cpu"), 4, 3)


_PROBE = torch.arange(24).view(2, 12) % 256


def _rank_batch(rank, step):
    """Rank `rank`'s (x, y) at `step`: 2 rows of 16 tokens; rank=None with world=n: all n ranks' rows."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)


def _global_batch(world, step):
    xs, ys = zip(*(_rank_batch(r, step) for r in range(world)))
    return torch.cat(xs), torch.cat(ys)


def _train_loss(model, x, y):
    _, losses = model(x, y)  # the aux loss uses per-rank routing statistics: left out of the comparison
    return losses["ce"] + 0.1 * losses["mtp"]


def _ckpt_steps(model, opt, steps, rank=None, world=1):
    for step in steps:
        x, y = _rank_batch(rank, step) if rank is not None else _global_batch(world, step)
        _train_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _init_rank(rank, world, port, ep=1):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return pretrain.compute_init("cpu", ep)


def _spawn(worker, world, *args):
    import socket
    with socket.socket() as s:  # a free port for this test's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(world, port, *args), nprocs=world)


def _full(t):  # a copy: full_tensor() over a 1-rank mesh is the live parameter itself
    return (t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t).detach().clone()


def _fsdp_ckpt_worker(rank, world, port, tmp):
    ctx = _init_rank(rank, world, port)
    out = {}
    model, _ = pretrain.build_model(M.get_config("test"), ctx, "fsdp", seed=0)
    out["init"] = {n: _full(p) for n, p in model.named_parameters()}
    opt = MuonAdamW(param_groups(model, lr=_LR))
    _ckpt_steps(model, opt, range(2), rank)
    pretrain.save_checkpoint(f"{tmp}/ckpt", 2, model, opt, {"stage": "test"}, {"rank": rank}, ctx)
    with torch.no_grad():
        out["logits"] = model(_PROBE)[0]
    _ckpt_steps(model, opt, range(2, 4), rank)
    out["straight"] = {n: _full(p) for n, p in model.named_parameters()}
    model, _ = pretrain.build_model(M.get_config("test"), ctx, "fsdp", seed=1)
    opt = MuonAdamW(param_groups(model, lr=_LR))
    out["rank_state"] = pretrain.resume_checkpoint(f"{tmp}/ckpt", 2, model, opt, ctx)
    _ckpt_steps(model, opt, range(2, 4), rank)
    out["resumed"] = {n: _full(p) for n, p in model.named_parameters()}
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_one_process_and_resumes(tmp_path):
    _spawn(_fsdp_ckpt_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    eager = M.Mellum(M.get_config("test")).init_weights(0)
    for name, p in eager.named_parameters():  # meta device + FSDP2 shards: the one-process initial weights
        assert torch.equal(results[0]["init"][name], p.detach()), name
    loaded, meta = pretrain.load_checkpoint(str(tmp_path / "ckpt"))  # 2 ranks wrote it, 1 process reads it
    assert (meta["step"], meta["world_size"], meta["stage"]) == (2, 2, "test")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_PROBE)[0], results[0]["logits"], rtol=0, atol=0)
    assert [r["rank_state"] for r in results] == [{"rank": 0}, {"rank": 1}]
    for r in results:  # resumed at 2 ranks: bit-identical to the uninterrupted 2-rank run
        for name in r["straight"]:
            torch.testing.assert_close(r["resumed"][name], r["straight"][name], rtol=0, atol=0, msg=name)
    # resumed in one process from the 2-rank checkpoint (weights and optimizer resharded), same global batches
    model = M.Mellum(M.get_config("test")).init_weights(1)
    opt = MuonAdamW(param_groups(model, lr=_LR))
    assert pretrain.resume_checkpoint(str(tmp_path / "ckpt"), 2, model, opt) is None  # other world: no rank state
    _ckpt_steps(model, opt, range(2, 4), world=2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), results[0]["straight"][name], rtol=1e-4, atol=1e-5, msg=name)


def _ep_worker(rank, world, port, tmp, ep):
    ctx = _init_rank(rank, world, port, ep)
    model, raw = pretrain.build_model(M.get_config("test"), ctx, "fsdp", seed=0)
    out = {"first": raw.model.layers[0].mlp.experts.first,
           "init": {n: _full(p) for n, p in model.named_parameters()}}
    loss = _train_loss(model, *_rank_batch(rank, 0))
    loss.backward()
    out["loss"] = loss.item()
    out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
    out["norm"] = pretrain.clip_grad_norm(model, 1e9).item()
    opt = MuonAdamW(param_groups(model, lr=_LR))
    opt.step()
    out["stepped"] = {n: _full(p) for n, p in model.named_parameters()}
    pretrain.save_checkpoint(f"{tmp}/ckpt", 1, model, opt, {}, None, ctx)
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_expert_parallel_matches_one_process(tmp_path, world, ep):
    """EP 2 alone (2 ranks) and EP 2 x FSDP2 over dp 2 (4 ranks, the 2-D mesh) against one process that sees
    the same global batch: loss, every gradient, the clipped norm, one Muon/AdamW step, the checkpoint."""
    _spawn(_ep_worker, world, str(tmp_path), ep)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model = M.Mellum(M.get_config("test")).init_weights(0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _train_loss(model, *_global_batch(world, 0))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    opt = MuonAdamW(param_groups(model, lr=_LR))
    opt.step()
    E_local = M.get_config("test").num_experts // ep
    assert [r["first"] for r in results] == [(rank % ep) * E_local for rank in range(world)]
    # every rank's loss is the mean over its rows; equal row counts, so their mean is the global mean
    assert np.mean([r["loss"] for r in results]) == pytest.approx(loss.item(), rel=1e-5)
    for r in results:
        assert r["norm"] == pytest.approx(norm.item(), rel=1e-5)
        for name, p in model.named_parameters():
            mine = slice(r["first"], r["first"] + E_local) if ".experts." in name else slice(None)
            torch.testing.assert_close(r["init"][name], init[name][mine], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(r["grads"][name], p.grad[mine], rtol=1e-4, atol=1e-6, msg=name)
            # atol 1e-5 against steps of ~lr = 2e-2: AdamW's first step is g / (|g| + eps), so a gradient of
            # ~eps (4e-9 here) turns fp32 reduction-order noise into an update difference of ~1e-6
            torch.testing.assert_close(r["stepped"][name], p.detach()[mine], rtol=1e-4, atol=1e-5, msg=name)
    loaded, _ = pretrain.load_checkpoint(str(tmp_path / "ckpt"))  # the EP slices put back together
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, model.get_parameter(name).detach(), rtol=1e-4, atol=1e-5, msg=name)
    resumed = M.Mellum(M.get_config("test")).init_weights(1)  # and the optimizer state too, in one process
    resumed_opt = MuonAdamW(param_groups(resumed, lr=_LR))
    pretrain.resume_checkpoint(str(tmp_path / "ckpt"), 1, resumed, resumed_opt)
    for name, p in model.named_parameters():
        for key, want in opt.state[p].items():
            got = resumed_opt.state[resumed.get_parameter(name)][key]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


# =============================================================================
# sample.py

@functools.lru_cache(maxsize=None)
def _trained_model():
    """The `test` preset trained for a few AdamW steps on a 16-token cycle (scattered over the vocabulary), so the
    main model is confident and the MTP head drafts well. Shared by the tests that need it (seconds)."""
    torch.manual_seed(0)
    model = M.Mellum(M.get_config("test")).init_weights(0)
    gen = torch.Generator().manual_seed(0)
    cycle = torch.randperm(256, generator=gen)[:16]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(25):
        start = torch.randint(0, 16, (4, 1), generator=gen)
        seq = cycle[(start + torch.arange(33)[None]) % 16]
        _, losses = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        (losses["ce"] + losses["mtp"] + 0.01 * losses["aux"]).backward()
        opt.step()
    return model.eval(), cycle


def _naive_greedy(model, idx, n, n_vocab=None, stop=None):
    """Reference: recompute the whole sequence every step and take the argmax (no cache, no helper from sample)."""
    seq, out = idx, []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            t = int(logits[0, -1, :n_vocab].argmax())
            out.append(t)
            if t == stop:
                break
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    return out


def _prompt(cycle, n=6):
    return cycle[torch.arange(n) % 16][None]


# -----------------------------------------------------------------------------
# KV cache vs full forward


def test_cached_logits_and_mtp_match_full_forward_past_the_window():
    # random weights: every position matters. Window 8 + slack 4 = a ring of 12 slots, wrapped twice below.
    cfg = M.get_config("test")
    model = M.Mellum(cfg).init_weights(1).eval()
    seq = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    draft = torch.tensor([[7]])
    cache = M.KVCache(cfg, 1, 48)
    tol = dict(atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        h_full = model.hidden(seq)
        logits_full = model.lm_head(h_full)
        mtp_full = model.mtp_hidden(h_full[:, :-1], seq[:, 1:])  # MTP at t reads h_t and token t+1

        h = model.hidden(seq[:, :5], cache)
        torch.testing.assert_close(model.lm_head(h), logits_full[:, :5], **tol)
        h_prev = h[:, -1:]
        model.mtp_hidden(h[:, :-1], seq[:, 1:5], cache)
        for t in range(5, 40):
            if t % 7 == 0:  # the speculative pattern: verify [x_t, draft], then forget the draft position
                h2 = model.hidden(torch.cat([seq[:, t:t + 1], draft], dim=1), cache)
                cache.rewind(1)
                h = h2[:, :1]
            else:
                h = model.hidden(seq[:, t:t + 1], cache)
            torch.testing.assert_close(model.lm_head(h)[:, 0], logits_full[:, t], **tol)
            m = model.mtp_hidden(h_prev, seq[:, t:t + 1], cache)  # the MTP at position t-1
            torch.testing.assert_close(m[:, 0], mtp_full[:, t - 1], **tol)
            h_prev = h
        assert cache.pos == 40 and cache.mtp.pos == 39


def test_generate_with_cache_matches_full_recompute_greedy():
    model, cycle = _trained_model()
    idx = _prompt(cycle)
    want = _naive_greedy(model, idx, 40)  # 46 positions: the sliding rings wrap
    for use_cache in (True, False):
        tokens, stats = S.generate(model, idx, 40, temperature=0, use_cache=use_cache)
        assert tokens == [want], f"use_cache={use_cache}"
        assert stats["tokens"] == 40 and stats["forwards"] == 40


def test_generate_batch_rows_and_stop_token():
    model, cycle = _trained_model()
    idx = torch.stack([_prompt(cycle)[0], _prompt(cycle[3:])[0]])
    want = [_naive_greedy(model, idx[b:b + 1], 20) for b in range(2)]
    stop = want[1][4]  # row 1 stops at its 5th token (kept); row 0 runs on unless it meets the same id
    tokens, _ = S.generate(model, idx, 20, temperature=0, stop_token=stop)
    for b in range(2):
        cut = want[b].index(stop) + 1 if stop in want[b] else 20
        assert tokens[b] == want[b][:cut]
    assert len(tokens[1]) == 5


# -----------------------------------------------------------------------------
# Speculative decoding


def test_speculative_greedy_equals_plain_greedy():
    model, cycle = _trained_model()
    idx = _prompt(cycle)
    want = _naive_greedy(model, idx, 50)
    tokens, stats = S.generate(model, idx, 50, temperature=0, speculative=True)
    assert tokens == [want]
    assert stats["accepted"] > 0 and stats["forwards"] < 50, stats
    # a useless draft head (re-randomised MTP) forces rejections and rewinds: the tokens must not change
    bad = copy.deepcopy(model)
    with torch.no_grad():
        for p in bad.mtp.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    tokens, stats = S.generate(bad, idx, 50, temperature=0, speculative=True)
    assert tokens == [want]
    assert stats["drafted"] - stats["accepted"] > 10, stats
    # a draft restricted to ids < 128 cannot propose the cycle's larger ids: rejections, same tokens
    tokens, stats = S.generate(model, idx, 50, temperature=0, speculative=True, draft_vocab=128)
    assert tokens == [want]
    assert 0 < stats["accepted"] < stats["drafted"], stats


def test_speculative_sampling_with_top_k_1_equals_greedy():
    # top_k=1 makes p and q one-hot: the sampling path (accept_or_resample, resampling, bonus token) must then
    # reproduce greedy exactly, whether drafts are accepted or rejected
    model, cycle = _trained_model()
    idx = _prompt(cycle)
    want = _naive_greedy(model, idx, 30)
    for draft_vocab in (None, 128):
        gen = torch.Generator().manual_seed(0)
        tokens, stats = S.generate(model, idx, 30, temperature=1.0, top_k=1, generator=gen, speculative=True,
                                   draft_vocab=draft_vocab)
        assert tokens == [want] and stats["accepted"] > 0, draft_vocab


def test_accept_or_resample_keeps_the_target_distribution():
    # Monte Carlo over N independent drafts d ~ q: the emitted token must follow p (Leviathan et al. 2023, thm 1)
    # and the acceptance rate must be sum_x min(p(x), q(x)). Standard error per bin <= 0.5/sqrt(N) = 5e-4:
    # tolerance 3e-3 is 6 standard errors, while q differs from p by up to 0.3. q(4) = 0 < p(4), as with a
    # draft restricted to part of the vocabulary: token 4 can only come from resampling.
    N = 1_000_000
    p = torch.tensor([0.5, 0.05, 0.3, 0.0, 0.15])
    q = torch.tensor([0.3, 0.35, 0.1, 0.25, 0.0])
    gen = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q, N, replacement=True, generator=gen)
    accepted, token = S.accept_or_resample(p.expand(N, 5), q.expand(N, 5), draft, gen)
    freq = torch.bincount(token, minlength=5).float() / N
    torch.testing.assert_close(freq, p, atol=3e-3, rtol=0)
    torch.testing.assert_close(accepted.float().mean(), torch.minimum(p, q).sum(), atol=3e-3, rtol=0)
    assert not (token[~accepted] == draft[~accepted]).all()  # rejections do resample
    assert (freq - q).abs().max() > 0.1  # the check above can tell p from q


def test_accept_or_resample_one_hot_cases():
    p = torch.tensor([0.0, 1.0, 0.0])
    accepted, token = S.accept_or_resample(p, p, torch.tensor(1))
    assert bool(accepted) and int(token) == 1
    accepted, token = S.accept_or_resample(p, torch.tensor([1.0, 0.0, 0.0]), torch.tensor(0))
    assert not bool(accepted) and int(token) == 1


# -----------------------------------------------------------------------------
# Sampling filters


def test_probabilities_hand_cases():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = p.log()
    tol = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(S.probabilities(logits), p, **tol)
    torch.testing.assert_close(S.probabilities(logits, top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]), **tol)
    # nucleus 0.6: 0.5 is below it, 0.5 + 0.2 reaches it -> keep two; 0.8 needs 0.5 + 0.2 + 0.15 = 0.85
    torch.testing.assert_close(S.probabilities(logits, top_p=0.6), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]), **tol)
    torch.testing.assert_close(S.probabilities(logits, top_p=0.8),
                               torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, **tol)
    # temperature 2 on log-probabilities: proportional to sqrt(p)
    torch.testing.assert_close(S.probabilities(logits, 2.0), p.sqrt() / p.sqrt().sum(), **tol)
    # rows are independent
    both = S.probabilities(torch.stack([logits, logits.flip(0)]), top_k=1)
    torch.testing.assert_close(both, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]]), **tol)


# -----------------------------------------------------------------------------
# Bad input and the command line


def _byte_tokenizer(path):
    """A .tiktoken file with the 256 single bytes and no merges: 256 ids + data.py's special tokens."""
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    return path


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        S.load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        S.load_model(str(tmp_path))
    # the byte tokenizer has 256 + specials ids: more than the test preset's 256 embeddings
    model = M.Mellum(M.get_config("test")).init_weights(0)
    tok = _byte_tokenizer(str(tmp_path / "b.tiktoken"))
    pretrain.save_checkpoint(str(tmp_path / "ckpt"), 0, model, None, {"tokenizer": tok})
    with pytest.raises(ValueError, match="tokenizer .* does not belong to this checkpoint"):
        S.load_model(str(tmp_path / "ckpt"))
    pytest.importorskip("safetensors")
    model.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        S.load_model(str(tmp_path / "hf"))
    idx = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        S.generate(model, idx, 5)
    no_mtp = M.Mellum(M.get_config("test", num_mtp_layers=0)).init_weights(0)
    with pytest.raises(ValueError, match="needs the MTP module"):
        S.generate(no_mtp, idx[:, :4], 5, speculative=True)


def test_command_line_streams_greedy_text_and_benchmarks(tmp_path):
    # vocab 384 holds the byte tokenizer's 269 ids; larger init so the random model's argmax has clear margins
    cfg = M.get_config("test", vocab_size=384, initializer_range=0.1)
    model = M.Mellum(cfg).init_weights(3).eval()
    tok_path = _byte_tokenizer(str(tmp_path / "b.tiktoken"))
    pretrain.save_checkpoint(str(tmp_path / "ckpt"), 5, model, None, {"tokenizer": tok_path, "stage": "test"})
    import data
    tok = data.get_tokenizer(tok_path)
    prompt = "def f(x):"
    want = _naive_greedy(model, torch.tensor([tok.encode(prompt)]), 12, n_vocab=tok.n_vocab, stop=tok.eot)
    want_text = prompt + tok.decode([t for t in want if t != tok.eot])
    for extra in ([], ["--speculative"]):
        out = io.StringIO()
        with redirect_stdout(out):
            S.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "12",
                    "--temperature", "0", *extra])
        assert out.getvalue() == want_text, extra
    out = io.StringIO()
    with redirect_stdout(out):
        S.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "12", "--bench"])
    text = out.getvalue()
    for row in ("no cache (full recompute)", "KV cache + speculative", "keeping every position on every layer"):
        assert row in text
    assert "WARNING" not in text  # the cached and speculative greedy runs gave the no-cache run's tokens
    with pytest.raises(SystemExit, match="context is 64"):
        S.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "x" * 80])


def test_hugging_face_directory_uses_its_tokenizer_json(tmp_path):
    pytest.importorskip("safetensors")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate("def f x return".split())}}
    hf_tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf_tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model = M.Mellum(M.get_config("test")).init_weights(0)
    model.save_pretrained(str(tmp_path / "hf"))
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    loaded, tok, meta = S.load_model(str(tmp_path / "hf"))
    assert meta == {} and tok.n_vocab == 6 and tok.eot == 1
    assert tok.encode("def f x") == [2, 3, 4]
    # too many ids for the model's 256 embeddings
    hf_tok.add_tokens([f"w{i}" for i in range(300)])
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        S.load_model(str(tmp_path / "hf"))


# =============================================================================
# extend.py

_CPU = pretrain.Compute(torch.device("cpu"))


def _test_model(seed=0, **overrides):
    cfg = M.get_config("test", **overrides)
    torch.manual_seed(seed)
    return M.Mellum(cfg).init_weights(seed).eval()


class _ByteTok:
    """Bytes as tokens, <|endoftext|> = 0 (the test texts contain no NUL)."""
    eot = 0

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode()


# -----------------------------------------------------------------------------
# YaRN frequencies


def _yarn_paper_check(inv_freq, head_dim, theta, s, orig, beta_fast=32.0, beta_slow=1.0):
    """YaRN paper, Sec. 3.2 ("NTK-by-parts"): dimension d with r = L / lambda_d rotations over the original context
    L keeps theta_d when r > beta, gets theta_d / s when r < alpha, lies between the two otherwise."""
    for i in range(head_dim // 2):
        th = theta ** (-2 * i / head_dim)
        r = orig / (2 * math.pi / th)
        got = inv_freq[i].item()
        if r > beta_fast:
            assert got == pytest.approx(th, rel=1e-6), (i, r)
        elif r < beta_slow:
            assert got == pytest.approx(th / s, rel=1e-6), (i, r)
        else:
            assert th / s * (1 - 1e-6) <= got <= th * (1 + 1e-6), (i, r)


def _yarn_reference_code(head_dim, theta, s, orig, beta_fast=32.0, beta_slow=1.0):
    """The YaRN authors' released code (and transformers): the ramp is linear in the dimension index between the
    indices where r = beta_fast (floored) and r = beta_slow (ceiled). Plain Python, per dimension."""
    def index_of(rotations):  # solve orig / (2 pi theta^(2i/hd)) = rotations for i
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = max(math.floor(index_of(beta_fast)), 0), min(math.ceil(index_of(beta_slow)), head_dim - 1)
    out = []
    for i in range(head_dim // 2):
        th = theta ** (-2 * i / head_dim)
        interp = min(max((i - lo) / (hi - lo if hi != lo else 0.001), 0.0), 1.0)
        out.append(th / s * interp + th * (1 - interp))
    return torch.tensor(out, dtype=torch.float64)


_YARN_CASES = [(16, 500_000.0, 4.0, 64), (128, 500_000.0, 16.0, 8192), (32, 10_000.0, 2.5, 256),
               (64, 500_000.0, 32.0, 4096)]


@pytest.mark.parametrize("head_dim,theta,s,orig", _YARN_CASES)
def test_yarn_frequencies_and_mscale_match_the_paper(head_dim, theta, s, orig):
    cfg = M.get_config("test", head_dim=head_dim, max_position_embeddings=orig,
                       rope_parameters={M.FULL: {"rope_type": "default", "rope_theta": theta},
                                        M.SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}})
    ext = extend.extend_config(cfg, s)
    inv_freq, mscale = M.rope_frequencies(head_dim, ext.rope_parameters[M.FULL])
    _yarn_paper_check(inv_freq, head_dim, theta, s, orig)
    torch.testing.assert_close(inv_freq.double(), _yarn_reference_code(head_dim, theta, s, orig), rtol=1e-6, atol=0)
    assert mscale == pytest.approx(0.1 * math.log(s) + 1)
    # the temperature: RoPE'd q . k equals the rotation by the reference frequencies times mscale^2 = 1/t
    # (positions kept small: fp32 angles pos * freq drift by ~pos * 1e-7 rad, in the model as in transformers)
    torch.manual_seed(0)
    q, k, pos = torch.randn(1, 1, 5, head_dim), torch.randn(1, 1, 5, head_dim), torch.tensor([0, 3, 100, 700, 2000])
    cos, sin = M.rope_cos_sin(ext, M.FULL, pos, torch.float32)
    got = (M.apply_rope(q, cos, sin) @ M.apply_rope(k, cos, sin).transpose(-1, -2)).double()
    ang = pos.double()[:, None] * _yarn_reference_code(head_dim, theta, s, orig)[None]
    zq = torch.complex(q[..., :head_dim // 2].double(), q[..., head_dim // 2:].double()) * torch.exp(1j * ang)
    zk = torch.complex(k[..., :head_dim // 2].double(), k[..., head_dim // 2:].double()) * torch.exp(1j * ang)
    want = (zq @ zk.conj().transpose(-1, -2)).real * (0.1 * math.log(s) + 1) ** 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    far = torch.arange(0, int(orig * s), 997)  # and every position of the extended context is scaled by mscale
    cos, sin = M.rope_cos_sin(ext, M.FULL, far, torch.float32)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, (0.1 * math.log(s) + 1) ** 2),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("head_dim,theta,s,orig", _YARN_CASES)
def test_yarn_matches_transformers(head_dim, theta, s, orig):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ext = extend.extend_config(M.get_config("test", head_dim=head_dim, max_position_embeddings=orig,
                                            rope_parameters={M.FULL: {"rope_type": "default", "rope_theta": theta},
                                                             M.SLIDING: {"rope_type": "default",
                                                                         "rope_theta": 10_000.0}}), s)
    hf_cfg = transformers.MellumConfig(**{k: v for k, v in ext.to_hf().items()
                                          if k not in ("model_type", "architectures")})
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu", layer_type=M.FULL)
    got, scale = M.rope_frequencies(head_dim, ext.rope_parameters[M.FULL])
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)


def test_extend_config_touches_only_full_layers():
    cfg = M.get_config("test")  # max_position_embeddings 64, layers sliding x3 + full
    ext = extend.extend_config(cfg, 4)
    assert ext.max_position_embeddings == 256 and cfg.max_position_embeddings == 64  # the input is not modified
    assert cfg.rope_parameters[M.FULL] == {"rope_type": "default", "rope_theta": 500_000.0}
    assert ext.rope_parameters[M.FULL] == {"rope_type": "yarn", "rope_theta": 500_000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                           "beta_slow": 1.0}
    assert ext.rope_parameters[M.SLIDING] == cfg.rope_parameters[M.SLIDING]
    pos = torch.arange(256)
    for a, b in zip(M.rope_cos_sin(cfg, M.SLIDING, pos, torch.float32), M.rope_cos_sin(ext, M.SLIDING, pos,
                                                                                         torch.float32)):
        assert torch.equal(a, b)
    naive = 10_000.0 ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    torch.testing.assert_close(M.rope_frequencies(cfg.head_dim, ext.rope_parameters[M.SLIDING])[0].double(), naive)
    assert not torch.allclose(M.rope_cos_sin(cfg, M.FULL, pos, torch.float32)[0],
                              M.rope_cos_sin(ext, M.FULL, pos, torch.float32)[0])
    with pytest.raises(ValueError, match="no full-attention layer"):
        extend.extend_config(M.get_config("test", layer_types=[M.SLIDING] * 4), 2)


def test_extend_config_bad_input_and_composition():
    cfg = M.get_config("test")
    for bad in (0.5, 0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="factor must be >= 1"):
            extend.extend_config(cfg, bad)
    twice = extend.extend_config(extend.extend_config(cfg, 2), 4)
    assert twice.rope_parameters == extend.extend_config(cfg, 8).rope_parameters
    assert twice.max_position_embeddings == 512
    other = M.get_config("test", rope_parameters={M.FULL: {"rope_type": "linear", "rope_theta": 1e4, "factor": 2},
                                                  M.SLIDING: {"rope_type": "default", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        extend.extend_config(other, 2)


def test_extended_checkpoint_round_trips(tmp_path):
    base = _test_model(seed=1)
    ext = M.Mellum(extend.extend_config(base.config, 4)).eval()
    ext.load_state_dict(base.state_dict())
    idx = torch.randint(0, 256, (1, 200))  # beyond the original 64 positions
    with torch.no_grad():
        want = ext(idx)[0]
        assert not torch.allclose(want, base(idx)[0], atol=1e-3)  # YaRN changes the full layer
    ext.save_pretrained(str(tmp_path / "hf"))
    pretrain.save_checkpoint(str(tmp_path / "ckpt"), 3, ext, None, {"stage": "extend"})
    for loaded in (M.Mellum.from_pretrained(str(tmp_path / "hf")), pretrain.load_checkpoint(str(tmp_path / "ckpt"))[0]):
        assert loaded.config.rope_parameters == ext.config.rope_parameters
        assert loaded.config.max_position_embeddings == 256
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(idx)[0], want, rtol=0, atol=0)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["rope_parameters"][M.FULL]["rope_type"] == "yarn"
    assert saved["rope_parameters"][M.SLIDING] == {"rope_type": "default", "rope_theta": 10_000.0}


def test_transformers_reproduces_extended_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _test_model(seed=2, sliding_window=5)
    ext = M.Mellum(extend.extend_config(base.config, 4)).eval()
    ext.load_state_dict(base.state_dict())
    ext.save_pretrained(str(tmp_path / "ours"))
    hf = transformers.MellumForCausalLM.from_pretrained(str(tmp_path / "ours")).float().eval()
    idx = torch.randint(0, 256, (1, 180))
    with torch.no_grad():
        diff = (hf(idx).logits - ext(idx)[0]).abs().max().item()
    assert diff <= 1e-4


# -----------------------------------------------------------------------------
# Data


def test_passkey_sample_layout():
    tok, filler = _ByteTok(), np.array(list(b"abcdefghij" * 30))
    for depth in (0.0, 0.5, 1.0):
        ids, alen = extend.passkey_sample(tok, filler, 200, depth, 12345)
        text = tok.decode(ids[1:])
        assert len(ids) == 200 and ids[0] == tok.eot and alen == 6
        assert text.endswith(" What is the pass key? The pass key is 12345")
        needle = " The pass key is 12345. Remember it. 12345 is the pass key."
        n_fill = 200 - 1 - len(needle) - len(" What is the pass key? The pass key is") - 6
        assert text.index(needle) == round(depth * n_fill)
    with pytest.raises(ValueError, match="too short"):
        extend.passkey_sample(tok, filler, 60, 0.5, 12345)


def _write_docs(path, docs, eot=0):
    data.write_shard(str(path), [np.array([eot] + d, dtype=np.uint16) for d in docs], len(docs), np.uint16)


def test_loader_windows_resume_and_ranks(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 256, size=n)) for n in (5, 300, 40, 7, 900, 12, 60)]
    _write_docs(tmp_path / "a.tokens", docs)
    _write_docs(tmp_path / "b.tokens", docs[::-1])
    sources = {"a": (str(tmp_path / "a.tokens"), 3.0), "b": (str(tmp_path / "b.tokens"), 1.0)}
    streams = [np.concatenate([np.array([0] + d) for d in ds]) for ds in (docs, docs[::-1])]
    loader = extend.LongContextLoader(sources, _ByteTok(), 4, 200, passkey_share=0.25, seed=5)
    batches = [loader.next_batch() for _ in range(6)]
    n_passkey = 0
    for x, y in batches:
        assert x.shape == y.shape == (4, 200) and torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            if b"What is the pass key?" in bytes(row[1:].astype(np.uint8)):
                n_passkey += 1
                assert row[0] == 0 and (row[1:] != 0).all()  # one document: no separator inside the haystack
            else:  # a contiguous piece of a shard, from a document start or inside one long document
                assert any(np.array_equal(row, s[i:i + 201]) for s in streams for i in range(len(s) - 200))
                assert row[0] == 0 or (row != 0).all()
    assert 0 < n_passkey < 24
    # exact resume from a state dict
    fresh = extend.LongContextLoader(sources, _ByteTok(), 4, 200, passkey_share=0.25, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(_state_after(sources, 3))))
    for want in batches[3:]:
        assert all(torch.equal(a, b) for a, b in zip(fresh.next_batch(), want))
    # two ranks of batch 2 see exactly the rows of one process with batch 4
    ranks = [extend.LongContextLoader(sources, _ByteTok(), 2, 200, passkey_share=0.25, rank=r, world_size=2, seed=5)
             for r in (0, 1)]
    for want in batches:
        got = [rk.next_batch() for rk in ranks]
        assert torch.equal(torch.cat([g[0] for g in got]), want[0])
    with pytest.raises(ValueError, match="seq_len"):
        extend.LongContextLoader(sources, _ByteTok(), 4, 150, passkey_share=0.25, seed=5).load_state_dict(
            loader.state_dict())


def _state_after(sources, steps):
    loader = extend.LongContextLoader(sources, _ByteTok(), 4, 200, passkey_share=0.25, seed=5)
    for _ in range(steps):
        loader.next_batch()
    return loader.state_dict()


# -----------------------------------------------------------------------------
# Evaluation


def test_passkey_accuracy_equals_greedy_decoding():
    model = _test_model(seed=4)
    torch.manual_seed(0)
    prompt = torch.randint(1, 256, (3, 40))
    answer = prompt[:, :0]
    for _ in range(4):  # naive greedy decoding, full recomputation each step
        with torch.no_grad():
            nxt = model(torch.cat([prompt, answer], dim=1))[0][:, -1].argmax(-1, keepdim=True)
        answer = torch.cat([answer, nxt], dim=1)
    ids = torch.cat([prompt, answer], dim=1)
    assert extend.passkey_accuracy(model, ids, [4, 4, 4], _CPU) == 1.0
    assert extend.passkey_accuracy(model, ids, [2, 3, 4], _CPU) == 1.0  # shorter answers are suffixes of it
    wrong = ids.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % 256
    wrong[2, -3] = (wrong[2, -3] + 1) % 256  # an early answer token wrong
    assert extend.passkey_accuracy(model, wrong, [4, 4, 4], _CPU) == pytest.approx(1 / 3)


def test_loss_by_position_matches_naive():
    model = _test_model(seed=5)
    rows = torch.randint(0, 256, (3, 601))
    edges = [0, 64, 128, 600]
    got = extend.loss_by_position(model, rows, edges, _CPU)
    with torch.no_grad():
        ce = F.cross_entropy(model(rows[:, :-1])[0].transpose(1, 2), rows[:, 1:], reduction="none")  # (3, 600)
    want = [ce[:, lo:hi].mean(dim=1).mean().item() for lo, hi in zip(edges[:-1], edges[1:])]
    assert got == pytest.approx(want, rel=1e-5)


def test_memory_check_refuses_before_allocating():
    cfg = extend.extend_config(M.get_config("tiny"), 4096)  # 256 -> 1M tokens
    T = cfg.max_position_embeddings
    need = extend.step_memory_bytes(cfg, 1, T, torch.device("cpu"))
    assert need >= T * cfg.vocab_size * 4 * 3 * 2  # at least the fp32 logits, log-probs and grads, main + MTP
    with pytest.raises(MemoryError, match=r"context 1,048,576 .* needs about .* GiB"):
        extend.check_memory(cfg, 1, cfg.max_position_embeddings, torch.device("cpu"))
    small = extend.extend_config(M.get_config("test"), 2)
    extend.check_memory(small, 1, small.max_position_embeddings, torch.device("cpu"))  # fits: no error


# -----------------------------------------------------------------------------
# End to end: python extend.py on a small byte-level corpus


def _byte_tokenizer_file(path):
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return str(path)


def _corpus_mixture(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))[:60]
    docs = []
    for name in names:
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            text = f.read().replace("\x00", "")
        if len(text) > 3000:
            docs.append(text[:6000])
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    mix = {"sources": {"docs": {"paths": [str(tmp_path / "docs.jsonl")]}},
           "phases": {"1": {"weights": {"docs": 1.0}, "tokens": 100_000}}}
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    return str(tmp_path / "mix.json")


@pytest.mark.slow
def test_extension_run_lowers_long_context_loss(tmp_path, capsys):
    tok = data.get_tokenizer(_byte_tokenizer_file(tmp_path / "bytes.tiktoken"))
    mixture = _corpus_mixture(tmp_path)
    shards = data.prepare_data(data.load_mixture(mixture), tok, data_dir=str(tmp_path / "data"), phases=(1,),
                               log=lambda *a: None)
    # a base trained briefly at its 128-token context
    cfg = M.get_config("test", vocab_size=tok.vocab_size, max_position_embeddings=128)
    base = M.Mellum(cfg).init_weights(0)
    loader = extend.LongContextLoader({"docs": (shards["docs"].train, 1.0)}, tok, 8, 128, passkey_share=0.0)
    pretrain.train(_CPU, base, loader, lambda m: float("nan"), out_dir=str(tmp_path / "base"), stage="base",
                   steps=40, lr=3e-3, schedule=lambda s: 1.0, eval_every=1000, ckpt_every=1000,
                   meta={"tokenizer": tok.name}, log_every=1000)
    common = ["--from", str(tmp_path / "base"), "--factor", "4", "--mixture", mixture, "--data-dir",
              str(tmp_path / "data"), "--out-dir", str(tmp_path / "ext"), "--passkey-trials", "1", "--eval-rows", "4",
              "--device", "cpu", "--log-every", "1000"]
    results = extend.main(common + ["--steps", "30", "--batch-size", "4", "--eval-every", "1000"])
    names = list(results)
    assert len(names) == 3 and names[2].endswith("extended 30 steps")
    untrained, trained = results[names[1]]["loss"], results[names[2]]["loss"]
    assert trained[-1] < untrained[-1] - 0.05  # positions 256..511, beyond the base's context
    assert np.mean(trained) < np.mean(untrained)
    out = capsys.readouterr().out
    assert "| model | passkey @128 (1x) | passkey @256 (2x) | passkey @512 (4x) | loss 0-128 |" in out
    # --eval-only finds the extended checkpoint and gives the same numbers; a bad factor fails clearly
    again = extend.main(common + ["--eval-only"])
    assert again[names[2]]["loss"] == pytest.approx(trained, rel=1e-6)
    with pytest.raises(SystemExit, match="factor must be >= 1"):
        extend.main(common[:2] + ["--factor", "0.5"] + common[4:])
