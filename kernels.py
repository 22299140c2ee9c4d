"""
Triton kernels for nanoMellum, each next to the plain-PyTorch reference that defines what it computes.

Sections, top to bottom:
  dispatch       `ENABLED`, `use_kernels(device)`, `fp8_supported(device)`, `bf16_matmul_fast(device)`: model.py,
                 muon.py and train.py ask these, in one place; `keep_freed_memory()`, glibc's allocator for
                 tensor loops (every stage's entry point and muon.py's bench set it)
  attention      flash attention (causal, GQA, optional sliding window), forward + backward Triton kernels,
                 `flash_attention` (autograd) and `attention_ref`
  FP8            "hybrid" FP8 GEMMs as in DeepSeek-V3 (https://arxiv.org/abs/2412.19437, section 3.3):
                 E4M3 with fine-grained scales in the forward pass, E5M2 for output gradients in the backward
                 pass, fp32 accumulation promoted every 128-wide K tile. Quantisation kernels (1x128 row tiles,
                 128x128 weight blocks, 128x1 column tiles per expert for the weight gradient), grouped GEMMs,
                 `fp8_grouped_linear` / `fp8_linear` (autograd; Triton or the PyTorch emulation) and `*_ref`s
  head           `head_logprobs`: the LM head's log-probabilities of given tokens without materialising the
                 (N, V) logits (vocabulary blocks, online logsumexp; the backward reuses the forward's logits
                 where they fit HEAD_KEEP_BYTES, else recomputes them), `head_logprobs_ref`,
                 `head_matmuls(dtype)` (its matmuls' dtype outside autocast: bf16 on a bf16 CPU)
  CPU paths      plain PyTorch that beats the general path on a CPU: the MoE experts of decoding in place or in
                 padded blocks (`experts_path` decides), long sliding windows in blocks of the window
  bench          `python kernels.py --bench` (GPU): attention and FP8 grouped GEMM throughput vs PyTorch;
                 `python kernels.py --bench-moe`: the grouped MoE dispatch against a per-expert loop (CPU);
                 `python kernels.py --bench-head`: the head's backward keeping its logits against recomputing them

Shape legend in the FP8 section: R routed rows (tokens sorted by expert), E experts, I in features, O out
features, C columns of a tensor being quantised.

Footguns:
- Set TRITON_INTERPRET=1 *before* importing this module to run kernels on CPU tensors (the tests do); the
  dispatch predicates still say False on CPU, so normal CPU runs use the PyTorch paths.
- Under the interpreter `tl.dot` on bf16 is wrong and Triton 3.9's float->fp8 cast rounds wrongly (no carry
  into the exponent: 125.3 -> 64); tests use fp32 inputs and patch that cast. On a GPU both are fine.
- The sliding window W means query i sees keys i-W < j <= i (W keys including itself).
- `offs_E` are int32 cumulative *end* offsets (as for torch._grouped_mm) and offs[-1] must equal the number
  of rows: rows past it are not written by the kernel.
- Without Triton installed (e.g. macOS) the module still imports; the *_ref paths work, launches raise.
"""
import argparse
import contextlib
import ctypes
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # keep the module importable: @triton.jit becomes a no-op, launching raises
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# -----------------------------------------------------------------------------
# Dispatch

ENABLED = True  # tests (and anyone debugging) flip this to force the PyTorch paths


def use_kernels(device):
    """True when the Triton kernels should run for tensors on `device`."""
    device = torch.device(device)
    return ENABLED and HAS_TRITON and device.type == "cuda" and torch.cuda.is_available()


def fp8_supported(device):
    """FP8 tensor cores: compute capability 8.9 (Ada) or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


# A CPU whose oneDNN has bf16 matrix instructions: AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD
# Zen 4 and later, Intel Cooper Lake; measured on a Zen 5). Without either, bf16 is emulated and slow. torch 2.13
# has no public name for these checks.
_CPU_BF16 = any(getattr(torch.cpu, f"_is_{isa}_supported", bool)() for isa in ("amx_tile", "avx512_bf16"))


def bf16_matmul_fast(device):
    """True where a bf16 matmul beats fp32: a GPU, or a CPU with bf16 matrix instructions (_CPU_BF16; on tiny's
    shapes 2-4x fp32's rate with AMX, 1.3-4x on a Zen 5's AVX512-BF16; RESULTS.md). muon.ns_dtype and
    train.Compute.autocast ask this."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _CPU_BF16)


