"""
Generation with Mellum 2: KV-cache decoding, and speculative decoding that uses the model's own MTP head as the
draft model (DeepSeek-V3, https://arxiv.org/abs/2412.19437 sec. 5.4.3).

CPU or one GPU (a training stage's output directory, latest step, or a Hugging Face-format directory):
    python sample.py --ckpt out/pretrain/phase1 --prompt "def fibonacci(n):"
    python sample.py --ckpt out/pretrain/phase1 --prompt "import os" --speculative --temperature 0
    python sample.py --ckpt out/pretrain/phase1 --prompts-file prompts.txt      # one prompt per line
    python sample.py --ckpt out/sft/instruct --chat       # interactive, through the chat template
    python sample.py --ckpt out/sft/thinking --chat --tools calculator python   # offer tools; calls are run
    python sample.py --ckpt out/pretrain/phase1 --bench    # tokens/s: no cache, cache, cache + speculative
    python sample.py --ckpt out/sft/instruct --bench --chat --prompt "Compute 3 + 4."   # the same on a chat prompt
    python sample.py --ckpt out/pretrain/phase1 --bench-batch --temperature 0.6   # tokens/s at batch 1, 8, 32, 128

Contents, top to bottom
  LayerCache, KVCache    the KV cache (model.py's cache interface): full layers grow, sliding layers keep a ring of
                         `window + slack` positions; rows may be left-padded (pad) and selected or repeated (select)
  probabilities          logits -> sampling distribution (temperature, top-k, top-p); greedy = argmax of logits
  _pick, _sample         one token per row: a two-level inverse CDF; with its untruncated log-probability
  accept_or_resample     the speculative-sampling rule (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192;
                         Chen et al. 2023, https://arxiv.org/abs/2302.01318): keeps the output distribution exact
  generate               prefill once, then one token per step through the KV cache (or, for the benchmark, a
                         full recompute per step), or MTP speculative decoding
  Completion,            many completions at once for evaluation and RL: prompts of any lengths (left padding,
  generate_batch         KVCache.pad), n_samples per prompt sharing one prefill, per-row stop, tool-result
                         injection through tool_hook, per-token log-probabilities
  bench, bench_batch     the benchmarks
  calculate              the calculator tool: exact arithmetic over a parsed AST (never eval)
  CHAT_TOOLS,            --chat's tools: the calculator and Python, run in sandbox.py (never in this process)
  run_chat_tool
  main                   the command line

Speculative decoding, one step (the MTP module at position t reads h_t and token t+1 and predicts token t+2):
  x_n is sampled but not yet fed; the MTP has run at n-1 and drafted d for x_{n+1}. The main model runs on
  [x_n, d] (positions n, n+1) in one forward. If d is accepted, x_{n+2} is sampled from the second position's
  logits: two tokens for one forward, and the MTP then runs on positions n, n+1 in one call (its cache must hold
  every position before it drafts again). If d is rejected, x_{n+1} is resampled, the main cache forgets
  position n+1 (cache.rewind(1); sliding layers keep spare slots for that) and the MTP runs on position n.

Footguns
- generate() has no padding: its rows must share the prompt length (generate_batch takes any lengths);
  speculative decoding takes one row.
- Greedy speculative decoding gives plain greedy's tokens because both take the argmax of the same model; the
  verify forward computes two positions at once, so a logit tie within rounding error could still break
  differently (never seen in the tests).
- The returned tokens include the stop token when one was produced. Ids >= n_vocab (the vocabulary padding of
  data.Tokenizer) are never sampled.
- --chat renders the history with data.render_prompt and stops on <|im_end|>; earlier turns' reasoning is
  dropped (as in training). Tool calls are run (run_chat_tool: the calculator, or Python in sandbox.py) and
  their results go back in a user turn, up to MAX_TOOL_TURNS rounds per message. A think block is printed dimmed
  on a terminal (the raw <think> tags otherwise), apart from the answer.
- generate_batch's batched greedy rows equal single-row decoding up to float rounding of batched matmuls (exact
  in the tests); sampled rows draw from one generator, so they differ from sampling each row alone.
- Padding slots cost compute: a batch of one long and many short prompts prefills them all at the long length.
- --draft-vocab assumes ids are ordered by frequency (true of tiktoken BPE ranks); if they are not, only the
  acceptance rate suffers, never the output.
- Measured on CPU, `tiny` preset: one speculative step (2-token verify + the 1-layer MTP + two LM heads) costs
  ~1.4-1.5 plain steps, so even 100% acceptance gives only ~1.2-1.5x there: the MTP layer is a quarter of a
  4-layer model. The deeper the model, the smaller that share (1/28 for mellum2-12b).
"""
import argparse
import ast
import operator
import sys
import time
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

import data
import model as M
import sandbox
import train

# -----------------------------------------------------------------------------
# KV cache

