"""
The Mellum 2 architecture (arXiv 2605.31268) in one file.

Contents, top to bottom:
  Config + PRESETS        one dataclass; defaults are the CPU-sized `tiny` model
  RoPE (+ YaRN)           per-layer-type frequencies: theta 500k on both types, YaRN on full layers only
  dispatch                the one place that picks Triton / FP8 / plain PyTorch / the CPU paths of kernels.py
                          (linear, grouped GEMM, attention); attention_mask, the keys each query sees (a cache's
                          slots, padding, SharedPrefix segments)
  Attention               GQA, QK-norm before RoPE, causal or sliding-window; SharedPrefix rows (one prompt read
                          once by several completions: RL's update)
  MoE                     fp32-softmax router, top-k, renormalised; experts as 3-D tensors, grouped GEMM (decoding
                          on a CPU: kernels.experts_path picks in place or padded blocks);
                          expert parallelism (all_to_all dispatch) when shard_experts() gave it a process group
  router losses           global-batch Switch balancing loss (counts over the step's micro-batches and ranks), z-loss
  DecoderLayer, MTP       pre-norm blocks; DeepSeek-V3-style multi-token prediction module
  Mellum                  forward (logits + loss parts), decoding helpers
  counting                count_params, flops_per_token (on the meta device: mellum2-12b fits on a laptop)

Not here: the KV cache (sample.py), the Hugging Face format and checkpoints (train.py), the model summary
(`python pretrain.py --preset NAME --phase 1 --dry-run`), the MoE dispatch benchmark (kernels.py).

The cache interface (sample.KVCache implements it; every forward takes cache=None): `cache.pos`, the position of
the first new token; `cache.update(k, v, window)`, called by each attention layer in order, stores the new
keys/values and returns (k, v, mask) to attend over (mask: attention_mask's, which hides empty slots and left
padding); `cache.advance(T)` after the layers ran; `cache.mtp`, the MTP block's own cache or None.

Parameter names are those of Hugging Face's `MellumForCausalLM`, so released checkpoints load with no mapping
table; the MTP module lives under `mtp.*` (which transformers ignores).

Footguns:
- Sliding window W means query i sees keys i-W < j <= i: W keys including itself (transformers' convention).
- forward returns the loss parts unweighted: ce and mtp are target sums divided by `norm` (default: this batch's
  own target counts, i.e. a mean), aux and z are sums over the MoE layers. The caller weights them
  (train.forward_backward: mtp 0.1, aux 1e-3, z 1e-3 as in the report).
- After `reset_router_counts()`, the balancing loss of each training forward takes its expert shares from the
  counts of all training forwards since (all-reduced over ranks when torch.distributed is initialised): a loop
  that calls it must call it at the start of *every* optimizer step (train.forward_backward does), and every
  rank must run the same forwards. Without it, each forward uses its own local counts.
- The MTP head sees the *normalised* final hidden state at t and the embedding of token t+1, and predicts t+2.
- `torch._grouped_mm` wants int32 cumulative *end* offsets, one per expert; empty experts are fine.
- Under expert parallelism a layer's `experts` holds only this rank's slice (`experts.first` onward): its
  state_dict() is not the whole layer. train.py's checkpoints put the slices back together.
- init_weights() draws every matrix (every expert) from its own seeded generator: same seed, same weights,
  whatever the sharding, but not the values of a single global stream.
"""
import functools
import hashlib
import math
from dataclasses import dataclass, field

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
    its preset through a cut tokenizer, an extension or SFT at a longer context. Later stages pick their recipe by
    it."""
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
    """cos, sin of shape (*pos.shape, head_dim) for integer positions `pos`, rotate-half layout."""
    params = tuple(sorted(config.rope_parameters[layer_type].items()))
    inv_freq, scale = _rope_frequencies_cached(config.head_dim, params)
    freqs = pos.float()[..., None] * inv_freq.to(pos.device)
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


def attention_mask(q_pos, k_pos, window, pad=None, seg=None):
    """Which keys each query sees: (T, S) bool from absolute positions q_pos (T,), k_pos (S,) (k_pos < 0: an
    empty cache slot), causal and, with a window, sliding. pad (B,): row b's first pad[b] positions are left
    padding, hidden from every query but their own (a query that saw no key at all would turn into NaN and poison
    the padding's keys in the next layer): (B, 1, T, S). seg (B, T) with q_pos = k_pos (B, T): a SharedPrefix
    layout, where segment s > 0 sees segment 0 and itself: (B, 1, T, T)."""
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    allowed = (kp <= qp) & (kp >= 0)
    if window is not None:
        allowed &= kp > qp - window
    if pad is not None:
        allowed = ((allowed & (k_pos >= pad[:, None, None])) | (kp == qp))[:, None]
    if seg is not None:
        allowed = (allowed & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])))[:, None]
    return allowed


def attention(q, k, v, window, mask=None):
    """Causal (window=None) or sliding-window attention with GQA. q (B, H, T, hd); k, v (B, K, S, hd).
    mask: attention_mask's, when the keys are not the queries' own positions 0..T-1 (a cache, a SharedPrefix)."""
    if mask is None:
        if kernels.use_kernels(q.device):
            return kernels.flash_attention(q, k, v, window=window)
        T = q.size(2)
        if window is None or window >= T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if kernels.attends_in_blocks(T, window):
            return kernels.sliding_window_attention(q, k, v, window)
        pos = torch.arange(T, device=q.device)
        mask = attention_mask(pos, pos, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@dataclass
class SharedPrefix:
    """Rows that hold one prompt once and the completions that continue it side by side: RL's update scores G
    samples of a prompt at the cost of one prompt, not G. pos (B, T): each token's position in its own sequence;
    seg (B, T): 0 the prompt, s >= 1 completion s, which sees the prompt and itself only; -1 padding. Every token
    computes what it computes in the plain row prompt + its completion, up to rounding. No MTP or CE targets: the
    next token of a row is not the next token of a sequence."""
    pos: torch.Tensor
    seg: torch.Tensor
    masks: dict = field(default_factory=dict, repr=False)  # per window, built by the first layer that needs it

    def mask(self, window):
        if window not in self.masks:
            self.masks[window] = attention_mask(self.pos, self.pos, window, seg=self.seg)
        return self.masks[window]


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, like the reference implementation (one call when all is fp32)
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
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

    def forward(self, x, cos, sin, cache=None, shared=None):
        B, T, _ = x.shape
        hd = self.config.head_dim
        # QK-norm over head_dim before RoPE keeps attention logits bounded (Qwen3 / Mellum)
        q = self.q_norm(self.q_proj(x).view(B, T, -1, hd)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, hd)).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if shared is not None:
            mask = shared.mask(self.window)
        elif cache is not None:
            k, v, mask = cache.update(k, v, self.window)
        y = attention(q, k, v, self.window, mask)
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
        self.count_E = self.logits_TE = self.probs_TE = None
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

        expert_R = topi_TK.reshape(-1)
        count_E = torch.bincount(expert_R, minlength=self.num_experts)
        w = self.experts.gate_up_proj, self.experts.down_proj
        path = "ep" if self.ep_group is not None else kernels.experts_path(len(expert_R), x.device, self.experts.fp8)
        if path == "in_place":
            y_RD = kernels.experts_in_place(x_TD.repeat_interleave(self.top_k, dim=0), expert_R, *w)
            y_TKD = y_RD.view(-1, self.top_k, D)
            out_TD = (y_TKD * topw_TK[..., None].to(y_TKD.dtype)).sum(dim=1)
        else:
            # Dispatch: sort the T*K (token, expert) pairs by expert so each expert sees one contiguous block of rows.
            order_R = expert_R.argsort(stable=True)
            token_R = order_R // self.top_k
            x_RD = x_TD.index_select(0, token_R)
            if path == "padded":
                y_RD = kernels.experts_padded(x_RD, count_E, *w)
            elif path == "grouped":
                y_RD = self.experts(x_RD, count_E.cumsum(0).to(torch.int32))
            else:
                y_RD = self.dispatch_ep(x_RD, count_E)
            y_RD = y_RD * topw_TK.reshape(-1)[order_R, None].to(y_RD.dtype)
            out_TD = torch.zeros_like(x_TD, dtype=y_RD.dtype).index_add_(0, token_R, y_RD)

        # Router statistics: every routed position counts, padding included (it takes expert slots like any token).
        # probs_E and z are computed from these only when a loss asks for them (not while decoding).
        self.count_E, self.logits_TE, self.probs_TE = count_E, logits_TE, probs_TE
        return out_TD.view(B, T, D).to(x.dtype)

    @property
    def probs_E(self):
        """Mean router probability of each expert over the last forward's tokens (fp32)."""
        return self.probs_TE.mean(dim=0)

    @property
    def z(self):
        """z-loss (ST-MoE, https://arxiv.org/abs/2202.08906) of the last forward: mean over tokens of
        logsumexp(logits)^2, which keeps router logits small. The micro-batches of a step have equal token counts,
        so the mean of their means is the step's token mean."""
        with torch.autocast(self.logits_TE.device.type, enabled=False):
            return torch.logsumexp(self.logits_TE, dim=-1).square().mean()

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

    def forward(self, x, cos, sin, cache=None, shared=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, shared)
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
# The model

def _rows(h, mask):
    """h[mask] for h (B, T, D) and a bool mask (B, T), as an index_select: its backward is an index_add, where
    boolean indexing's is an accumulating index_put (~5x slower on a CPU)."""
    return h.reshape(-1, h.size(-1)).index_select(0, mask.reshape(-1).nonzero()[:, 0])


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
    def init_weights(self, seed=None, prefix=None):
        """Normal(0, initializer_range) for every matrix, ones for norms (as the reference implementation).
        Our choice of random streams: every matrix, and every expert of a 3-D stack, draws from its own generator
        seeded by (seed, name[, global expert index]). So a rank that holds an FSDP2 shard or an EP slice of
        experts (train.build_model materialises it from the meta device) computes exactly the values the
        one-process model has there, generating at most one matrix (one rank's experts) at a time.
        seed=None draws the seed from torch's global generator. prefix: only the parameters under that module
        (sft.py --mtp-only draws a fresh "mtp" block beside a trained backbone), with the values a whole init gives."""
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        std = self.config.initializer_range
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if prefix is not None and not name.startswith(prefix + "."):
                    continue
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

    def _cos_sin(self, pos, dtype, layer_types):
        """{layer type: (cos, sin)} at positions pos (T,), or (B, T) as (B, 1, T, hd) to broadcast over heads."""
        rope = {lt: rope_cos_sin(self.config, lt, pos, dtype) for lt in layer_types}
        return rope if pos.dim() == 1 else {lt: (cos[:, None], sin[:, None]) for lt, (cos, sin) in rope.items()}

    def hidden(self, idx, cache=None, shared=None):
        """Final (normalised) hidden states (B, T, D) of the main model; shared: a SharedPrefix layout of idx."""
        x = self.model.embed_tokens(idx)
        start = cache.pos if cache else 0
        pos = shared.pos if shared is not None else torch.arange(start, start + idx.size(1), device=idx.device)
        rope = self._cos_sin(pos, x.dtype, set(self.config.layer_types))
        for layer, lt in zip(self.model.layers, self.config.layer_types):
            x = layer(x, *rope[lt], cache, shared)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.model.norm(x)

    def mtp_hidden(self, h, next_idx, cache=None):
        """MTP hidden states: h (B, T, D) at positions t, next_idx (B, T) the tokens at t+1."""
        mcache = cache.mtp if cache is not None else None
        start = mcache.pos if mcache else 0
        rope = self._cos_sin(torch.arange(start, start + h.size(1), device=h.device), h.dtype, [SLIDING])
        out = self.mtp(h, self.model.embed_tokens(next_idx), *rope[SLIDING], mcache)
        if mcache is not None:
            mcache.advance(h.size(1))
        return out

    def forward(self, idx, targets=None, cache=None, norm=None, at=None, score=None, n_vocab=None, shared=None):
        """idx (B, T) -> logits (B, T, V), or (N, V) at the N True positions of the bool mask `at` (B, T); with
        `at` and score (N,), the ids to score there: (their log-probabilities, the distributions' entropies) over
        the first n_vocab ids (default all), without the logits (RL). With targets (B, T): (None, the unweighted
        loss parts {ce, mtp, aux, z}). targets are the next tokens (-1 = ignore); the MTP head at t is trained on
        targets[t+1]. The LM head runs only where there is a target: in SFT and RL most positions are prompt, and
        the 16K-wide head is most of a small model's FLOPs. ce and mtp are sums over their targets divided by
        norm = (ce targets, mtp targets): by default this batch's own counts (a mean; 0, not NaN, when nothing is
        a target); a training step passes its global counts. shared: idx is a SharedPrefix layout (not with
        targets: the MTP and CE read a row's next token as the sequence's)."""
        if shared is not None and targets is not None:
            raise ValueError("forward: a SharedPrefix layout has no next-token targets; score its positions instead")
        moes = self.moe_layers()
        for m in moes:  # the router losses count only the MoE layers this forward runs (the MTP's may not)
            m.count_E = None
        h = self.hidden(idx, cache, shared)
        if score is not None:
            return kernels.head_logprobs(_rows(h, at), self.lm_head.weight[:n_vocab], score, entropy=True)
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
        """Sum of the cross-entropies of the head at the positions with a target (-1 = none), without the
        (N, V) logits (kernels.head_logprobs: vocabulary blocks that stay in cache)."""
        keep = targets != -1
        return -kernels.head_logprobs(_rows(h, keep), self.lm_head.weight, targets[keep])[0].sum()

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