def keep_freed_memory():
    """glibc's malloc hands every freed block above its mmap threshold back to the kernel, so a loop that makes
    the same few-MiB tensors every step (decoding 128 rows: the (128, 16K) logits and probabilities, 8 MiB each)
    page-faults them in again each time: 3x the minor faults, generation 1.2-1.4x slower (RESULTS.md). Keep such
    blocks in the heap: the threshold at glibc's maximum, 32 MiB, and no trimming. Does nothing off glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 2**30)


def _check_launch(name, *tensors, strided=()):
    """Tensors must be on CUDA (or CPU under the interpreter); all but `strided` must be contiguous."""
    if not HAS_TRITON:
        raise RuntimeError(f"kernels.py {name}: triton is not installed; use the *_ref function instead")
    for t in tensors + tuple(strided):
        if not (t.is_cuda or INTERPRET):
            raise ValueError(f"kernels.py {name}: got a {t.device} tensor; Triton kernels need CUDA tensors "
                             "(or TRITON_INTERPRET=1 set before import, for CPU testing)")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError(f"kernels.py {name}: inputs must be contiguous; call .contiguous() first")


def _cdiv(a, b):
    return (a + b - 1) // b


# -----------------------------------------------------------------------------
# Flash attention (https://arxiv.org/abs/2205.14135, FA2 work split https://arxiv.org/abs/2307.08691)
#
# The key range of a query block [m0, m0+BM) is cut into three parts: window edge blocks (masked), interior
# blocks (no mask needed), diagonal blocks (masked). Blocks wholly outside the window are never visited, so a
# sliding layer costs O(T*W). GQA: query head h reads key/value head h // (H/K); nothing is repeated.
# Softmax runs in base 2 (scores pre-multiplied by log2(e)); the saved log-sum-exp is in the same units.

_NO_WINDOW = 2**30  # "window" used for full causal attention: larger than any sequence


def attention_ref(q, k, v, window=None):
    """Definition: causal softmax(q k^T / sqrt(hd)) v with keys i-W < j <= i, K/V heads repeated for GQA."""
    T, group = q.size(2), q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    allowed = (j <= i) & (j > i - (window or _NO_WINDOW))
    s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)


@triton.jit
def _key_ranges(m0, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by queries [m0, m0+BLOCK_M): [lo, mid) window edge, [mid, m0) interior, [m0, hi) diagonal."""
    lo = tl.maximum(m0 - W + 1, 0) // BLOCK_N * BLOCK_N
    mid = tl.minimum((tl.maximum(m0 + BLOCK_M - W, lo) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, m0)
    return lo, mid, tl.minimum(m0 + BLOCK_M, T)


@triton.jit
def _attn_fwd_range(acc, m_i, l_i, q, K, V, offs_m, offs_d, lo, hi, T, W, qk_scale,
                    HD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = offs_n[:, None] < T
        k = tl.load(K + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - W)
            s = tl.where(ok & (offs_n[None, :] < T), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, H, GROUP, T, W, qk_scale,
                     HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # b * H + h
    kv_bh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    Q += bh.to(tl.int64) * T * HD
    O += bh.to(tl.int64) * T * HD
    K += kv_bh.to(tl.int64) * T * HD
    V += kv_bh.to(tl.int64) * T * HD
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    q = tl.load(Q + offs_m[:, None] * HD + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    # A finite start for the running max: a row may see no key in its first (window edge) block.
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HD), tl.float32)
    lo, mid, hi = _key_ranges(m0, T, W, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attn_fwd_range(acc, m_i, l_i, q, K, V, offs_m, offs_d, lo, mid, T, W, qk_scale, HD, BLOCK_N, True)
    acc, m_i, l_i = _attn_fwd_range(acc, m_i, l_i, q, K, V, offs_m, offs_d, mid, m0, T, W, qk_scale, HD, BLOCK_N, False)
    acc, m_i, l_i = _attn_fwd_range(acc, m_i, l_i, q, K, V, offs_m, offs_d, m0, hi, T, W, qk_scale, HD, BLOCK_N, True)
    l_i = tl.where(l_i > 0, l_i, 1.0)  # padding rows past T may see no key at all
    tl.store(O + offs_m[:, None] * HD + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=offs_m[:, None] < T)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, offs_d, lo, hi, T, W, qk_scale,
                         HD: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr):
    # Works on transposed scores (keys x queries) so dk, dv accumulate without transposing p.
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(Q + offs_m[:, None] * HD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * HD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))  # padded rows get p = 0
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASK:
            ok = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] > offs_m[None, :] - W)
            p_t = tl.where(ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, H, GROUP, T, W, qk_scale, sm_scale,
                          HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of one K/V head; loops over the GROUP query heads that share it (no atomics)."""
    n0 = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1)  # b * (H // GROUP) + kv head
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD)
    kv_off = kv_bh.to(tl.int64) * T * HD + offs_n[:, None] * HD + offs_d[None, :]
    k = tl.load(K + kv_off, mask=offs_n[:, None] < T, other=0.0)
    v = tl.load(V + kv_off, mask=offs_n[:, None] < T, other=0.0)
    dk = tl.zeros((BLOCK_N, HD), tl.float32)
    dv = tl.zeros((BLOCK_N, HD), tl.float32)
    # Queries that see this block: diagonal [n0, diag_hi) masked, interior [diag_hi, mid) free, window edge
    # [mid, hi) masked. A query block [m0, m0+BLOCK_M) is free of the window mask iff m0 + BLOCK_M <= n0 + W.
    hi = tl.minimum(T, n0 + BLOCK_N - 1 + W)
    diag_hi = tl.minimum(n0 + BLOCK_N, hi)
    mid = tl.maximum(tl.minimum((n0 + W) // BLOCK_M * BLOCK_M, T), diag_hi)
    b = kv_bh // (H // GROUP)
    for g in range(GROUP):
        bh = b * H + (kv_bh % (H // GROUP)) * GROUP + g
        q_off = bh.to(tl.int64) * T * HD
        r_off = bh.to(tl.int64) * T
        dk, dv = _attn_bwd_dkdv_range(dk, dv, k, v, Q + q_off, DO + q_off, LSE + r_off, DELTA + r_off, offs_n,
                                      offs_d, n0, diag_hi, T, W, qk_scale, HD, BLOCK_M, True)
        dk, dv = _attn_bwd_dkdv_range(dk, dv, k, v, Q + q_off, DO + q_off, LSE + r_off, DELTA + r_off, offs_n,
                                      offs_d, diag_hi, mid, T, W, qk_scale, HD, BLOCK_M, False)
        dk, dv = _attn_bwd_dkdv_range(dk, dv, k, v, Q + q_off, DO + q_off, LSE + r_off, DELTA + r_off, offs_n,
                                      offs_d, mid, hi, T, W, qk_scale, HD, BLOCK_M, True)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < T)


@triton.jit
def _attn_bwd_dq_range(dq, q, do, lse, delta, K, V, offs_m, offs_d, lo, hi, T, W, qk_scale,
                       HD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = offs_n[:, None] < T
        k = tl.load(K + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASK:
            ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - W)
            p = tl.where(ok & (offs_n[None, :] < T), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, H, GROUP, T, W, qk_scale, sm_scale,
                        HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    kv_bh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    K += kv_bh.to(tl.int64) * T * HD
    V += kv_bh.to(tl.int64) * T * HD
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    row_ok = offs_m < T
    q_off = bh.to(tl.int64) * T * HD + offs_m[:, None] * HD + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HD), tl.float32)
    lo, mid, hi = _key_ranges(m0, T, W, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_range(dq, q, do, lse, delta, K, V, offs_m, offs_d, lo, mid, T, W, qk_scale, HD, BLOCK_N, True)
    dq = _attn_bwd_dq_range(dq, q, do, lse, delta, K, V, offs_m, offs_d, mid, m0, T, W, qk_scale, HD, BLOCK_N, False)
    dq = _attn_bwd_dq_range(dq, q, do, lse, delta, K, V, offs_m, offs_d, m0, hi, T, W, qk_scale, HD, BLOCK_N, True)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _attn_config(hd):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for forward and backward: Hopper-sized guesses, unmeasured."""
    warps = 8 if hd >= 128 else 4
    return (128, 64, warps, 3), (128, 32, warps, 2)


def _check_attention(q, k, v, window, block_m, block_n):
    _check_launch("flash_attention", q, k, v)
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"kernels.py flash_attention: want q (B, H, T, hd), k/v (B, K, T, hd); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    hd = q.size(-1)
    if q.size(1) % k.size(1) or hd not in (16, 32, 64, 128, 256):
        raise ValueError(f"kernels.py flash_attention: need H % K == 0 and hd in 16..256 (power of 2); "
                         f"got H={q.size(1)}, K={k.size(1)}, hd={hd}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kernels.py flash_attention: q/k/v must share one of fp16/bf16/fp32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"kernels.py flash_attention: window must be None or >= 1, got {window}")
    if block_m % block_n:
        raise ValueError(f"kernels.py flash_attention: block_m ({block_m}) must be a multiple of block_n ({block_n})")


def attention_fwd(q, k, v, window=None, block_m=None, block_n=None):
    """Launcher: returns o (like q) and the base-2 log-sum-exp of the scaled scores, (B, H, T) fp32."""
    (bm, bn, warps, stages), _ = _attn_config(q.size(-1))
    block_m, block_n = block_m or bm, block_n or bn
    _check_attention(q, k, v, window, block_m, block_n)
    B, H, T, hd = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    qk_scale = math.log2(math.e) / math.sqrt(hd)
    _attn_fwd_kernel[(_cdiv(T, block_m), B * H)](
        q, k, v, o, lse, H, H // k.size(1), T, window or _NO_WINDOW, qk_scale,
        HD=hd, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, window=None, block_m=None, block_n=None):
    """Launcher: (dq, dk, dv) from the forward's o and log-sum-exp; nothing T x T is stored."""
    _, (bm, bn, warps, stages) = _attn_config(q.size(-1))
    block_m, block_n = block_m or bm, block_n or bn
    _check_attention(q, k, v, window, block_m, block_n)
    _check_launch("attention_bwd", do, o, lse)
    B, H, T, hd = q.shape
    delta = (o.float() * do.float()).sum(-1)  # rowsum(dO * O) = rowsum(P * dP), the softmax-gradient term
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    W, group, sm_scale = window or _NO_WINDOW, H // k.size(1), 1.0 / math.sqrt(hd)
    qk_scale = sm_scale * math.log2(math.e)
    # dk/dv programs own a big block of keys and walk small query blocks; the dq programs do the opposite.
    _attn_bwd_dkdv_kernel[(_cdiv(T, block_m), B * k.size(1))](
        q, k, v, do, dk, dv, lse, delta, H, group, T, W, qk_scale, sm_scale,
        HD=hd, BLOCK_M=block_n, BLOCK_N=block_m, num_warps=warps, num_stages=stages)
    _attn_bwd_dq_kernel[(_cdiv(T, block_m), B * H)](
        q, k, v, do, dq, lse, delta, H, group, T, W, qk_scale, sm_scale,
        HD=hd, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, block_m, block_n):
        o, lse = attention_fwd(q, k, v, window, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.config = (window, block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = attention_bwd(do.contiguous(), *ctx.saved_tensors, *ctx.config)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, window=None, block_m=None, block_n=None):
    """Causal (window=None) or sliding-window attention with GQA; q (B, H, T, hd), k/v (B, K, T, hd).
    Differentiable. Block sizes default to `_attn_config(hd)`; block_m must be a multiple of block_n."""
    if torch.is_autocast_enabled(q.device.type):  # behave like SDPA under autocast
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), window, block_m, block_n)


# -----------------------------------------------------------------------------
# FP8 hybrid precision: quantisation, grouped GEMMs, autograd
#
# Scale = amax / fp8_max per tile (1 for an all-zero tile), q = saturate(x / scale) rounded to nearest even.
# Forward:  y = x @ w.T with x as E4M3 1x128 row tiles (along I) and w as E4M3 128x128 blocks.
# Backward: dx = dy @ w with dy as E5M2 1x128 row tiles (along O), reusing the forward's quantised w;
#           dw = dy.T @ x with dy (E5M2) and x (E4M3) in 128x1 column tiles (along the rows of one expert),
#           stored transposed so both GEMM operands are K-major. Each 128-wide K step is scaled and added to
#           an fp32 accumulator, so the tensor cores' limited-precision FP8 accumulation never runs long.

FP8_TILE = 128
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _fp8_max(dtype):
    return torch.finfo(dtype).max


def _scale_ref(amax, dtype):
    return torch.where(amax > 0, amax / _fp8_max(dtype), torch.ones_like(amax))


def _cast_ref(x, scale, dtype):
    return (x / scale).clamp(-_fp8_max(dtype), _fp8_max(dtype)).to(dtype)


def quantize_rowwise_ref(x_MC, dtype, tile=FP8_TILE):
    """1 x tile tiles along the last dim: (q (M, C) fp8, scale (M, ceil(C/tile)) fp32)."""
    M, C = x_MC.shape
    nt = _cdiv(C, tile)
    x = F.pad(x_MC.float(), (0, nt * tile - C)).view(M, nt, tile)
    scale = _scale_ref(x.abs().amax(-1), dtype)
    return _cast_ref(x, scale[..., None], dtype).view(M, nt * tile)[:, :C].contiguous(), scale


@triton.jit
def _quant_rowwise_kernel(X, Q, S, M, C, FP8_MAX: tl.constexpr, BLOCK_R: tl.constexpr, TILE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)
    q = tl.clamp(tl.div_rn(x, scale[:, None]), -FP8_MAX, FP8_MAX)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + rows * tl.cdiv(C, TILE) + tl.program_id(1), scale, mask=rows < M)