class LayerCache:
    """K/V of one attention layer. Full layers: a buffer of `capacity` positions. Sliding layers: a ring of
    `window + slack` slots; position p lives in slot p % size, and slot_pos says which position each slot holds
    (-1: none yet). The slack lets speculative decoding rewind a few rejected positions without losing keys
    still inside the window, and lets a step of up to slack + 1 new tokens attend over the ring itself."""

    def __init__(self, B, K, hd, size, ring, device, dtype):
        self.k = torch.zeros(B, K, size, hd, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.size, self.ring = size, ring
        self.slot_pos = torch.full((size,), -1, device=device)

    def update(self, pos, k_new, v_new, window):
        """Store positions pos..pos+T-1; return the keys/values/positions attention should see."""
        T, dev = k_new.size(2), k_new.device
        if not self.ring:
            if pos + T > self.size:
                raise ValueError(f"KV cache full: {pos + T} positions > capacity {self.size}")
            self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k_new, v_new
            return self.k[:, :, :pos + T], self.v[:, :, :pos + T], torch.arange(pos + T, device=dev)
        new_pos = torch.arange(pos, pos + T, device=dev)
        keep = min(T, self.size)  # the newest `size` new positions go into their slots
        slot = new_pos[T - keep:] % self.size
        if T <= self.size - window + 1:  # the ring still holds every key in the first new query's window
            self.k[:, :, slot], self.v[:, :, slot], self.slot_pos[slot] = k_new, v_new, new_pos
            return self.k, self.v, self.slot_pos
        # a long step (a prefill): attend over the slots before it plus the new keys, then store the newest;
        # a slot holding a rewound position (>= pos) is stale
        old_pos = torch.where(self.slot_pos < pos, self.slot_pos, -1)
        k_all, v_all = torch.cat([self.k, k_new], dim=2), torch.cat([self.v, v_new], dim=2)
        self.k[:, :, slot], self.v[:, :, slot] = k_new[:, :, T - keep:], v_new[:, :, T - keep:]
        self.slot_pos[slot] = new_pos[T - keep:]
        return k_all, v_all, torch.cat([old_pos, new_pos])


class KVCache:
    """Per-layer caches plus the shared position counter. `mtp` is a separate cache for the MTP block.
    pad (B,) long: rows of different lengths are left-padded, row b by pad[b] slots, which attention masks out.
    Row b's tokens then sit pad[b] positions later than alone; RoPE needs no per-row positions because attention
    scores depend only on the distance between query and key (RoFormer, https://arxiv.org/abs/2104.09864), and
    the sliding window is a distance too. The layers of one kind (full, or ring) see the same positions, so
    each step builds one attention mask per kind, not per layer."""

    def __init__(self, config, batch_size, capacity, device="cpu", dtype=torch.float32, slack=4, layer_types=None,
                 pad=None):
        K, hd = config.num_key_value_heads, config.head_dim
        ring_size = config.sliding_window + slack

        def make(lt):
            ring = lt == M.SLIDING and ring_size < capacity
            return LayerCache(batch_size, K, hd, ring_size if ring else capacity, ring, device, dtype)

        self.layers = [make(lt) for lt in (layer_types or config.layer_types)]
        self.pos, self.layer = 0, 0
        self.pad = pad
        self.masks = {}  # this step's attention masks, per (ring, window)
        self.mtp = None
        if layer_types is None and config.num_mtp_layers:
            self.mtp = KVCache(config, batch_size, capacity, device, dtype, slack, layer_types=[M.SLIDING], pad=pad)

    def select(self, rows):
        """Keep (or repeat) batch rows: rows (R,) indexes the current rows. Shares a prefill among samples of one
        prompt (rows = arange(P).repeat_interleave(G)) and drops finished rows."""
        for c in self.layers:
            c.k, c.v = c.k[rows], c.v[rows]
        if self.pad is not None:
            self.pad = self.pad[rows]
        self.masks = {}
        if self.mtp is not None:
            self.mtp.select(rows)

    def update(self, k, v, window):  # called by each attention layer in order during one forward
        c, T = self.layers[self.layer], k.size(2)
        self.layer += 1
        k, v, k_pos = c.update(self.pos, k, v, window)
        if (c.ring, window) not in self.masks:
            q_pos = torch.arange(self.pos, self.pos + T, device=k.device)
            self.masks[c.ring, window] = M.attention_mask(q_pos, k_pos, window, self.pad)
        return k, v, self.masks[c.ring, window]

    def advance(self, T):
        self.pos, self.layer, self.masks = self.pos + T, 0, {}

    def rewind(self, n):
        """Forget the last n positions (rejected speculative tokens). Ring slots keep `slack` spare positions."""
        self.pos, self.masks = self.pos - n, {}

    def nbytes(self):
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers) + (self.mtp.nbytes() if self.mtp else 0)


