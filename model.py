"""
The Mellum 2 architecture (arXiv 2605.31268) in one file.

Contents, top to bottom:
  Config + PRESETS        one dataclass; defaults are the CPU-sized `tiny` model
  RoPE (+ YaRN)           per-layer-type frequencies: theta 500k on both types, YaRN on full layers only
  dispatch                the one place that picks Triton / FP8 / plain PyTorch (linear, grouped GEMM, attention)
  Attention               GQA, QK-norm before RoPE, causal or sliding-window
  MoE                     fp32-softmax router, top-k, renormalised; experts as 3-D tensors, grouped GEMM;
                          expert parallelism (all_to_all dispatch) when shard_experts() gave it a process group
  router losses           global-batch Switch balancing loss (counts over the step's micro-batches and ranks), z-loss
  DecoderLayer, MTP       pre-norm blocks; DeepSeek-V3-style multi-token prediction module
  KVCache                 full layers grow, sliding layers keep a ring of `window + slack` positions; rows may be
                          left-padded (pad) and selected or repeated (select) for batched generation
  Mellum                  forward (logits + loss parts), decoding helpers, HF-format load/save
  summary / bench         `python model.py --preset NAME` and `python model.py --bench`

Parameter names are those of Hugging Face's `MellumForCausalLM`, so released checkpoints load with no mapping
table; the MTP module lives under `mtp.*` (which transformers ignores).

Footguns:
- Sliding window W means query i sees keys i-W < j <= i: W keys including itself (transformers' convention).
- forward returns the loss parts unweighted: ce and mtp are target sums divided by `norm` (default: this batch's
  own target counts, i.e. a mean), aux and z are sums over the MoE layers. The caller weights them
  (pretrain.forward_backward: mtp 0.1, aux 1e-3, z 1e-3 as in the report).
- After `reset_router_counts()`, the balancing loss of each training forward takes its expert shares from the
  counts of all training forwards since (all-reduced over ranks when torch.distributed is initialised): a loop
  that calls it must call it at the start of *every* optimizer step (pretrain.forward_backward does), and every
  rank must run the same forwards. Without it, each forward uses its own local counts.
- The MTP head sees the *normalised* final hidden state at t and the embedding of token t+1, and predicts t+2.
- `torch._grouped_mm` wants int32 cumulative *end* offsets, one per expert; empty experts are fine.
- Under expert parallelism a layer's `experts` holds only this rank's slice (`experts.first` onward): its
  state_dict() is not the whole layer. pretrain.py's checkpoints put the slices back together.
- init_weights() draws every matrix (every expert) from its own seeded generator: same seed, same weights,
  whatever the sharding, but not the values of a single global stream.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

import kernels

# -----------------------------------------------------------------------------
# Config and presets

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class Config:
    # The defaults are the `tiny` preset: trains visibly in minutes on two CPU cores.
    vocab_size: int = 16_384  # the first 16,256 cl100k_base ranks + specials (data.tokenizer_for_vocab): on a CPU
    # the LM head of the full 100k vocabulary would cost more than the rest of the tiny model
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    layer_types: list = None  # per layer FULL / SLIDING; None -> sliding, sliding, sliding, full, repeated
    sliding_window: int = 64
    rope_parameters: dict = None  # per layer type, Hugging Face layout; None -> theta 500k on both types
    max_position_embeddings: int = 256  # the context the model is trained at (YaRN records the original one)
    rms_norm_eps: float = 1e-6
    mlp_layer_types: list = None  # per layer "sparse" / "dense"; None -> all sparse
    intermediate_size: int = 512  # dense MLP hidden
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 64
    router_aux_loss_coef: float = 0.001  # recorded for config.json; the training loss takes its own coefficients
    num_mtp_layers: int = 1  # 0 or 1
    initializer_range: float = 0.02

    def __post_init__(self):
        L = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 4 == 0 else SLIDING for i in range(L)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * L
        if self.rope_parameters is None:  # the released config.json: 500k on both (transformers' class default of
            # 10k for sliding layers is not Mellum 2's); kept per type so YaRN can go to the full layers alone
            self.rope_parameters = {lt: {"rope_type": "default", "rope_theta": 500_000.0} for lt in (FULL, SLIDING)}
        checks = [
            (len(self.layer_types) == L, f"layer_types has {len(self.layer_types)} entries, num_hidden_layers={L}"),
            (set(self.layer_types) <= {FULL, SLIDING}, f"layer_types must be '{FULL}' or '{SLIDING}'"),
            (len(self.mlp_layer_types) == L, f"mlp_layer_types has {len(self.mlp_layer_types)} entries, layers={L}"),
            (set(self.mlp_layer_types) <= {"sparse", "dense"}, "mlp_layer_types must be 'sparse' or 'dense'"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} must be a multiple of "
             f"num_key_value_heads={self.num_key_value_heads} (GQA)"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE"),
            (1 <= self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"),
            (self.num_mtp_layers in (0, 1), f"num_mtp_layers={self.num_mtp_layers}: Mellum has 0 or 1 MTP module"),
            (self.sliding_window >= 1, f"sliding_window={self.sliding_window} must be >= 1"),
            (all(t in self.rope_parameters for t in set(self.layer_types)),
             f"rope_parameters needs an entry per layer type, has {sorted(self.rope_parameters)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"Config: {msg}")

    # Hugging Face config.json <-> Config. Field names already match, except MTP's.
    def to_hf(self):
        d = asdict(self)
        d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if self.num_mtp_layers:
            d["mtp_layer_types"], d["mtp_mlp_layer_types"] = [SLIDING], ["sparse"]
        return dict(model_type="mellum", architectures=["MellumForCausalLM"], hidden_act="silu",
                    tie_word_embeddings=False, attention_bias=False, norm_topk_prob=True, **d)

    @classmethod
    def from_hf(cls, d, source="config.json"):
        if d.get("model_type") != "mellum":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'mellum' "
                             "(this is not a Mellum checkpoint)")
        for key, want in [("hidden_act", "silu"), ("tie_word_embeddings", False), ("attention_bias", False),
                          ("norm_topk_prob", True)]:
            if d.get(key, want) != want:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (nanoMellum implements {want!r})")
        d = dict(d)
        d["num_mtp_layers"] = d.get("num_nextn_predict_layers") or d.get("num_mtp_layers") or 0
        d.setdefault("num_experts", d.get("num_local_experts"))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


PRESETS = {
    # The published configuration: 12.15B total, ~2.44B active per token (MTP extra).
    "mellum2-12b": dict(vocab_size=98_304, hidden_size=2304, num_hidden_layers=28, num_attention_heads=32,
                        num_key_value_heads=4, head_dim=128, sliding_window=1024, max_position_embeddings=8192,
                        intermediate_size=7168, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=896),
    # ~1.05B total / ~0.35B active: fp32 master weights + grads + Muon/AdamW state ~14 GB, fits one 24 GB card.
    "mellum2-1b": dict(vocab_size=100_352, hidden_size=1024, num_hidden_layers=16, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=128, sliding_window=1024, max_position_embeddings=4096,
                       intermediate_size=2816, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512),
    "tiny": {},
    # For tests: a few thousand parameters per layer, tiny vocabulary.
    "test": dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, sliding_window=8, max_position_embeddings=64, intermediate_size=96, num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=32),
}


def get_config(preset="tiny", **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[preset], **overrides})


_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "layer_types", "sliding_window", "num_experts", "num_experts_per_tok", "moe_intermediate_size")


def preset_of(config):
    """The preset whose architecture `config` has, or None. Vocabulary, context and RoPE are aside: a checkpoint keeps
    its preset through a cut tokenizer, an extension or SFT at a longer context. Later stages pick their recipe by it."""
    return next((name for name in PRESETS if all(getattr(config, a) == getattr(get_config(name), a)
                                                 for a in _ARCHITECTURE)), None)


# -----------------------------------------------------------------------------
# RoPE with per-layer-type parameters, and YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071)

def rope_frequencies(head_dim, params):
    """Inverse frequencies (head_dim/2,) and the attention scaling applied to cos/sin, for one layer type."""
    base = params["rope_theta"]
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if params.get("rope_type", "default") == "default":
        return inv_freq.float(), 1.0
    if params["rope_type"] != "yarn":
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported (use 'default' or 'yarn')")
    # YaRN: dimensions that rotate fewer than beta_slow times over the original context are interpolated
    # (frequency / s), those that rotate more than beta_fast times are kept (extrapolated), a linear ramp between.
    s, orig_ctx = params["factor"], params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast", 32.0), params.get("beta_slow", 1.0)

    def dim_of(rotations):  # the dimension index whose wavelength fits `rotations` times into orig_ctx
        return head_dim * math.log(orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
    mscale = params.get("attention_factor") or (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    return inv_freq.float(), mscale


@functools.lru_cache(maxsize=64)  # keyed by value, so a config changed by extend.py gets its own entry
def _rope_frequencies_cached(head_dim, params):
    return rope_frequencies(head_dim, dict(params))


def rope_cos_sin(config, layer_type, pos, dtype):
    """cos, sin of shape (T, head_dim) for integer positions `pos` (T,), rotate-half layout."""
    params = tuple(sorted(config.rope_parameters[layer_type].items()))
    inv_freq, scale = _rope_frequencies_cached(config.head_dim, params)
    freqs = pos.float()[:, None] * inv_freq.to(pos.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):  # x (B, nh, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -----------------------------------------------------------------------------
# Dispatch: the one place that decides Triton kernels / FP8 / plain PyTorch.
# kernels.ENABLED = False forces the PyTorch path everywhere (tests flip it).

def linear(x, weight, fp8=False):
    if fp8:
        return kernels.fp8_linear(x, weight)
    return F.linear(x, weight)


def grouped_linear(x_RI, w_EOI, offs_E, fp8=False):
    """Rows of x grouped by expert (offs_E: int32 cumulative ends); rows of group e are multiplied by w[e].T."""
    if fp8:
        return kernels.fp8_grouped_linear(x_RI, w_EOI, offs_E)
    if torch.is_autocast_enabled(x_RI.device.type):  # _grouped_mm has no autocast rule: cast by hand
        dtype = torch.get_autocast_dtype(x_RI.device.type)
        x_RI, w_EOI = x_RI.to(dtype), w_EOI.to(dtype)
    return torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs_E)


def attention(q, k, v, window, q_pos=None, k_pos=None, pad=None):
    """Causal (window=None) or sliding-window attention with GQA. q (B, H, T, hd); k, v (B, K, S, hd).
    q_pos (T,) / k_pos (S,) are absolute positions, given when decoding from a cache (k_pos < 0: empty slot).
    pad (B,): row b's first pad[b] positions are left padding, hidden from every query but their own (a query
    that saw no key at all would turn into NaN and poison the padding's keys in the next layer)."""
    if q_pos is None:
        if kernels.use_kernels(q.device):
            return kernels.flash_attention(q, k, v, window=window)
        T = q.size(2)
        if window is None or window >= T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        q_pos = k_pos = torch.arange(T, device=q.device)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    if pad is not None:  # (T, S) -> (B, 1, T, S)
        allowed = (allowed & (k_pos >= pad[:, None, None])) | (k_pos[None, :] == q_pos[:, None])
        allowed = allowed[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, like the reference implementation
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear without bias whose matmul can switch to the FP8 path (`fp8 = True`)."""
    fp8 = False

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight, self.fp8)


class Attention(nn.Module):
    def __init__(self, config, layer_type):
        super().__init__()
        self.config, self.layer_type = config, layer_type
        D, H, K, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj = Linear(D, H * hd), Linear(D, K * hd), Linear(D, K * hd)
        self.o_proj = Linear(H * hd, D)
        self.q_norm, self.k_norm = RMSNorm(hd, config.rms_norm_eps), RMSNorm(hd, config.rms_norm_eps)
        self.window = config.sliding_window if layer_type == SLIDING else None

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        hd = self.config.head_dim
        # QK-norm over head_dim before RoPE keeps attention logits bounded (Qwen3 / Mellum)
        q = self.q_norm(self.q_proj(x).view(B, T, -1, hd)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, hd)).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = attention(q, k, v, self.window)
        else:
            k, v, k_pos = cache.update(k, v)
            q_pos = torch.arange(cache.pos, cache.pos + T, device=x.device)
            y = attention(q, k, v, self.window, q_pos, k_pos, cache.pad)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # dense SwiGLU
    def __init__(self, config):
        super().__init__()
        D, Fd = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = Linear(D, Fd), Linear(D, Fd), Linear(Fd, D)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Shape suffixes in the MoE: T tokens, D hidden, E experts, K top-k, F expert hidden, R = T*K routed rows.

class Experts(nn.Module):
    """Experts first .. first+count-1 of a layer's E SwiGLU experts as 3-D tensors: gate_up [count, 2F, D] (gate
    rows first), down [count, D, F]. One process holds all E (first=0); expert parallelism a slice per rank."""
    fp8 = False

    def __init__(self, config, first=0, count=None):
        super().__init__()
        count = config.num_experts if count is None else count
        D, Fe = config.hidden_size, config.moe_intermediate_size
        self.first = first  # global index of expert 0 here: init_weights draws each expert from its own seed
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * Fe, D))
        self.down_proj = nn.Parameter(torch.empty(count, D, Fe))

    def forward(self, x_RD, offs_E):
        gate_RF, up_RF = grouped_linear(x_RD, self.gate_up_proj, offs_E, self.fp8).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate_RF) * up_RF, self.down_proj, offs_E, self.fp8)


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k, self.num_experts = config.num_experts_per_tok, config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # router, kept in high precision
        self.experts = Experts(config)
        # router statistics of the last forward, turned into the balancing losses by Mellum.router_losses
        self.count_E = self.probs_E = self.z = None
        self.step_count_E = None  # counts summed over the step's micro-batches and ranks (after a reset)
        self.load = None  # the counts the balancing loss used (E,), for logging
        self.ep_group = None  # expert parallelism: the process group whose ranks hold a slice of experts each

    def shard_experts(self, group):
        """Keep only this rank's E / ep experts (expert parallelism over `group`); call on the meta device,
        before materialising. Tokens then travel to their experts' rank and back (dispatch_ep)."""
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.num_experts % ep:
            raise ValueError(f"expert parallelism: num_experts={self.num_experts} is not divisible by the EP group "
                             f"size {ep}; choose --ep among the divisors of num_experts")
        E_local = self.num_experts // ep
        with torch.device(self.gate.weight.device):
            self.experts = Experts(self.config, first=rank * E_local, count=E_local)
        self.ep_group = group

    def forward(self, x):
        B, T, D = x.shape
        x_TD = x.reshape(-1, D)
        with torch.autocast(x.device.type, enabled=False):  # the router and its losses in fp32 (Mellum 2 report)
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        topw_TK, topi_TK = probs_TE.topk(self.top_k, dim=-1)
        topw_TK = topw_TK / topw_TK.sum(dim=-1, keepdim=True)

        # Dispatch: sort the T*K (token, expert) pairs by expert so each expert sees one contiguous block of rows.
        expert_R = topi_TK.reshape(-1)
        order_R = expert_R.argsort(stable=True)
        token_R = order_R // self.top_k
        count_E = torch.bincount(expert_R, minlength=self.num_experts)
        if self.ep_group is None:
            y_RD = self.experts(x_TD[token_R], count_E.cumsum(0).to(torch.int32))
        else:
            y_RD = self.dispatch_ep(x_TD[token_R], count_E)
        y_RD = y_RD * topw_TK.reshape(-1)[order_R, None].to(y_RD.dtype)
        out_TD = torch.zeros_like(x_TD, dtype=y_RD.dtype).index_add_(0, token_R, y_RD)

        # Router statistics: every routed position counts, padding included (it takes expert slots like any token).
        # z-loss (ST-MoE, https://arxiv.org/abs/2202.08906): mean over tokens of logsumexp(logits)^2, which keeps
        # router logits small. The micro-batches of a step have equal token counts, so the mean of their means is
        # the step's token mean.
        self.count_E, self.probs_E = count_E, probs_TE.mean(dim=0)
        self.z = torch.logsumexp(logits_TE, dim=-1).square().mean()
        return out_TD.view(B, T, D).to(x.dtype)

    def dispatch_ep(self, x_RD, count_E):
        """Expert parallelism (GShard, https://arxiv.org/abs/2006.16668): rows sorted by global expert are already
        grouped by the rank that owns the expert; all_to_all sends each block there, the local experts run as one
        grouped GEMM, and a second all_to_all brings the results back in the original order. Each all_to_all's
        backward is the reverse all_to_all (_AllToAll), so gradients reach the sending rank's router and the
        receiving rank's experts. S = rows this rank receives."""
        ep, E_local = dist.get_world_size(self.ep_group), self.experts.gate_up_proj.size(0)
        count_PL = count_E.view(ep, E_local)  # P ranks x L local experts each
        recv_PL = torch.empty_like(count_PL)  # rows each rank sends to each of this rank's experts
        dist.all_to_all_single(recv_PL, count_PL, group=self.ep_group)
        send_splits, recv_splits = count_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_SD = _AllToAll.apply(x_RD, recv_splits, send_splits, self.ep_group)
        # received rows are ordered (source rank, local expert): regroup them by local expert for the GEMM
        expert_S = torch.repeat_interleave(torch.arange(E_local, device=x_RD.device).repeat(ep), recv_PL.flatten())
        order_S = expert_S.argsort(stable=True)
        y_SD = self.experts(x_SD[order_S], recv_PL.sum(0).cumsum(0).to(torch.int32))[order_S.argsort()]
        return _AllToAll.apply(y_SD, send_splits, recv_splits, self.ep_group)


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single on rows (out_splits rows arrive from each rank, in_splits leave to each), with the
    reverse exchange as its backward: each row's gradient goes back to the rank the row came from. (Our own
    Function: torch.distributed.nn.functional's is deprecated in torch 2.13.)"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_type, mlp_type):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if mlp_type == "sparse" else MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MellumModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, lt, mt)
                                    for lt, mt in zip(config.layer_types, config.mlp_layer_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTP(nn.Module):
    """Multi-token prediction (DeepSeek-V3, https://arxiv.org/abs/2412.19437 sec. 2.2): predicts token t+2 from
    the final hidden state at t and the embedding of token t+1, through one sliding-attention MoE block.
    Embedding and LM head are shared with the main model."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.enorm, self.hnorm = RMSNorm(D, config.rms_norm_eps), RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(config, SLIDING, "sparse")])
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def forward(self, h, emb_next, cos, sin, cache=None):
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1))
        return self.norm(self.layers[0](x, cos, sin, cache))


# -----------------------------------------------------------------------------
# KV cache

class LayerCache:
    """K/V of one attention layer. Full layers: a buffer of `capacity` positions. Sliding layers: a ring of
    `window + slack` slots; position p lives in slot p % size. The slack lets speculative decoding rewind a few
    rejected positions without losing keys still inside the window."""

    def __init__(self, B, K, hd, size, ring, device, dtype):
        self.k = torch.zeros(B, K, size, hd, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.size, self.ring = size, ring

    def update(self, pos, k_new, v_new):
        """Store positions pos..pos+T-1; return the keys/values/positions attention should see."""
        T, dev = k_new.size(2), k_new.device
        if not self.ring:
            if pos + T > self.size:
                raise ValueError(f"KV cache full: {pos + T} positions > capacity {self.size}")
            self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k_new, v_new
            return self.k[:, :, :pos + T], self.v[:, :, :pos + T], torch.arange(pos + T, device=dev)
        # ring: attend over (cached slots) + (new keys), then keep the newest `size` positions
        slot = torch.arange(self.size, device=dev)
        old_pos = pos - 1 - (pos - 1 - slot) % self.size  # newest position < pos stored in each slot
        old_pos = torch.where(old_pos >= 0, old_pos, -1)
        k_all, v_all = torch.cat([self.k, k_new], dim=2), torch.cat([self.v, v_new], dim=2)
        k_pos = torch.cat([old_pos, torch.arange(pos, pos + T, device=dev)])
        keep = min(T, self.size)
        idx = torch.arange(pos + T - keep, pos + T, device=dev) % self.size
        self.k[:, :, idx], self.v[:, :, idx] = k_new[:, :, T - keep:], v_new[:, :, T - keep:]
        return k_all, v_all, k_pos


class KVCache:
    """Per-layer caches plus the shared position counter. `mtp` is a separate cache for the MTP block.
    pad (B,) long: rows of different lengths are left-padded, row b by pad[b] slots, which attention masks out.
    Row b's tokens then sit pad[b] positions later than alone; RoPE needs no per-row positions because attention
    scores depend only on the distance between query and key (RoFormer, https://arxiv.org/abs/2104.09864), and
    the sliding window is a distance too."""

    def __init__(self, config, batch_size, capacity, device="cpu", dtype=torch.float32, slack=4, layer_types=None,
                 pad=None):
        K, hd = config.num_key_value_heads, config.head_dim
        ring_size = config.sliding_window + slack

        def make(lt):
            ring = lt == SLIDING and ring_size < capacity
            return LayerCache(batch_size, K, hd, ring_size if ring else capacity, ring, device, dtype)

        self.layers = [make(lt) for lt in (layer_types or config.layer_types)]
        self.pos, self.layer = 0, 0
        self.pad = pad
        self.mtp = None
        if layer_types is None and config.num_mtp_layers:
            self.mtp = KVCache(config, batch_size, capacity, device, dtype, slack, layer_types=[SLIDING], pad=pad)

    def select(self, rows):
        """Keep (or repeat) batch rows: rows (R,) indexes the current rows. Shares a prefill among samples of one
        prompt (rows = arange(P).repeat_interleave(G)) and drops finished rows."""
        for c in self.layers:
            c.k, c.v = c.k[rows], c.v[rows]
        if self.pad is not None:
            self.pad = self.pad[rows]
        if self.mtp is not None:
            self.mtp.select(rows)

    def update(self, k, v):  # called by each attention layer in order during one forward
        out = self.layers[self.layer].update(self.pos, k, v)
        self.layer += 1
        return out

    def advance(self, T):
        self.pos, self.layer = self.pos + T, 0

    def rewind(self, n):
        """Forget the last n positions (rejected speculative tokens). Ring slots keep `slack` spare positions."""
        self.pos -= n

    def nbytes(self):
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers) + (self.mtp.nbytes() if self.mtp else 0)


# -----------------------------------------------------------------------------
# The model

def _generator(*key):
    """A CPU generator seeded by a stable hash of `key` (Python's hash() of a str changes between processes)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Mellum(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = MellumModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTP(config) if config.num_mtp_layers else None

    @torch.no_grad()
    def init_weights(self, seed=None):
        """Normal(0, initializer_range) for every matrix, ones for norms (as the reference implementation).
        Our choice of random streams: every matrix, and every expert of a 3-D stack, draws from its own generator
        seeded by (seed, name[, global expert index]). So a rank that holds an FSDP2 shard or an EP slice of
        experts (pretrain.build_model materialises it from the meta device) computes exactly the values the
        one-process model has there, generating at most one matrix (one rank's experts) at a time.
        seed=None draws the seed from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        std = self.config.initializer_range
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                full = torch.empty(p.shape)  # the one temporary: this parameter (this rank's experts), whole
                if p.dim() == 1:
                    full.fill_(1.0)
                elif isinstance(mod, Experts):
                    for e in range(p.size(0)):
                        full[e].normal_(0, std, generator=_generator(seed, name, mod.first + e))
                else:
                    full.normal_(0, std, generator=_generator(seed, name))
                if isinstance(p, DTensor):  # keep this rank's shard: slicing only, no communication
                    full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(full.to_local())
                else:
                    p.copy_(full)
        return self

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_fp8(self, enabled=True):
        """FP8 GEMMs for attention projections, dense MLPs and experts; embeddings, head, router, norms,
        and the MTP projection stay in higher precision."""
        for m in self.modules():
            if isinstance(m, (Linear, Experts)):
                m.fp8 = enabled

    def _cos_sin(self, T, start, device, dtype, layer_types):
        pos = torch.arange(start, start + T, device=device)
        return {lt: rope_cos_sin(self.config, lt, pos, dtype) for lt in layer_types}

    def hidden(self, idx, cache=None):
        """Final (normalised) hidden states (B, T, D) of the main model."""
        x = self.model.embed_tokens(idx)
        start = cache.pos if cache else 0
        rope = self._cos_sin(idx.size(1), start, idx.device, x.dtype, set(self.config.layer_types))
        for layer, lt in zip(self.model.layers, self.config.layer_types):
            x = layer(x, *rope[lt], cache)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.model.norm(x)

    def mtp_hidden(self, h, next_idx, cache=None):
        """MTP hidden states: h (B, T, D) at positions t, next_idx (B, T) the tokens at t+1."""
        mcache = cache.mtp if cache is not None else None
        start = mcache.pos if mcache else 0
        rope = self._cos_sin(h.size(1), start, h.device, h.dtype, [SLIDING])
        out = self.mtp(h, self.model.embed_tokens(next_idx), *rope[SLIDING], mcache)
        if mcache is not None:
            mcache.advance(h.size(1))
        return out

    def forward(self, idx, targets=None, cache=None, norm=None, at=None):
        """idx (B, T) -> logits (B, T, V), or (N, V) at the N True positions of the bool mask `at` (B, T); with
        targets (B, T): (None, the unweighted loss parts {ce, mtp, aux, z}). targets are the next tokens (-1 =
        ignore); the MTP head at t is trained on targets[t+1]. The LM head runs only where there is a target: in SFT
        and RL most positions are prompt, and the 16K-wide head is most of a small model's FLOPs. ce and mtp are
        sums over their targets divided by norm = (ce targets, mtp targets): by default this batch's own counts (a
        mean; 0, not NaN, when nothing is a target); a training step passes its global counts."""
        moes = self.moe_layers()
        for m in moes:  # the router losses count only the MoE layers this forward runs (the MTP's may not)
            m.count_E = None
        h = self.hidden(idx, cache)
        if targets is None:
            return self.lm_head(h if at is None else h[at]), None
        if norm is None:
            norm = ((targets != -1).sum().clamp(min=1), (targets[:, 1:] != -1).sum().clamp(min=1))
        losses = {"ce": self._target_ce(h, targets) / norm[0]}
        if self.mtp is not None and idx.size(1) > 1:
            losses["mtp"] = self._target_ce(self.mtp_hidden(h[:, :-1], idx[:, 1:]), targets[:, 1:]) / norm[1]
        else:
            losses["mtp"] = h.new_zeros((), dtype=torch.float32)
        losses["aux"], losses["z"] = self.router_losses([m for m in moes if m.count_E is not None], h)
        return None, losses

    def _target_ce(self, h, targets):
        """Sum of the cross-entropies of the head's logits at the positions with a target (-1 = none)."""
        keep = targets != -1
        return F.cross_entropy(self.lm_head(h[keep]).float(), targets[keep], reduction="sum")

    def reset_router_counts(self):
        """Start an optimizer step: the training forwards that follow take the balancing loss's expert shares from
        their counts summed so far (over micro-batches and ranks), until the next reset."""
        for m in self.moe_layers():
            m.step_count_E = torch.zeros(m.num_experts, dtype=torch.long, device=m.gate.weight.device)

    def router_losses(self, moes, like):
        """(aux, z) summed over the MoE layers that ran, in fp32.

        aux is the Switch balancing loss (https://arxiv.org/abs/2101.03961) per layer, E * sum_e f_e * P_e: P_e is
        expert e's mean router probability over this micro-batch (the gradient flows through it), f_e the share of
        routed slots expert e took over the *global batch*, as the Mellum 2 report computes it. Counts of later
        micro-batches do not exist yet when this one runs backward, so, as Megatron-Core's "global_aux_loss", f
        comes from the running sum of counts over the step's micro-batches so far (this one included), all-reduced
        over the data-parallel ranks at every micro-batch (every rank holds different data here: no TP / CP).
        The layers' terms are summed, not averaged (Megatron adds one per layer), so the coefficient applies per
        layer. transformers' `load_balancing_loss_func` (weighted by `router_aux_loss_coef`) instead pools the
        routing of all layers and tokens of one forward into a single f and P, with f per token rather than per
        routed slot: one term, about K / L times ours at equal coefficient, and a statistic of one micro-batch,
        which is far easier to balance than the global batch (the reason the report balances globally).
        Before any reset_router_counts(), and outside training (eval, no grad), f is this forward's own counts."""
        if not moes:
            return like.new_zeros((), dtype=torch.float32), like.new_zeros((), dtype=torch.float32)
        count_LE = torch.stack([m.count_E for m in moes])
        if self.training and torch.is_grad_enabled() and moes[0].step_count_E is not None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(count_LE)
            for m, c_E in zip(moes, count_LE):
                m.step_count_E = m.step_count_E + c_E
            count_LE = torch.stack([m.step_count_E for m in moes])
        for m, c_E in zip(moes, count_LE):
            m.load = c_E
        f_LE = (count_LE.double() / count_LE.sum(dim=-1, keepdim=True).clamp(min=1)).float()
        probs_LE = torch.stack([m.probs_E for m in moes])
        aux = (probs_LE.size(-1) * (f_LE * probs_LE).sum(dim=-1)).sum()
        return aux, torch.stack([m.z for m in moes]).sum()

    def expert_load(self):
        """(num MoE layers, E) the token counts the last balancing loss used: the step's global counts in
        training, the last forward's otherwise; the training loop logs max/mean imbalance."""
        return torch.stack([m.load for m in self.moe_layers() if m.load is not None])

    # --- Hugging Face format -------------------------------------------------------------------------------

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, dtype=None, tokenizer=None):
        """config.json + model(-0000i-of-0000n).safetensors (+ index), written to a temp dir then renamed.
        Experts are written one 2-D tensor each (`experts.{e}.gate_proj.weight`, ...), the on-disk layout of
        the released checkpoints and of transformers. tokenizer (a data.Tokenizer): also write its Hugging Face
        files and the chat stop token as eos_token_id, so transformers and sample.py can use the directory alone."""
        from safetensors.torch import save_file
        tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        state = {k: (v.to(dtype) if dtype else v).detach().cpu() for k, v in self.state_dict().items()}
        state = {k: v.contiguous() for k, v in split_experts(state).items()}
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            if cur and size + v.nbytes > max_shard_bytes:
                shards, cur, size = shards + [cur], {}, 0
            cur[k], size = v, size + v.nbytes
        shards.append(cur)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        hf = self.config.to_hf()
        if tokenizer is not None:
            import data  # lazily: model.py stays importable without the tokenizer packages
            data.save_hf_tokenizer(tokenizer, tmp)
            hf.update(eos_token_id=tokenizer.special[data.CHAT_STOP], pad_token_id=tokenizer.eot, bos_token_id=None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Load a Hugging Face-format directory (released Mellum 2 checkpoints, or save_pretrained output).
        Per-expert tensors are stacked into the 3-D expert parameters; fused 3-D tensors load as they are."""
        from safetensors import safe_open
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found: expected a Hugging Face-format model directory")
        with open(cfg_path) as f:
            config = Config.from_hf(json.load(f), source=cfg_path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        with torch.device("meta"):
            model = cls(config)
        state = {}
        for name in files:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                state.update({k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys()})
        state = fuse_experts(state, source=path)
        if config.num_mtp_layers and not any(k.startswith("mtp.") for k in state):
            # transformers does not save mtp.* (it has no MTP module): load the main model without one
            print(f"{path}: no mtp.* tensors, loading without the MTP module (no speculative decoding)")
            config.num_mtp_layers = 0
            with torch.device("meta"):
                model = cls(config)
        expected = model.state_dict()
        for k, t in state.items():
            if k not in expected:
                raise ValueError(f"{path}: unexpected tensor {k!r} for this config (is config.json from another "
                                 "model, or were the weights saved with a different num_nextn_predict_layers?)")
            if t.shape != expected[k].shape:
                raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(expected[k].shape)}")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
        model.load_state_dict(state, assign=True)
        return model


_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def split_experts(state):
    """3-D expert tensors -> one 2-D tensor per expert and projection (the on-disk layout)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.size(0)):
                out[f"{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = gate[e].clone()
                out[f"{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = up[e].clone()
        elif k.endswith(".experts.down_proj"):
            for e in range(v.size(0)):
                out[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def fuse_experts(state, source):
    """Inverse of split_experts: stack per-expert tensors into gate_up [E, 2F, D] and down [E, D, F]."""
    out, per_expert = {}, {}
    for k, v in state.items():
        m = _EXPERT_KEY.fullmatch(k)
        if m:
            per_expert.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
        else:
            out[k] = v
    for prefix, kinds in per_expert.items():
        E = 1 + max(max(d) for d in kinds.values())
        for kind in ("gate_proj", "up_proj", "down_proj"):
            lacking = sorted(set(range(E)) - set(kinds.get(kind, {})))
            if lacking:
                raise ValueError(f"{source}: {prefix}.{{e}}.{kind}.weight missing for experts {lacking[:5]}")
        stack = {kind: torch.stack([kinds[kind][e] for e in range(E)]) for kind in kinds}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        out[f"{prefix}.down_proj"] = stack["down_proj"]
    return out


# -----------------------------------------------------------------------------
# Counting: parameters, FLOPs, memory (on the meta device, so mellum2-12b fits on a laptop)

def count_params(config):
    """Parameter counts: total and active per token, with/without embeddings, MTP separately."""
    with torch.device("meta"):
        m = Mellum(config)
    E, k = config.num_experts, config.num_experts_per_tok
    c = dict(total=0, active=0, embed=0, mtp_total=0, mtp_active=0)
    for name, p in m.named_parameters():
        n = p.numel()
        act = n * k // E if ".experts." in name else n
        key = "mtp_" if name.startswith("mtp.") else ""
        c[key + "total"] += n
        c[key + "active"] += act
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            c["embed"] += n
    return c


def flops_per_token(config, seq_len):
    """Training FLOPs per token (forward + backward = 3x forward), main model + MTP: 6 per active matmul
    weight (the embedding lookup is free) plus attention scores and values over the keys each query sees."""
    c = count_params(config)
    matmul = c["active"] + c["mtp_active"] - config.vocab_size * config.hidden_size
    attn = 0
    for lt in config.layer_types + [SLIDING] * config.num_mtp_layers:
        span = min(config.sliding_window, seq_len) if lt == SLIDING else seq_len
        attn += 2 * 2 * config.num_attention_heads * config.head_dim * span / 2  # causal: half the span on average
    return 6 * matmul + 3 * attn


def summary(config, seq_len=None, n_gpus=1, weight_bytes=4):
    seq_len = seq_len or config.max_position_embeddings
    c = count_params(config)
    fpt = flops_per_token(config, seq_len)
    # memory: fp32 master weights + grads; Muon keeps one momentum buffer per matrix, AdamW two moments for
    # embeddings / head / norms; FSDP shards all of it across GPUs.
    adam = c["embed"]
    opt = 4 * (c["total"] + c["mtp_total"] - adam) + 8 * adam
    n = c["total"] + c["mtp_total"]

    def num(x):
        return f"{x / 1e9:.3f}B" if x >= 1e9 else f"{x / 1e6:.2f}M"

    gib = 2**30 * n_gpus
    lines = [
        f"parameters: total {num(c['total'])}, active/token {num(c['active'])} (without embeddings: "
        f"{num(c['total'] - c['embed'])} total, {num(c['active'] - c['embed'])} active); MTP module extra: "
        f"{num(c['mtp_total'])} total, {num(c['mtp_active'])} active",
        f"layers: {config.num_hidden_layers} ({config.layer_types.count(SLIDING)} sliding W={config.sliding_window}, "
        f"{config.layer_types.count(FULL)} full), experts {config.num_experts} top-{config.num_experts_per_tok}",
        f"training FLOPs/token at seq_len {seq_len}: {fpt / 1e9:.3f} GFLOP",
        f"memory per GPU ({n_gpus} GPU{'s' if n_gpus > 1 else ''}, FSDP-sharded): weights "
        f"{n * weight_bytes / gib:.2f} GiB, grads {n * weight_bytes / gib:.2f} GiB, "
        f"optimizer {opt / gib:.2f} GiB (plus activations)",
    ]
    return "\n".join(lines)


def bench_moe(config, tokens=4096, repeats=5):
    """Grouped-GEMM dispatch vs the per-expert masked loop of the reference implementation, fwd+bwd."""
    torch.manual_seed(0)
    moe = MoE(config)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)

    def loop_forward(x):  # the transformers way: one-hot masks, a Python loop over experts
        x_TD = x.view(-1, x.size(-1))
        probs = F.linear(x_TD, moe.gate.weight).float().softmax(-1)
        w, i = probs.topk(moe.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x_TD)
        mask = F.one_hot(i, moe.num_experts).permute(2, 1, 0)  # (E, K, T)
        for e in range(moe.num_experts):
            kpos, tok = torch.where(mask[e])
            gate, up = F.linear(x_TD[tok], moe.experts.gate_up_proj[e]).chunk(2, -1)
            y = F.linear(F.silu(gate) * up, moe.experts.down_proj[e]) * w[tok, kpos, None]
            out = out.index_add(0, tok, y)
        return out

    def timeit(fn):
        fn(x).sum().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x).sum().backward()
        return (time.perf_counter() - t0) / repeats

    t_loop, t_grouped = timeit(loop_forward), timeit(moe)
    print(f"MoE layer fwd+bwd, {tokens} tokens, D={config.hidden_size}, E={config.num_experts} "
          f"top-{config.num_experts_per_tok}, F={config.moe_intermediate_size}, {torch.get_num_threads()} threads: "
          f"per-expert loop {t_loop * 1e3:.1f} ms, grouped {t_grouped * 1e3:.1f} ms, "
          f"speed-up {t_loop / t_grouped:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Model summary (meta device) or the MoE dispatch benchmark")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--bench", action="store_true", help="time the grouped MoE dispatch vs a per-expert loop")
    args = ap.parse_args()
    cfg = get_config(args.preset)
    if args.bench:
        bench_moe(cfg)
    else:
        print(f"preset {args.preset}")
        print(summary(cfg, args.seq_len, args.gpus))