def quantize_rowwise(x_MC, dtype, tile=FP8_TILE):
    """Triton launcher for `quantize_rowwise_ref`."""
    _check_launch("quantize_rowwise", x_MC)
    M, C = x_MC.shape
    q = torch.empty(M, C, device=x_MC.device, dtype=dtype)
    scale = torch.empty(M, _cdiv(C, tile), device=x_MC.device, dtype=torch.float32)
    if M:
        _quant_rowwise_kernel[(_cdiv(M, 32), _cdiv(C, tile))](x_MC, q, scale, M, C, _fp8_max(dtype), 32, tile)
    return q, scale


def quantize_blockwise_ref(w_EOI, dtype, tile=FP8_TILE):
    """tile x tile blocks of each expert's matrix: (q (E, O, I) fp8, scale (E, ceil(O/tile), ceil(I/tile)))."""
    E, O, I = w_EOI.shape
    no, ni = _cdiv(O, tile), _cdiv(I, tile)
    w = F.pad(w_EOI.float(), (0, ni * tile - I, 0, no * tile - O)).view(E, no, tile, ni, tile)
    scale = _scale_ref(w.abs().amax(dim=(2, 4)), dtype)
    q = _cast_ref(w, scale[:, :, None, :, None], dtype).view(E, no * tile, ni * tile)
    return q[:, :O, :I].contiguous(), scale


@triton.jit
def _quant_blockwise_kernel(W, Q, S, O, I, FP8_MAX: tl.constexpr, TILE: tl.constexpr):
    ot, it, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = ot * TILE + tl.arange(0, TILE)
    cols = it * TILE + tl.arange(0, TILE)
    mask = (rows < O)[:, None] & (cols < I)[None, :]
    offs = e.to(tl.int64) * O * I + rows[:, None] * I + cols[None, :]
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale = tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)
    q = tl.clamp(tl.div_rn(w, scale), -FP8_MAX, FP8_MAX)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + (e * tl.num_programs(0) + ot) * tl.num_programs(1) + it, scale)


def quantize_blockwise(w_EOI, dtype, tile=FP8_TILE):
    """Triton launcher for `quantize_blockwise_ref`."""
    _check_launch("quantize_blockwise", w_EOI)
    E, O, I = w_EOI.shape
    q = torch.empty(E, O, I, device=w_EOI.device, dtype=dtype)
    scale = torch.empty(E, _cdiv(O, tile), _cdiv(I, tile), device=w_EOI.device, dtype=torch.float32)
    if q.numel():
        _quant_blockwise_kernel[(_cdiv(O, tile), _cdiv(I, tile), E)](w_EOI, q, scale, O, I, _fp8_max(dtype), tile)
    return q, scale