# -----------------------------------------------------------------------------
# Sampling distributions and the speculative acceptance rule


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """(..., V) logits -> (..., V) float32 probabilities at temperature > 0 (greedy decoding takes the argmax of
    the logits instead). top_k keeps the k most likely tokens; top_p the smallest set whose mass reaches p
    (nucleus sampling, Holtzman et al. 2019, https://arxiv.org/abs/1904.09751); both renormalise."""
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):  # the nucleus, if any, lies inside the k: sort only those
        vals, ids = logits.topk(top_k, dim=-1)
        return torch.zeros_like(logits).scatter_(-1, ids, probabilities(vals, 1.0, None, top_p))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens: drop a token once it is >= p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _pick(dist, greedy, gen, block=128):
    """One token per row of (B, V) logits (greedy) or probabilities -> (B,). Sampling inverts the CDF in two levels,
    a block of `block` ids by the blocks' masses, then an id inside it by its own uniform: exactly the distribution,
    and the cumulative sums run over V / block + block values, not V (on CPU, torch.multinomial costs ~1 ms per row
    at V = 16K; a cumsum over 128 x 16K, 2.5 ms per decoding step). Greedy: the first maximum (max(-1), which on a
    CPU runs 2-3x faster than argmax)."""
    if greedy:
        return dist.max(-1).indices
    B, V = dist.shape
    full = V - V % block  # the blocks' masses without copying dist: the whole blocks, then the ragged last one
    mass = dist[:, :full].view(B, full // block, block).sum(-1)
    if full < V:
        mass = torch.cat([mass, dist[:, full:].sum(-1, keepdim=True)], dim=1)
    cdf = mass.cumsum(-1)
    u = torch.rand(B, 2, generator=gen, device=dist.device)
    b = torch.searchsorted(cdf, u[:, :1] * cdf[:, -1:], right=True).clamp_max(cdf.size(-1) - 1)  # right: p = 0 never
    ids = b * block + torch.arange(block, device=dist.device)  # (B, block): the chosen block's ids
    inner = dist.gather(1, ids.clamp_max(V - 1)).masked_fill_(ids >= V, 0).cumsum(-1)
    j = torch.searchsorted(inner, u[:, 1:] * inner[:, -1:], right=True).clamp_max(block - 1)
    return (b * block + j)[:, 0]


def _sample(logits, temperature, top_k, top_p, gen, logprobs=True):
    """One token per row of (R, V) logits, and its log-probability under the *untruncated* distribution at the
    temperature (the sampler's, which RL's IcePop compares with the trainer's; None unless `logprobs`). With top_k
    the draw runs over the k largest only: the other ids have probability 0, and past the top-k a step costs O(k),
    not O(V). Greedy: the log-probability at temperature 1."""
    scaled = logits if temperature in (0, 1) else logits / temperature
    if temperature == 0:
        x = _pick(logits, True, gen)
    elif top_k is not None and top_k < logits.size(-1):
        vals, ids = scaled.topk(top_k, dim=-1)
        x = ids.gather(-1, _pick(probabilities(vals, 1.0, None, top_p), False, gen)[:, None])[:, 0]
    else:
        probs = probabilities(scaled, 1.0, None, top_p)
        x = _pick(probs, False, gen)
        if logprobs and (top_p is None or top_p >= 1):  # probs is the untruncated distribution: no second pass
            return x, probs.gather(-1, x[:, None])[:, 0].log()
    if not logprobs:
        return x, None
    return x, scaled.gather(-1, x[:, None])[:, 0] - scaled.logsumexp(-1)


def _logits(model, h, rows=None):
    """lm_head on (R, D) rows, the logits of ids < rows, (R, rows) and contiguous. (W @ h.T).T, once chosen here
    for 2-3 rows, hands the softmax a transposed (R, V) whose rows are strided: at R = 128, V = 16K it cost 10 ms
    per decoding step against 1-2 ms (measured on 2 threads, torch 2.13, where F.linear is as fast at any R)."""
    return F.linear(h, model.lm_head.weight[:rows])


def accept_or_resample(p, q, draft, gen=None):
    """Speculative sampling for drafts drawn from q: accept draft with probability min(1, p(draft) / q(draft)),
    otherwise draw from norm(max(p - q, 0)). The result is distributed exactly as p. p, q (..., V); draft (...).
    Returns (accepted (...) bool, token (...))."""
    p_d = p.gather(-1, draft[..., None])[..., 0]
    q_d = q.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(p_d.shape, generator=gen, device=p.device)
    accepted = u * q_d < p_d  # u < p/q without dividing by q
    if accepted.all():  # the common case when decoding: skip building the residual
        return accepted, draft
    residual = (p - q).clamp_min(0)
    # the residual is all zero only when p == q, where every draft is accepted; p keeps multinomial well-defined
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    resampled = torch.multinomial(residual.reshape(-1, p.size(-1)), 1, generator=gen).view(draft.shape)
    return accepted, torch.where(accepted, draft, resampled)


# -----------------------------------------------------------------------------
# Generation


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             stop_token=None, speculative=False, draft_vocab=None, use_cache=True, n_vocab=None, on_token=None):
    """Continue the prompts idx (B, T) of token ids. Returns (tokens, stats): tokens[b] lists the new ids of row b
    (ending at the first stop_token, included); stats holds tokens, seconds, tokens_per_s, forwards (main-model
    calls), kv_cache_bytes and, when speculative, drafted / accepted / acceptance_rate.
    n_vocab: sample only ids < n_vocab (the tokenizer's real vocabulary). draft_vocab: the speculative draft
    proposes only ids < draft_vocab (see _speculate; None = all). on_token(row, id) is called as tokens are
    produced (streaming). use_cache=False recomputes the whole sequence every step (the benchmark baseline)."""
    config = model.config
    B, T = idx.shape
    if T + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens (config.max_position_embeddings): shorten one")
    if speculative and (model.mtp is None or B != 1 or not use_cache):
        raise ValueError("speculative decoding needs the MTP module (config.num_mtp_layers = 1), one prompt row and "
                         f"the KV cache; got num_mtp_layers={config.num_mtp_layers}, {B} rows, use_cache={use_cache}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
    greedy = temperature == 0
    n_vocab = min(n_vocab or config.vocab_size, config.vocab_size)
    draft_vocab = min(draft_vocab or n_vocab, n_vocab)

    def draw(h):  # final hidden states (R, D) -> one token per row, as generate_batch draws it
        return _sample(_logits(model, h, n_vocab).float(), temperature, top_k, top_p, generator, logprobs=False)[0]

    def dist(h, rows=n_vocab):  # the speculative rule's: logits (greedy) or probabilities over ids < rows
        logits = _logits(model, h, rows)
        return logits if greedy else probabilities(logits, temperature, top_k, top_p)

    tokens, done = [[] for _ in range(B)], [False] * B

    def emit(tok_B):  # record one token per row; True once every row has finished
        for b in range(B):
            if not done[b]:
                t = int(tok_B[b])
                tokens[b].append(t)
                if on_token:
                    on_token(b, t)
                done[b] = t == stop_token or len(tokens[b]) == max_new_tokens
        return all(done)

    stats = dict(forwards=1, kv_cache_bytes=0)
    t0 = time.perf_counter()
    if not use_cache:
        seq = idx
        while not emit(x := draw(model.hidden(seq)[:, -1])):
            seq = torch.cat([seq, x[:, None]], dim=1)
            stats["forwards"] += 1
    else:
        dtype = next(model.parameters()).dtype
        cache = KVCache(config, B, T + max_new_tokens, device=idx.device, dtype=dtype)
        h = model.hidden(idx, cache)
        x = draw(h[:, -1])
        if speculative:
            _speculate(model, idx, h, x, cache, dist, greedy, generator, emit, stats, draft_vocab)
        else:
            while not emit(x):
                x = draw(model.hidden(x[:, None], cache)[:, -1])
                stats["forwards"] += 1
        stats["kv_cache_bytes"] = cache.nbytes()
    seconds = time.perf_counter() - t0
    n = sum(len(t) for t in tokens)
    stats.update(tokens=n, seconds=seconds, tokens_per_s=n / max(seconds, 1e-9))
    return tokens, stats


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    tokens: list[int]       # everything after the prompt: sampled, injected (tool results) and the stop tokens
    logprobs: list[float]   # of each sampled token under softmax(logits / temperature) over ids < n_vocab, before
    # top-k / top-p (RL's IcePop compares it with the trainer's value); greedy: temperature 1; injected: 0.0
    trained: list[bool]     # False for injected tokens
    finished: bool          # stopped on a stop token (tool_hook said None), not cut by max_new_tokens


@torch.inference_mode()
def generate_batch(model, prompts, max_new_tokens, *, n_samples=1, temperature=1.0, top_k=None, top_p=None,
                   generator=None, stop_tokens=(), n_vocab=None, tool_hook=None):
    """n_samples completions of each prompt (lists of ids, any lengths), decoded together. Returns the
    Completions ordered by (prompt_index, sample_index).

    The prompts are left-padded into one prefill (the padding masked out: KVCache.pad); its cache
    is then repeated n_samples times, so samples of a prompt share one prefill. Rows leave the batch when they
    finish. When a row samples one of stop_tokens, tool_hook(completion) decides: None ends the row, a list of ids
    is fed to the row (one per step, not trained, logprob 0.0) and sampling resumes after it. max_new_tokens
    (one number, or one per prompt) bounds every token after the prompt, injected ones included; a prompt and its
    budget must fit the context, but prompts of different lengths share a batch (a row sees only its own tokens).
    Greedy rows equal generate() on the row alone."""
    config, device = model.config, next(model.parameters()).device
    if not prompts or not all(len(p) > 0 for p in prompts):
        raise ValueError("generate_batch: give at least one prompt, each with at least one token")
    budget = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budget) != len(prompts) or min(budget) < 1 or n_samples < 1:
        raise ValueError(f"generate_batch: max_new_tokens={max_new_tokens}, n_samples={n_samples}: both must be >= 1, "
                         "max_new_tokens a number or one per prompt")
    if any(len(p) + b > config.max_position_embeddings for p, b in zip(prompts, budget)):
        raise ValueError(f"a prompt + its max_new_tokens exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens: shorten one")
    P, T = len(prompts), max(len(p) for p in prompts)
    stop_tokens = set(stop_tokens)
    n_vocab = min(n_vocab or config.vocab_size, config.vocab_size)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)
    cache = KVCache(config, P, T + max(budget), device=device, dtype=next(model.parameters()).dtype, pad=pad)
    h = model.hidden(idx, cache)[:, -1]
    rows = torch.arange(P, device=device).repeat_interleave(n_samples)
    cache.select(rows)
    h = h[rows]
    out = [Completion(p, s, [], [], [], False) for p in range(P) for s in range(n_samples)]
    active = list(range(len(out)))  # the completion each cache row decodes
    forced = {}                     # completion -> injected ids still to feed
    while True:
        x, logp = _sample(_logits(model, h, n_vocab).float(), temperature, top_k, top_p, generator)
        x, logp = x.tolist(), logp.tolist()
        keep, feed = [], []
        for r, c in enumerate(active):
            comp = out[c]
            t, lp, trained = (forced[c].pop(0), 0.0, False) if forced.get(c) else (x[r], logp[r], True)
            comp.tokens.append(t)
            comp.logprobs.append(lp)
            comp.trained.append(trained)
            if trained and t in stop_tokens:
                ids = tool_hook(comp) if tool_hook else None
                if ids is None:
                    comp.finished = True
                else:
                    forced[c] = [int(i) for i in ids]
            if not comp.finished and len(comp.tokens) < budget[comp.prompt_index]:
                keep.append(r)
                feed.append(t)
        if not keep:
            return out
        if len(keep) < len(active):
            cache.select(torch.tensor(keep, device=device))
            active = [active[r] for r in keep]
        h = model.hidden(torch.tensor(feed, device=device)[:, None], cache)[:, -1]


def _speculate(model, idx, h, x, cache, dist, greedy, gen, emit, stats, draft_vocab):
    """The speculative loop (see the module docstring). h: prefill hidden states, x (1,): the first new token.
    draft_vocab K: the draft scores only ids < K (FR-Spec, Zhao et al. 2025, https://arxiv.org/abs/2502.14856:
    a BPE vocabulary lists its most frequent merges first, and the LM head dominates a small model's draft
    cost). Any draft distribution keeps the output exact; a smaller one only lowers the acceptance rate."""
    stats.update(drafted=0, accepted=0)
    # the MTP catches up on every prompt position in its first call: position t reads h_t and token t+1
    mtp_h, mtp_next = h, torch.cat([idx[:, 1:], x[:, None]], dim=1)
    while not emit(x):
        q = dist(model.mtp_hidden(mtp_h, mtp_next, cache)[:, -1], draft_vocab)  # the draft's view of x_{n+1}
        d = _pick(q, greedy, gen)
        h = model.hidden(torch.stack([x, d], dim=1), cache)  # verify: positions n, n+1
        p = dist(h[0])  # (2, V): row 0 for x_{n+1}; row 1 for x_{n+2}, valid if d is accepted
        stats["forwards"] += 1
        stats["drafted"] += 1
        if greedy:
            y = p[0].argmax()[None]
            accepted = bool(y == d)
        else:
            q = torch.nn.functional.pad(q, (0, p.size(-1) - q.size(-1)))  # ids >= draft_vocab: q = 0
            accepted, y = accept_or_resample(p[0], q[0], d[0], gen)
            accepted, y = bool(accepted), y[None]
        if accepted:
            stats["accepted"] += 1
            if emit(d):
                break
            x = _pick(p[1:], greedy, gen)
            mtp_h, mtp_next = h, torch.stack([d, x], dim=1)
        else:
            cache.rewind(1)  # position n+1 held the rejected draft
            x = y
            mtp_h, mtp_next = h[:, :1], x[:, None]
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)