def _tile_ends(offs_E, tile):
    """Cumulative count of `tile`-row tiles per expert (each expert starts a new tile); computed on device."""
    counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    return torch.cumsum((counts_E + tile - 1) // tile, 0).to(torch.int32)


def _row_tiles(offs_E, R, tile):
    """Per row: the index of its per-expert tile, numbered as `_tile_ends` does."""
    counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1)).long()
    e_R = torch.repeat_interleave(torch.arange(len(offs_E), device=offs_E.device), counts_E, output_size=R)
    first_tile_E = _tile_ends(offs_E, tile).long() - (counts_E + tile - 1) // tile
    rows = torch.arange(R, device=offs_E.device)
    return first_tile_E[e_R] + (rows - (offs_E.long() - counts_E)[e_R]) // tile


def quantize_colwise_grouped_ref(x_RC, offs_E, dtype, tile=FP8_TILE):
    """tile x 1 tiles down the rows of each expert (tiles never straddle two experts). Returns the transposed
    q (C, R) fp8 and scale (ceil(R/tile) + E, C): row t holds tile t, unused rows are 1."""
    R, C = x_RC.shape
    tile_R = _row_tiles(offs_E, R, tile)
    amax = x_RC.new_zeros(_cdiv(R, tile) + len(offs_E), C, dtype=torch.float32)
    amax.scatter_reduce_(0, tile_R[:, None].expand(R, C), x_RC.float().abs(), "amax")
    scale = _scale_ref(amax, dtype)
    return _cast_ref(x_RC.float(), scale[tile_R], dtype).t().contiguous(), scale


@triton.jit
def _group_of_tile(t, OFFS, TILE_ENDS, E, E_P2: tl.constexpr, TILE: tl.constexpr):
    """Row tile t of the grouped row space -> (expert, its first row in this tile, expert's end row).
    Past the last tile the first row is >= the end row, so the caller returns early."""
    idx = tl.arange(0, E_P2)
    ends = tl.load(TILE_ENDS + idx, mask=idx < E, other=2147483647)
    e = tl.minimum(tl.sum((ends <= t).to(tl.int32), axis=0), E - 1)
    end = tl.load(OFFS + e)
    start = tl.load(OFFS + e - 1, mask=e > 0, other=0)
    first_tile = tl.load(TILE_ENDS + e) - (end - start + TILE - 1) // TILE
    return e, start + (t - first_tile) * TILE, end


@triton.jit
def _quant_colwise_kernel(X, QT, S, OFFS, TILE_ENDS, R, C, E, FP8_MAX: tl.constexpr, E_P2: tl.constexpr,
                          BLOCK_C: tl.constexpr, TILE: tl.constexpr):
    t = tl.program_id(0)
    _, row0, row_end = _group_of_tile(t, OFFS, TILE_ENDS, E, E_P2, TILE)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, TILE)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < row_end)[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)
    q = tl.clamp(tl.div_rn(x, scale[None, :]), -FP8_MAX, FP8_MAX)
    tl.store(QT + cols.to(tl.int64)[None, :] * R + rows[:, None], q.to(QT.dtype.element_ty), mask=mask)
    tl.store(S + t * C + cols, scale, mask=cols < C)


def quantize_colwise_grouped(x_RC, offs_E, dtype, tile=FP8_TILE):
    """Triton launcher for `quantize_colwise_grouped_ref`."""
    _check_launch("quantize_colwise_grouped", x_RC, offs_E)
    R, C = x_RC.shape
    E = len(offs_E)
    q = torch.empty(C, R, device=x_RC.device, dtype=dtype)
    scale = torch.ones(_cdiv(R, tile) + E, C, device=x_RC.device, dtype=torch.float32)
    if R:
        _quant_colwise_kernel[(_cdiv(R, tile) + E, _cdiv(C, 64))](
            x_RC, q, scale, offs_E, _tile_ends(offs_E, tile), R, C, E, _fp8_max(dtype),
            triton.next_power_of_2(E), 64, tile)
    return q, scale


def _dequant_rows(q_MC, scale, tile):
    return q_MC.float() * scale.repeat_interleave(tile, 1)[:, :q_MC.size(1)]


def fp8_grouped_gemm_ref(a_RK, a_scale, b_ENK, b_scale, offs_E, out_dtype, tile=FP8_TILE):
    """y[rows of e] = a[rows of e] @ b[e].T from a rowwise-quantised a and a blockwise-quantised b (which may
    be a transposed view), computed from the dequantised values in fp32."""
    E, N, K = b_ENK.shape
    a = _dequant_rows(a_RK, a_scale, tile)
    b = b_ENK.float() * b_scale.repeat_interleave(tile, 1).repeat_interleave(tile, 2)[:, :N, :K]
    y = torch.zeros(a_RK.size(0), N, device=a_RK.device, dtype=out_dtype)
    start = 0
    with torch.autocast(a_RK.device.type, enabled=False):
        for e, end in enumerate(offs_E.tolist()):
            y[start:end] = (a[start:end] @ b[e].t()).to(out_dtype)
            start = end
    return y