# -----------------------------------------------------------------------------
# Benchmark: no cache vs cache vs cache + speculative, and the sliding-window KV-cache saving


def bench(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, n_vocab, draft_vocab, repeats=3):
    config, device = model.config, prompt_ids.device
    max_new_tokens = min(max_new_tokens, config.max_position_embeddings - prompt_ids.size(1))
    spec = dict(speculative=True, draft_vocab=draft_vocab)
    runs = [("no cache (full recompute)", 0, dict(use_cache=False)), ("KV cache", 0, {}),
            ("KV cache + speculative", 0, dict(speculative=True))]
    if draft_vocab < n_vocab:
        runs += [(f"  draft ids < {draft_vocab}", 0, spec)]
    if temperature > 0:
        runs += [("KV cache", temperature, {}), ("KV cache + speculative", temperature, spec)]
    generate(model, prompt_ids, min(8, max_new_tokens), temperature=0, n_vocab=n_vocab, **spec)  # warm-up
    print(f"{config.num_hidden_layers} layers, D={config.hidden_size}, V={config.vocab_size}, device {device}, "
          f"{torch.get_num_threads()} threads; prompt {prompt_ids.size(1)} tokens, {max_new_tokens} new tokens, "
          f"no stop token, best of {repeats} runs")
    print(f"{'decoding':<32}{'temp':>6}{'tokens':>8}{'tok/s':>9}{'speed-up':>10}{'accepted':>10}{'tok/fwd':>9}")
    best = [None] * len(runs)
    for _ in range(repeats):  # interleaved, fastest of each kept: other work may share the machine
        for i, (name, temp, kw) in enumerate(runs):
            gen = torch.Generator(device=device).manual_seed(seed)  # same seed: every repeat gives the same tokens
            toks, s = generate(model, prompt_ids, max_new_tokens, temperature=temp, top_k=top_k, top_p=top_p,
                               generator=gen, n_vocab=n_vocab, **kw)
            if best[i] is None or s["tokens_per_s"] > best[i][1]["tokens_per_s"]:
                best[i] = toks, s
    plain = {temp: s["tokens_per_s"] for (name, temp, _), (_, s) in zip(runs, best) if name == "KV cache"}
    greedy_tokens = best[0][0]
    for (name, temp, _), (toks, s) in zip(runs, best):
        speed = f"{s['tokens_per_s'] / plain[temp]:.2f}x" if name != runs[0][0] else "-"
        acc = f"{s['acceptance_rate']:.1%}" if "acceptance_rate" in s else "-"
        print(f"{name:<32}{temp:>6g}{s['tokens']:>8}{s['tokens_per_s']:>9.1f}{speed:>10}{acc:>10}"
              f"{s['tokens'] / s['forwards']:>9.2f}")
        if temp == 0 and toks != greedy_tokens:
            first = next(i for i, (a, b) in enumerate(zip(toks[0], greedy_tokens[0])) if a != b)
            print(f"  WARNING: greedy tokens differ from the no-cache run from position {first} on")
    print("speed-up: vs plain KV-cache decoding at the same temperature; tok/fwd: tokens per main-model forward")
    full_types = [M.FULL] * (config.num_hidden_layers + config.num_mtp_layers)
    for ctx in sorted({config.max_position_embeddings, 131_072}):
        windowed = KVCache(config, 1, ctx, device="meta").nbytes()
        every = KVCache(config, 1, ctx, device="meta", layer_types=full_types).nbytes()
        print(f"KV cache at {ctx} tokens (fp32, batch 1, MTP included): {windowed / 2**20:.1f} MiB with "
              f"sliding-window rings vs {every / 2**20:.1f} MiB keeping every position on every layer "
              f"({every / windowed:.2f}x)")


def bench_batch(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, n_vocab, batches=(1, 8, 32, 128),
                repeats=3):
    """Tokens/s of generate_batch at each batch size (the same prompt in every row, no stop token, so every row
    decodes max_new_tokens), with the ratio to batch 1 measured in the same run."""
    device = next(model.parameters()).device
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(prompt))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, n_vocab=n_vocab)
    generate_batch(model, [prompt], min(8, max_new_tokens), **kw)  # warm-up
    print(f"{model.config.num_hidden_layers} layers, D={model.config.hidden_size}, V={model.config.vocab_size}, "
          f"device {device}, {torch.get_num_threads()} threads; prompt {len(prompt)} tokens, {max_new_tokens} new "
          f"tokens per row, temperature {temperature}, best of {repeats} runs")
    print(f"{'batch':>6}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs batch 1':>12}")
    best = {}
    for _ in range(repeats):  # interleaved, fastest kept: other work may share the machine
        for B in batches:
            gen = torch.Generator(device=device).manual_seed(seed)
            t0 = time.perf_counter()
            out = generate_batch(model, [prompt] * B, max_new_tokens, generator=gen, **kw)
            seconds = time.perf_counter() - t0
            n = sum(len(c.tokens) for c in out)
            if B not in best or n / seconds > best[B][0] / best[B][1]:
                best[B] = n, seconds
    for B in batches:
        n, s = best[B]
        print(f"{B:>6}{n:>8}{s:>9.2f}{n / s:>9.1f}{(n / s) / (best[batches[0]][0] / best[batches[0]][1]):>11.2f}x")


# -----------------------------------------------------------------------------
# Generation-time tools: the calculator (the SFT data teaches it; eval.py's calculator family runs it), and for
# --chat also Python in sandbox.py (never in this process)

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_CALC_CHARS, MAX_CALC_MAGNITUDE = 200, 10 ** 30