@triton.jit
def _fp8_gemm_kernel(A, AS, B, BS, Y, OFFS, TILE_ENDS, N, K, E, stride_be, stride_bn, stride_bk,
                     stride_se, stride_sn, stride_sk, E_P2: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr):
    e, row0, row_end = _group_of_tile(tl.program_id(0), OFFS, TILE_ENDS, E, E_P2, BLOCK_M)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < row_end, cols < N
    ks = tl.arange(0, TILE)
    nkt = tl.cdiv(K, TILE)
    A += rows.to(tl.int64)[:, None] * K
    B += e.to(tl.int64) * stride_be + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(nkt):
        kk = kt * TILE + ks
        a = tl.load(A + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
        b = tl.load(B + kk[:, None] * stride_bk, mask=(kk < K)[:, None] & col_ok[None, :], other=0.0)
        a_s = tl.load(AS + rows * nkt + kt, mask=row_ok, other=0.0)
        b_s = tl.load(BS + e * stride_se + (cols // TILE) * stride_sn + kt * stride_sk, mask=col_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fp8_grouped_gemm(a_RK, a_scale, b_ENK, b_scale, offs_E, out_dtype, tile=FP8_TILE):
    """Triton launcher for `fp8_grouped_gemm_ref`. One program per (128-row tile of one expert, column tile);
    the grid is sized without a host sync (cdiv(R, 128) + E row tiles) and idle programs return at once."""
    _check_launch("fp8_grouped_gemm", a_RK, a_scale, offs_E, strided=(b_ENK, b_scale))
    E, N, K = b_ENK.shape
    R = a_RK.size(0)
    if a_RK.size(1) != K or len(offs_E) != E or b_scale.shape != (E, _cdiv(N, tile), _cdiv(K, tile)):
        raise ValueError(f"kernels.py fp8_grouped_gemm: a {tuple(a_RK.shape)}, b {tuple(b_ENK.shape)}, b_scale "
                         f"{tuple(b_scale.shape)} and {len(offs_E)} offsets do not match")
    y = torch.empty(R, N, device=a_RK.device, dtype=out_dtype)
    if R:
        block_m, block_n = 128, 128
        _fp8_gemm_kernel[(_cdiv(R, block_m) + E, _cdiv(N, block_n))](
            a_RK, a_scale, b_ENK, b_scale, y, offs_E, _tile_ends(offs_E, block_m), N, K, E,
            *b_ENK.stride(), *b_scale.stride(), triton.next_power_of_2(E), block_m, block_n, tile,
            num_warps=8, num_stages=3)
    return y


def fp8_grouped_wgrad_ref(a_NR, a_scale, b_KR, b_scale, offs_E, out_dtype, tile=FP8_TILE):
    """dw[e] = a[:, rows of e] @ b[:, rows of e].T from column-tile-quantised, transposed a and b: (E, N, K)."""
    tile_R = _row_tiles(offs_E, a_NR.size(1), tile)
    a, b = a_NR.float() * a_scale[tile_R].t(), b_KR.float() * b_scale[tile_R].t()
    dw = torch.empty(len(offs_E), a_NR.size(0), b_KR.size(0), device=a_NR.device, dtype=out_dtype)
    start = 0
    with torch.autocast(a_NR.device.type, enabled=False):
        for e, end in enumerate(offs_E.tolist()):
            dw[e] = (a[:, start:end] @ b[:, start:end].t()).to(out_dtype)
            start = end
    return dw


@triton.jit
def _fp8_wgrad_kernel(A, AS, B, BS, DW, OFFS, TILE_ENDS, N, K, R,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE: tl.constexpr):
    e = tl.program_id(2)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    end = tl.load(OFFS + e)
    start = tl.load(OFFS + e - 1, mask=e > 0, other=0)
    n_tiles = (end - start + TILE - 1) // TILE
    first_tile = tl.load(TILE_ENDS + e) - n_tiles
    rs = tl.arange(0, TILE)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for i in range(n_tiles):  # an empty expert runs no iteration and stores zeros
        r = start + i * TILE + rs
        r_ok = r < end
        a = tl.load(A + ns.to(tl.int64)[:, None] * R + r[None, :], mask=(ns < N)[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(B + ks.to(tl.int64)[None, :] * R + r[:, None], mask=r_ok[:, None] & (ks < K)[None, :], other=0.0)
        a_s = tl.load(AS + (first_tile + i) * N + ns, mask=ns < N, other=0.0)
        b_s = tl.load(BS + (first_tile + i) * K + ks, mask=ks < K, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    tl.store(DW + e.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=(ns < N)[:, None] & (ks < K)[None, :])


def fp8_grouped_wgrad(a_NR, a_scale, b_KR, b_scale, offs_E, out_dtype, tile=FP8_TILE):
    """Triton launcher for `fp8_grouped_wgrad_ref`."""
    _check_launch("fp8_grouped_wgrad", a_NR, a_scale, b_KR, b_scale, offs_E)
    (N, R), K, E = a_NR.shape, b_KR.size(0), len(offs_E)
    if b_KR.size(1) != R:
        raise ValueError(f"kernels.py fp8_grouped_wgrad: a {tuple(a_NR.shape)} and b {tuple(b_KR.shape)} "
                         "must have the same number of rows R")
    dw = torch.empty(E, N, K, device=a_NR.device, dtype=out_dtype)
    _fp8_wgrad_kernel[(_cdiv(N, 128), _cdiv(K, 128), E)](
        a_NR, a_scale, b_KR, b_scale, dw, offs_E, _tile_ends(offs_E, tile), N, K, R, 128, 128, tile,
        num_warps=8, num_stages=3)
    return dw


_TRITON_OPS = SimpleNamespace(rowwise=quantize_rowwise, blockwise=quantize_blockwise,
                              colwise=quantize_colwise_grouped, gemm=fp8_grouped_gemm, wgrad=fp8_grouped_wgrad)
_REF_OPS = SimpleNamespace(rowwise=quantize_rowwise_ref, blockwise=quantize_blockwise_ref,
                           colwise=quantize_colwise_grouped_ref, gemm=fp8_grouped_gemm_ref,
                           wgrad=fp8_grouped_wgrad_ref)


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RI, w_EOI, offs_E, out_dtype, ops):
        xq_RI, xs = ops.rowwise(x_RI, E4M3)
        wq_EOI, ws = ops.blockwise(w_EOI, E4M3)
        ctx.save_for_backward(x_RI, wq_EOI, ws, offs_E)
        ctx.ops, ctx.w_dtype = ops, w_EOI.dtype
        return ops.gemm(xq_RI, xs, wq_EOI, ws, offs_E, out_dtype)

    @staticmethod
    def backward(ctx, dy_RO):
        x_RI, wq_EOI, ws, offs_E = ctx.saved_tensors
        ops, dy_RO = ctx.ops, dy_RO.contiguous()
        dx_RI = dw_EOI = None
        if ctx.needs_input_grad[0]:
            dyq_RO, dys = ops.rowwise(dy_RO, E5M2)
            dx_RI = ops.gemm(dyq_RO, dys, wq_EOI.transpose(1, 2), ws.transpose(1, 2), offs_E, x_RI.dtype)
        if ctx.needs_input_grad[1]:
            dyq_OR, dys = ops.colwise(dy_RO, offs_E, E5M2)
            xq_IR, xs = ops.colwise(x_RI, offs_E, E4M3)
            dw_EOI = ops.wgrad(dyq_OR, dys, xq_IR, xs, offs_E, ctx.w_dtype)
        return dx_RI, dw_EOI, None, None, None


def fp8_grouped_linear(x_RI, w_EOI, offs_E, use_triton=None):
    """Rows x[offs[e-1]:offs[e]] @ w[e].T in FP8 hybrid precision, differentiable w.r.t. x and w (dw in w's
    dtype: keep fp32 master weights). use_triton=None picks the kernels when the device supports FP8, else
    the PyTorch emulation of the same quantisation. Output dtype: the autocast dtype if on, else x's."""
    if x_RI.dim() != 2 or w_EOI.dim() != 3 or x_RI.size(1) != w_EOI.size(2) or offs_E.shape != (w_EOI.size(0),):
        raise ValueError(f"kernels.py fp8_grouped_linear: want x (R, I), w (E, O, I), offs (E,); got "
                         f"{tuple(x_RI.shape)}, {tuple(w_EOI.shape)}, {tuple(offs_E.shape)}")
    if offs_E.dtype != torch.int32:
        raise ValueError("kernels.py fp8_grouped_linear: offs_E must be int32 cumulative end offsets")
    if use_triton is None:
        use_triton = use_kernels(x_RI.device) and fp8_supported(x_RI.device)
    device_type = x_RI.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_RI.dtype
    ops = _TRITON_OPS if use_triton else _REF_OPS
    return _FP8GroupedLinear.apply(x_RI.contiguous(), w_EOI.contiguous(), offs_E, out_dtype, ops)


def fp8_grouped_linear_ref(x_RI, w_EOI, offs_E):
    """The PyTorch emulation of `fp8_grouped_linear` (same quantisation, same autograd)."""
    return fp8_grouped_linear(x_RI, w_EOI, offs_E, use_triton=False)


def fp8_linear(x, w, use_triton=None):
    """x (..., in) @ w.T for dense projections, w (out, in): the grouped path with one group."""
    x_RI = x.reshape(-1, x.size(-1))
    offs_E = torch.full((1,), x_RI.size(0), device=x.device, dtype=torch.int32)
    return fp8_grouped_linear(x_RI, w.unsqueeze(0), offs_E, use_triton).view(*x.shape[:-1], w.size(0))


# -----------------------------------------------------------------------------
# The LM head's log-probabilities without the (N, V) logits
#
# log p(t | h) = z_t - logsumexp_v z_v with z = h W^T. The plain path materialises the logits and then
# log_softmax and its backward read and write them several times: with V = 16K and N = 512 rows that is 32 MB per
# pass, most of a tiny model's step on a CPU, and 6 GB for mellum2-12b's micro-batch on a GPU. Here the vocabulary
# is walked in blocks small enough to stay in cache (HEAD_BLOCK logits): the forward keeps a running max and sum
# per row (online logsumexp) and picks z_t from the block that holds t; the backward recomputes each block's
# logits from h and the saved lse and forms d z = -g (softmax - onehot) there, as the plain path does (the
# one-hot is subtracted before any cast, so p_t ~ 1 loses nothing to cancellation). Cost: one extra matmul, except
# where the blocks' logits fit HEAD_KEEP_BYTES: then the forward keeps them for the backward. On a CPU with fp32
# matmuls the recomputing GEMM costs more than keeping (tiny's 512 rows x 16K: 32 MB; a tiny step 1.10-1.15x
# faster, bf16 matmuls about even, RESULTS.md); on a GPU the matmul is cheap and the memory is what the blocks save.

HEAD_BLOCK = {"cpu": 2 ** 19, "cuda": 2 ** 27}  # logits per vocabulary block: ~2 MB fp32 (a core's L2) on a CPU
HEAD_KEEP_BYTES = {"cpu": 2 ** 28, "cuda": 0}  # at most this many bytes of logits kept for the backward


_head_matmuls = torch.float32  # outside autocast; train.Compute.autocast sets bf16 where bf16_matmul_fast


@contextlib.contextmanager
def head_matmuls(dtype):
    """Run head_logprobs's matmuls in `dtype` when autocast is off (the softmax stays fp32). On a CPU with bf16
    matrix instructions (AMX, AVX512-BF16) the head's bf16 GEMMs run 2-4x fp32's rate, while bf16 autocast of the
    whole model is slower than fp32 there (oneDNN compiles a kernel for every new expert-group shape):
    train.Compute.autocast uses this instead."""
    global _head_matmuls
    old, _head_matmuls = _head_matmuls, dtype
    try:
        yield
    finally:
        _head_matmuls = old


def _head_dtype(device):
    """The matmul dtype: autocast's when it is on (as F.linear under autocast), else head_matmuls' (fp32)."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else _head_matmuls


def _head_blocks(t_N, V, block):
    """(first id, W rows, each row's target column in the block (clamped), whether the target is in it)."""
    for j in range(0, V, block):
        width = min(block, V - j)
        yield j, width, (t_N - j).clamp(0, width - 1)[:, None], ((t_N >= j) & (t_N < j + width))[:, None]


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, dtype, with_entropy):
        N, V = h_ND.size(0), w_VD.size(0)
        block = max(1, HEAD_BLOCK.get(h_ND.device.type, HEAD_BLOCK["cuda"]) // max(N, 1))
        hc = h_ND.to(dtype)
        # running max m, sum exp(z - m), sum exp(z - m) z; without the entropy m is the running logsumexp itself
        m = h_ND.new_full((N, 1), -math.inf, dtype=torch.float32)
        s, sz, z_t = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        keep = []  # the blocks' logits as the GEMMs return them, for the backward where they fit HEAD_KEEP_BYTES
        keeping = (any(ctx.needs_input_grad[:2])
                   and N * V * hc.element_size() <= HEAD_KEEP_BYTES.get(h_ND.device.type, 0))
        for j, width, col, inb in _head_blocks(t_N, V, block):
            z = hc @ w_VD[j:j + width].to(dtype).T
            if keeping:
                keep.append(z)
            z = z.float()
            z_t = torch.where(inb, z.gather(1, col), z_t)
            if not with_entropy:  # logsumexp fuses max, exp and sum: two passes over the block instead of four
                m = torch.logaddexp(m, torch.logsumexp(z, dim=1, keepdim=True))
                continue
            m_new = torch.maximum(m, z.amax(dim=1, keepdim=True))
            rescale = (m - m_new).exp()
            e = (z - m_new).exp_()
            s = s * rescale + e.sum(dim=1, keepdim=True)
            sz = sz * rescale + (e * z).sum(dim=1, keepdim=True)
            m = m_new
        lse = m + s.log() if with_entropy else m
        ctx.save_for_backward(h_ND, w_VD, t_N, lse)
        ctx.dtype, ctx.block, ctx.keep = dtype, block, keep
        entropy = (lse - sz / s)[:, 0] if with_entropy else torch.zeros_like(lse[:, 0])
        ctx.mark_non_differentiable(entropy)
        return (z_t - lse)[:, 0], entropy

    @staticmethod
    def backward(ctx, g_N, _):
        h_ND, w_VD, t_N, lse = ctx.saved_tensors
        dtype, block = ctx.dtype, ctx.block
        g = g_N.float()[:, None]
        # d logp / d z = onehot - softmax = -P: dh = -g * (P @ W), dW = P.T @ (-g * h); g scales the (N, D) side
        hc, hg = h_ND.to(dtype), (-g * h_ND.float()).to(dtype)
        dh = torch.zeros(h_ND.shape, dtype=torch.float32, device=h_ND.device)
        dw = torch.empty(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        for b, (j, width, col, inb) in enumerate(_head_blocks(t_N, w_VD.size(0), block)):
            w_j = w_VD[j:j + width].to(dtype)
            z = (ctx.keep[b] if ctx.keep else hc @ w_j.T).float()
            p = (z - lse).exp_()  # softmax of the block's logits
            p = p.scatter_add_(1, col, -inb.float()).to(dtype)  # softmax - onehot, formed before any cast
            dh += (p @ w_j).float()
            dw[j:j + width] = p.T @ hg
        return (-g * dh).to(h_ND.dtype), dw.to(w_VD.dtype), None, None, None


def head_logprobs(h_ND, w_VD, t_N, entropy=False):
    """(log softmax(h W^T)[t] per row, fp32 (N,); the rows' entropies (N,), no gradient, zeros unless asked) for
    hidden rows h (N, D), head weight W (V, D), token ids t (N,). Differentiable w.r.t. h and W; under autocast
    the matmuls run in its dtype, the softmax in fp32, as F.linear + float() + log_softmax would."""
    if h_ND.dim() != 2 or w_VD.dim() != 2 or h_ND.size(1) != w_VD.size(1) or t_N.shape != h_ND.shape[:1]:
        raise ValueError(f"kernels.py head_logprobs: want h (N, D), W (V, D), t (N,); got {tuple(h_ND.shape)}, "
                         f"{tuple(w_VD.shape)}, {tuple(t_N.shape)}")
    dtype = _head_dtype(h_ND.device)
    with torch.autocast(h_ND.device.type, enabled=False):  # every cast is explicit, in forward and backward
        return _HeadLogProbs.apply(h_ND, w_VD, t_N, dtype, entropy)


def head_logprobs_ref(h_ND, w_VD, t_N):
    """The plain path: all N x V logits, log_softmax, gather; and the entropies."""
    logp_NV = F.linear(h_ND, w_VD).float().log_softmax(dim=-1)
    return logp_NV.gather(1, t_N[:, None])[:, 0], -(logp_NV.exp() * logp_NV).sum(dim=-1).detach()


# -----------------------------------------------------------------------------
# CPU paths: plain PyTorch that beats model.py's general path at the shapes a CPU meets (decoding, long windows),
# computing the same thing. The thresholds are this project's CPU measurements (RESULTS.md, "The CPU pipeline").

def experts_path(rows, device, fp8=False):
    """How a MoE layer sends its `rows` (token, expert) pairs through their experts:
      "in_place"  each row through a copy of its expert's weights (experts_in_place): a CPU decoding a token or
                  two, where sorting and scattering the rows costs more than the copies;
      "padded"    sorted into one zero-padded block per expert, two batched GEMMs (experts_padded): a CPU decoding
                  a batch, where _grouped_mm's one GEMM call per expert costs more than the padding (1.7x at 32);
      "grouped"   sorted, one group per expert (model.grouped_linear): training, prefill, GPUs, FP8.
    Expert parallelism always sorts (model.MoE.dispatch_ep)."""
    if device.type != "cpu" or fp8:
        return "grouped"
    return "in_place" if rows <= 16 else "padded" if rows <= 2048 else "grouped"


def experts_in_place(x_RD, expert_R, gate_up_EFD, down_EDF):
    """Row r through SwiGLU expert expert_R[r] (rows in any order; gate_up [E, 2F, D] gate rows first, down
    [E, D, F]): one batched GEMM per projection over copies of the rows' experts (the layer 2x faster for one
    token)."""
    gate_RF, up_RF = torch.bmm(x_RD[:, None], gate_up_EFD.index_select(0, expert_R).mT)[:, 0].chunk(2, dim=-1)
    return torch.bmm((F.silu(gate_RF) * up_RF)[:, None], down_EDF.index_select(0, expert_R).mT)[:, 0]


def experts_padded(x_RD, count_E, gate_up_EFD, down_EDF):
    """The experts of rows sorted by expert, count_E[e] of expert e, through one zero-padded block per expert:
    two batched GEMMs over all experts, where _grouped_mm on a CPU makes one GEMM call per expert."""
    E, cap, D = len(count_E), int(count_E.max()), x_RD.size(-1)
    first_E = count_E.cumsum(0) - count_E  # each expert's first row
    # row r, the j-th of expert e's rows, goes to slot e * cap + j of the padded blocks
    slot_R = torch.arange(len(x_RD), device=x_RD.device) + torch.repeat_interleave(
        torch.arange(E, device=x_RD.device) * cap - first_E, count_E)
    x_ECD = x_RD.new_zeros(E * cap, D).index_copy(0, slot_R, x_RD).view(E, cap, D)
    gate_ECF, up_ECF = torch.bmm(x_ECD, gate_up_EFD.mT).chunk(2, dim=-1)
    y_ECD = torch.bmm(F.silu(gate_ECF) * up_ECF, down_EDF.mT)
    return y_ECD.view(E * cap, D).index_select(0, slot_R)


def attends_in_blocks(T, window):
    """Whether attention over T of its own positions with a window runs in blocks (sliding_window_attention)
    rather than through a dense (T, T) mask: where the mask would waste most of its pairs."""
    return window is not None and T > 4 * window


def sliding_window_attention(q, k, v, window):
    """Causal sliding-window attention with GQA (q (B, H, T, hd); k, v (B, K, T, hd)) in blocks of W queries:
    block i sees only keys (i-1)W .. (i+1)W - 1, the one block before it and its own, so it computes T x 2W
    query-key pairs where a dense mask computes T x T."""
    B, H, T, hd = q.shape
    W, n = window, -(-T // window)
    qb = F.pad(q, (0, 0, 0, n * W - T)).unflatten(2, (n, W)).transpose(1, 2)  # (B, n, H, W, hd); pad rows dropped

    def key_blocks(t):  # (B, K, T, hd) -> (B, n, K, 2W, hd): W empty slots in front, so block 0 has a "previous"
        return F.pad(t, (0, 0, W, n * W - T)).unfold(2, 2 * W, W).permute(0, 2, 1, 4, 3)

    # in its block's 2W keys, query j sits at W + j and sees slots j+1 .. W+j; block 0's first W slots are empty
    qp, kp = torch.arange(W, 2 * W, device=q.device)[:, None], torch.arange(2 * W, device=q.device)
    rest = (kp <= qp) & (kp > qp - W)
    mask = torch.stack([rest & (kp >= W)] + [rest] * (n - 1))[:, None]  # (n, 1, W, 2W)
    y = F.scaled_dot_product_attention(qb, key_blocks(k), key_blocks(v), attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2).flatten(2, 3)[:, :, :T]


# -----------------------------------------------------------------------------
# Benchmark (GPU): python kernels.py --bench

def _attention_pairs(T, window):
    """Number of (query, key) pairs a causal (window=None) or sliding attention computes."""
    if window is None:
        return T * (T + 1) // 2
    W = min(window, T)
    return W * (W + 1) // 2 + (T - W) * W


def _bench_fwd_bwd(fn, *inputs):
    from triton.testing import do_bench
    out = fn(*inputs)
    grad = torch.randn_like(out)

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return do_bench(step, warmup=25, rep=100)


def bench():
    if not torch.cuda.is_available():
        print("no CUDA device: benchmark needs a GPU")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    B, H, K, hd, W = 1, 32, 4, 128, 1024  # mellum2-12b attention
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except ImportError:
        flex = None
    print("attention fwd+bwd, mellum2-12b heads (B=1, H=32, K=4, hd=128), bf16; TFLOP/s counts visited pairs")
    for T in (4096, 8192, 16384, 32768):
        q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, K, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        k_rep, v_rep = (t.detach().repeat_interleave(H // K, 1).requires_grad_() for t in (k, v))
        times = {}
        times["ours causal"] = _bench_fwd_bwd(lambda q, k, v: flash_attention(q, k, v), q, k, v)
        times["ours sliding"] = _bench_fwd_bwd(lambda q, k, v: flash_attention(q, k, v, window=W), q, k, v)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            times["sdpa causal"] = _bench_fwd_bwd(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k_rep, v_rep)
        if flex is not None:
            mask = create_block_mask(lambda b, h, i, j: (j <= i) & (j > i - W), None, None, T, T)
            times["flex sliding"] = _bench_fwd_bwd(
                lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=True), q, k, v)
        for name, ms in times.items():
            flops = 3.5 * 4 * B * H * hd * _attention_pairs(T, W if "sliding" in name else None)  # bwd = 2.5x fwd
            print(f"  T={T:6d} {name:13s} {ms:8.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s")
        print(f"  T={T:6d} sliding speed-up over causal {times['ours causal'] / times['ours sliding']:.2f}x "
              f"(target >= 3 at 8K); causal vs SDPA flash {times['sdpa causal'] / times['ours causal']:.2f}x "
              f"(target >= 0.8)")
    D, Fe, E, topk, tokens = 2304, 896, 64, 8, 8192  # mellum2-12b experts
    R = tokens * topk
    print(f"FP8 grouped GEMM fwd+bwd, {tokens} tokens x top-{topk} = {R} rows over {E} experts "
          "(fp32 master weights; bf16 = cast + torch._grouped_mm)")
    counts_E = torch.bincount(torch.randint(0, E, (R,), device="cuda"), minlength=E)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    for name, (O, I) in {"gate_up": (2 * Fe, D), "down": (D, Fe)}.items():
        x = torch.randn(R, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(E, O, I, device="cuda") * I ** -0.5).requires_grad_()
        ms_bf16 = _bench_fwd_bwd(lambda x, w: torch._grouped_mm(x, w.bfloat16().transpose(-2, -1), offs=offs_E), x, w)
        ms_fp8 = _bench_fwd_bwd(lambda x, w: fp8_grouped_linear(x, w, offs_E), x, w)
        flops = 3 * 2 * R * O * I
        print(f"  {name:8s} bf16 {ms_bf16:7.2f} ms ({flops / ms_bf16 / 1e9:5.0f} TFLOP/s)  fp8 {ms_fp8:7.2f} ms "
              f"({flops / ms_fp8 / 1e9:5.0f} TFLOP/s)  speed-up {ms_bf16 / ms_fp8:.2f}x (target >= 1.3)")


def bench_moe(tokens=4096, D=128, E=64, K=8, F_=64, repeats=5):
    """MoE expert dispatch, forward + backward on this device's default (CPU) path: the per-expert Python loop over
    one-hot masks of transformers' reference implementation against model.MoE's dispatch (sort the T*K (token,
    expert) pairs by expert, two torch._grouped_mm calls). Same router, same weights. `python kernels.py --bench-moe`
    (the defaults are tiny's shapes)."""
    import time
    torch.manual_seed(0)
    x_TD = torch.randn(tokens, D, requires_grad=True)
    gate_ED = (0.02 * torch.randn(E, D)).requires_grad_()
    gate_up_EOD = (0.02 * torch.randn(E, 2 * F_, D)).requires_grad_()
    down_EDF = (0.02 * torch.randn(E, D, F_)).requires_grad_()

    def route(x_TD):
        w_TK, i_TK = F.linear(x_TD, gate_ED).float().softmax(-1).topk(K, dim=-1)
        return w_TK / w_TK.sum(-1, keepdim=True), i_TK

    def loop(x_TD):
        w_TK, i_TK = route(x_TD)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(i_TK, E).permute(2, 1, 0)
        for e in range(E):
            k_pos, tok = torch.where(mask_EKT[e])
            gate, up = F.linear(x_TD[tok], gate_up_EOD[e]).chunk(2, -1)
            out_TD = out_TD.index_add(0, tok, F.linear(F.silu(gate) * up, down_EDF[e]) * w_TK[tok, k_pos, None])
        return out_TD

    def grouped(x_TD):
        w_TK, i_TK = route(x_TD)
        order_R = i_TK.reshape(-1).argsort(stable=True)
        token_R = order_R // K
        offs_E = torch.bincount(i_TK.reshape(-1), minlength=E).cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x_TD[token_R], gate_up_EOD.transpose(-2, -1), offs=offs_E).chunk(2, -1)
        y_RD = torch._grouped_mm(F.silu(gate) * up, down_EDF.transpose(-2, -1), offs=offs_E)
        return torch.zeros_like(x_TD).index_add(0, token_R, y_RD * w_TK.reshape(-1)[order_R, None])

    torch.testing.assert_close(grouped(x_TD), loop(x_TD), rtol=1e-4, atol=1e-6)  # the same function

    def timeit(fn):
        fn(x_TD).sum().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x_TD).sum().backward()
        return (time.perf_counter() - t0) / repeats

    t_loop, t_grouped = timeit(loop), timeit(grouped)
    print(f"MoE layer fwd+bwd, {tokens} tokens, D={D}, E={E} top-{K}, F={F_}, {torch.get_num_threads()} threads: "
          f"per-expert loop {t_loop * 1e3:.1f} ms, grouped {t_grouped * 1e3:.1f} ms, "
          f"speed-up {t_loop / t_grouped:.2f}x")
    return t_loop, t_grouped


def bench_head(rows=(368, 512, 1024), V=16_384, D=128, pairs=15):
    """kernels.head_logprobs forward + backward with the blocks' logits kept for the backward against recomputed
    (HEAD_KEEP_BYTES at its default against 0), interleaved pair by pair on this machine, fp32 matmuls and, where
    the CPU has them fast, bf16 ones: the median of the pairs' ratios. The defaults are tiny's head at SFT's target
    rows, pre-training's micro-batch and the transformers benchmark's step. `python kernels.py --bench-head`."""
    import time
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep = HEAD_KEEP_BYTES.get(device.type, 0)
    gen = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(V, D, generator=gen)).to(device).requires_grad_()
    dtypes = [torch.float32, torch.bfloat16] if bf16_matmul_fast(device) else [torch.float32]
    print(f"head_logprobs forward + backward, V={V}, D={D}, {device}, {torch.get_num_threads()} threads, "
          f"{pairs} interleaved pairs: recomputing the logits / keeping them (HEAD_KEEP_BYTES {keep:,})")
    for N in rows:
        h = torch.randn(N, D, generator=gen).to(device).requires_grad_()
        t = torch.randint(0, V, (N,), generator=gen).to(device)
        for dtype in dtypes:
            def run(budget):
                HEAD_KEEP_BYTES[device.type] = budget
                t0 = time.perf_counter()
                with head_matmuls(dtype):
                    head_logprobs(h, w, t)[0].sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0
            try:
                run(0), run(keep)  # warm-up
                times = [(run(0), run(keep)) for _ in range(pairs)]
            finally:
                HEAD_KEEP_BYTES[device.type] = keep
            ratio = sorted(a / b for a, b in times)[pairs // 2]
            recompute, kept = (sorted(x)[pairs // 2] * 1e3 for x in zip(*times))
            print(f"  {N:5d} rows, {str(dtype)[6:]:8s} recompute {recompute:7.1f} ms   keep {kept:7.1f} ms   "
                  f"speed-up {ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="nanoMellum Triton kernels")
    parser.add_argument("--bench", action="store_true", help="time the kernels on a GPU against PyTorch")
    parser.add_argument("--bench-moe", action="store_true", help="time the grouped MoE dispatch against a "
                        "per-expert loop (CPU or GPU)")
    parser.add_argument("--bench-head", action="store_true", help="time the LM head's backward keeping its "
                        "logits against recomputing them")
    cli = parser.parse_args()
    if cli.bench:
        bench()
    elif cli.bench_moe:
        bench_moe()
    elif cli.bench_head:
        bench_head()
    else:
        parser.print_help()