def calculate(expression):
    """Exact value of + - * / ( ) over integers and decimals, as "12" or "7/12" (data.py's answer format). The text is
    parsed with ast (never evaluated); anything else, or a result beyond 1e30, gives "error: ..."."""
    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            v = _BINOPS[type(node.op)](ev(node.left), ev(node.right))
            if abs(v) > MAX_CALC_MAGNITUDE:
                raise ValueError("result too large")
            return v
        raise ValueError("only numbers, + - * / and parentheses are allowed")

    if not isinstance(expression, str) or len(expression) > MAX_CALC_CHARS:
        return f"error: the expression must be a string of at most {MAX_CALC_CHARS} characters"
    try:
        v = ev(ast.parse(expression.strip(), mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, RecursionError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else e}"
    return str(v.numerator) if v.denominator == 1 else str(v)



MAX_TOOL_TURNS = 4  # tool rounds per user message, as eval.make_tool_hook allows
CHAT_TOOLS = {
    "calculator": {"name": "calculator", "description": "Exact arithmetic: + - * / ( )",
                   "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                  "required": ["expression"]}},
    "python": {"name": "python", "description": "Run a Python program; returns what it prints",
               "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}},
}
MAX_TOOL_OUTPUT = 2000  # characters of a program's output sent back (the context is small)


def run_chat_tool(call):
    """The result text of a tool call the model made: calculate for the calculator, sandbox.run_python (no network,
    rlimits, a fresh interpreter) for python, an error message otherwise."""
    args = call["arguments"]
    if call["name"] == "calculator":
        return calculate(args.get("expression"))
    if call["name"] == "python":
        if not isinstance(args.get("code"), str):
            return "error: python needs {\"code\": \"...\"}"
        r = sandbox.run_python(args["code"])
        out = r.stdout + (r.stderr if r.returncode else "") + ("\n[timed out]" if r.timed_out else "")
        return out[:MAX_TOOL_OUTPUT] or "(no output)"
    return f"error: unknown tool {call['name']!r} (this chat runs {', '.join(CHAT_TOOLS)})"


# -----------------------------------------------------------------------------
# Command line


class _StreamPrinter:
    """on_token callback printing the decoded text as it grows. A token can end inside a UTF-8 character (byte-level
    BPE): such text is held back until the character completes, or until finish(). Ids in `hide` (end-of-text,
    end-of-turn) are not printed; dim_think shows a think block dimmed (ANSI), apart from the answer."""

    def __init__(self, tok, hide=(), dim_think=False):
        self.tok, self.ids, self.shown = tok, [], ""
        self.hide, self.dim_think = {tok.eot, *hide}, dim_think

    def __call__(self, row, t):
        if t not in self.hide:
            self.ids.append(t)
            text = self.tok.decode(self.ids)
            if not text.endswith("\ufffd"):
                self.finish(text)

    def finish(self, text=None):
        text = self.tok.decode(self.ids) if text is None else text
        if self.dim_think:  # tags are single tokens, so a longer text never rewrites what was shown
            text = text.replace("<think>", "\033[2m<think>").replace("</think>", "</think>\033[0m")
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def chat(tok, tool_names, context, device, complete):
    """--chat: read user turns from stdin, answer through the chat template; tool calls the model makes are run
    (run_chat_tool) and their results go back in a user turn, up to MAX_TOOL_TURNS rounds per message."""
    if not data.renders_chat(tok):
        sys.exit(f"sample.py: --chat needs a tokenizer whose chat tags are single tokens (this checkpoint has "
                 f"{tok.name})")
    stop = tok.special[data.CHAT_STOP]
    tools = [CHAT_TOOLS[name] for name in tool_names or ()] or None
    print(f"chat through the chat template (tools offered: {', '.join(tool_names or ()) or 'none'}; tool calls "
          "the model makes are run either way); Ctrl-D to quit", file=sys.stderr)
    messages = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        for _ in range(MAX_TOOL_TURNS + 1):  # an answer, or tool calls whose results go back to the model
            ids = data.render_prompt(tok, messages, tools)
            if len(ids) >= context:  # keep only the new question
                print(f"[the conversation fills the context of {context}: starting over]", file=sys.stderr)
                messages = [next(m for m in reversed(messages) if m["role"] == "user")]
                ids = data.render_prompt(tok, messages, tools)
            if len(ids) >= context:
                sys.exit(f"sample.py: the message has {len(ids)} tokens with the template, the context is "
                         f"{context}")
            reply = data.parse_assistant(tok.decode(complete("", torch.tensor([ids], device=device), stop,
                                                            dim_think=sys.stdout.isatty())))
            print()
            # the template drops earlier turns' reasoning: the history keeps the answer and any tool calls
            messages.append({"role": "assistant", "content": reply["content"],
                             **({"tool_calls": reply["tool_calls"]} if reply["tool_calls"] else {})})
            if not reply["tool_calls"] or not reply["well_formed"]:
                break
            for call in reply["tool_calls"]:
                result = run_chat_tool(call)
                print(f"[tool {call['name']} -> {result}]", file=sys.stderr)
                messages.append({"role": "tool", "content": result})


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate with a nanoMellum checkpoint (KV cache, MTP speculative "
                                 "decoding)")
    # --- what to load and what to continue
    ap.add_argument("--ckpt", required=True, help="training checkpoint dir (latest step) or Hugging Face dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--prompt", default="def fibonacci(n):\n", help="text to continue")
    ap.add_argument("--prompts-file", default=None, help="one prompt per line (write \\n for a newline inside "
                    "one), decoded one at a time")
    ap.add_argument("--chat", action="store_true", help="interactive chat through the chat template (an SFT model)")
    ap.add_argument("--tools", nargs="*", choices=tuple(CHAT_TOOLS), default=None, help="with --chat: offer these "
                    "tools in the system turn (calls the model makes are run whether offered or not)")
    ap.add_argument("--bench", action="store_true", help="tokens/s without cache, with cache, with speculative "
                    "(with --chat: --prompt as a user turn through the chat template)")
    ap.add_argument("--bench-batch", action="store_true",
                    help="tokens/s of batched generation at batch 1, 8, 32, 128 (eval and RL decode 128 rows)")
    # --- decoding
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the report's "
                    "recommended 0.6 with --chat, 0.8 otherwise)")
    ap.add_argument("--top-k", type=int, default=None, help="0 = off (default: 20 with --chat, the report's; 50)")
    ap.add_argument("--top-p", type=float, default=None, help="1 = off (default: 0.95 with --chat, the report's; 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", action="store_true", help="MTP-drafted speculative decoding")
    ap.add_argument("--draft-vocab", type=int, default=32768, help="the draft proposes only ids below this "
                    "(the most frequent BPE merges; cheaper draft head, same output); 0 = all")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    args = ap.parse_args(argv)
    for name, chat_default, plain_default in (("temperature", 0.6, 0.8), ("top_k", 20, 50), ("top_p", 0.95, 1.0)):
        if getattr(args, name) is None:  # the report's recommended sampling for the chat models
            setattr(args, name, chat_default if args.chat else plain_default)

    # --- model and tokenizer
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, meta = train.load_model(args.ckpt, args.step, device)
    if tok is None:
        raise data.InputError(f"{args.ckpt}: the checkpoint records no tokenizer (meta.json has no \"tokenizer\"): "
                              "write it with a training stage, or export it with its tokenizer")
    config = model.config
    context = config.max_position_embeddings
    print(f"loaded {args.ckpt} ({meta.get('stage') or meta.get('phase') or 'Hugging Face format'}, step "
          f"{meta.get('step', '-')}): {config.num_hidden_layers} layers, D={config.hidden_size}, context {context}, "
          f"MTP {'yes' if model.mtp is not None else 'no'}; tokenizer {tok.name}", file=sys.stderr)
    if args.speculative and model.mtp is None:
        sys.exit("sample.py: --speculative needs the MTP module, and this checkpoint has none")
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)

    def encode(text):
        ids = tok.encode(text)
        if not ids:
            sys.exit("sample.py: the prompt is empty")
        if len(ids) >= context:
            sys.exit(f"sample.py: the prompt has {len(ids)} tokens, the model's context is {context}: shorten it")
        return torch.tensor([ids], device=device)

    if args.bench:
        idx = encode(args.prompt)
        if args.chat:  # --prompt as a user turn through the chat template: what a fine-tuned model is asked
            idx = torch.tensor([data.render_prompt(tok, [{"role": "user", "content": args.prompt}])], device=device)
        bench(model, idx, args.max_new_tokens, seed=args.seed, n_vocab=tok.n_vocab,
              draft_vocab=min(args.draft_vocab or tok.n_vocab, tok.n_vocab), **sampling)
        return
    if args.bench_batch:
        bench_batch(model, encode(args.prompt)[0].tolist(), args.max_new_tokens, seed=args.seed, n_vocab=tok.n_vocab,
                    **sampling)
        return

    # --- generate
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def complete(text, idx=None, stop=tok.eot, dim_think=False):
        idx = encode(text) if idx is None else idx
        max_new = min(args.max_new_tokens, context - idx.size(1))
        if max_new < args.max_new_tokens:
            print(f"[generating {max_new} tokens: the context of {context} is full after that]", file=sys.stderr)
        print(text, end="", flush=True)
        printer = _StreamPrinter(tok, hide=(stop,), dim_think=dim_think)
        tokens, s = generate(model, idx, max_new, generator=gen, stop_token=stop, speculative=args.speculative,
                             draft_vocab=args.draft_vocab or None, n_vocab=tok.n_vocab, on_token=printer, **sampling)
        printer.finish()
        line = (f"\n[{s['tokens']} tokens in {s['seconds']:.2f}s, {s['tokens_per_s']:.1f} tok/s; KV cache "
                f"{s['kv_cache_bytes'] / 2**20:.2f} MiB")
        if args.speculative:
            line += f"; drafts accepted {s['accepted']}/{s['drafted']} ({s['acceptance_rate']:.1%})"
        print(line + "]", file=sys.stderr)
        return tokens[0]

    if args.chat:
        chat(tok, args.tools, context, device, complete)
    elif args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [p.rstrip("\n").replace("\\n", "\n") for p in f if p.strip()]
        for i, p in enumerate(prompts):
            print(f"--- prompt {i + 1}/{len(prompts)}", file=sys.stderr)
            complete(p)
    else:
        complete(args.prompt)


if __name__ == "__main__":
    train.run(main, "sample.py")
