"""
Reinforcement learning with verifiable rewards (RLVR), as Mellum 2 did it: a GRPO variant trained separately on
the Instruct and the Thinking SFT checkpoints. Per step: draw prompts from the RL task mixture (eval.py's
families), sample G completions of each with batched KV-cache decoding (the G samples share the prompt's
prefill; tool calls are stepped in each episode's environment by eval.make_tool_hook, up to the recipe's 10 tool
turns), score them with eval.py's verifiers (code runs in the sandbox, several programs at once; episodes are
replayed against the ground truth), and update the policy.

CPU, `tiny` (the SFT checkpoints of sft.py; results go to out/rl/{instruct,thinking}):
    python rlvr.py --from out/sft/instruct
    python rlvr.py --from out/sft/thinking          # the variant comes from the checkpoint (or --variant)
    python rlvr.py --from out/sft/instruct --resume # continue out/rl/instruct exactly where it stopped
One GPU: the same commands. Many GPUs (DDP: each rank draws its own prompts; the loss is normalised over all):
    torchrun --nproc_per_node=8 rlvr.py --from out/sft/instruct
Plan only (the report's recipe): python rlvr.py --from DIR --preset mellum2-12b --dry-run

The algorithm (REPORT.md, RLVR; GRPO: Shao et al. 2024, https://arxiv.org/abs/2402.03300; DAPO: Yu et al. 2025,
https://arxiv.org/abs/2503.14476; IcePop: Ling team 2025, https://arxiv.org/abs/2510.18855):
  advantage      leave-one-out, A_i = R_i - mean of the other G-1 rewards of its group; no std normalisation
  loss           token level: the sum over every valid (sampled, not injected) token of the mini-batch on all
                 ranks, divided by their count; clipped ratio r = pi_theta / pi_old with eps_low 0.2, eps_high 0.28
                 (DAPO's clip-higher); no KL term and no reference model
  dynamic        oversample 1.5x, drop groups whose rewards are all equal (their advantages are all zero), train
  sampling       on at most P of the rest (DAPO); the dropped fraction is logged
  IcePop         rho = pi_train(old) / pi_inference(old) per token: the sampler's log-probabilities are kept from
                 generation and the trainer recomputes them with the same weights; tokens with rho outside
                 [0.5, 5] are masked, the others weighted by rho (guards against train/inference mismatch: bf16 /
                 FP8 inference, MoE routing flips)
  shaping        DAPO's soft overlong penalty over the last fifth of the length cap; for Instruct, a concision
                 penalty on correct answers that use reflection words, in three tiers (constants: ours)
  optimizer      AdamW (0.9, 0.999), weight decay 0.01, linear warmup then constant LR, clip 1.0

Contents, top to bottom
  RLRecipe, RL_RECIPES   per-preset scale: the report's for mellum2-12b, a CPU-sized one for tiny
  RL_MIXTURE             the report's data-mix shares mapped onto eval.py's families
  Rewards                overlong_penalty, count_reflections, concision_penalty
  GRPO                   leave_one_out, keep_informative (dynamic sampling), policy_loss (clip + IcePop)
  Rollouts               Rollout, parse_mixture / default_mixture, draw_tasks, rollout (generate_batch),
                         reward (score_many + shaping)
  Update                 token_logprobs, micro_batches (plain rows, or a prompt shared by its G completions),
                         update (several optimizer steps per rollout batch)
  main                   the stage: arguments, setup, start evaluation, loop, checkpoints, final evaluation,
                         report card; comparison (the SFT -> RL table it prints)

Footguns
- Rollouts sample at temperature 1 with no top-k / top-p, so the sampler's log-probabilities (generate_batch)
  and the trainer's (token_logprobs, ids < n_vocab) describe the same distribution; on CPU fp32 rho is ~1 and the
  IcePop mask never fires, it matters with bf16 / FP8 inference.
- With --updates 1, pi_old is the live policy itself (detached): the ratio is exactly 1 and the loss is the plain
  token-level policy gradient. With k > 1 the rollout batch is split into k mini-batches, each one optimizer step;
  their pi_old is recomputed before the first step, so mini-batch j trains on data j steps stale (the report's
  asynchronous rollouts allow staleness <= 2).
- share_prefix (tiny's default): the update reads a group's prompt once, its G completions after it in the same
  row, each seeing the prompt and itself (model.SharedPrefix); log-probabilities and the policy gradient are those
  of the plain rows up to rounding, but the router's balancing and z losses count each prompt token once, not G
  times. Off for mellum2-12b: G long completions in one row would be one enormous attention mask.
- MTP is not trained (frozen: no loss, no weight decay). The router keeps SFT's balancing and z losses (our
  choice: the report lists none for RL, and without them a small router falls back to a few experts), so the
  objective is the policy gradient plus two small regularisers of the routing.
- The length cap of a completion is min(--max-new-tokens, context - its prompt's length);
  prompts that leave fewer than MIN_NEW_TOKENS are never drawn (on `tiny`, context 256, function_call's tool lists
  do not fit, and calculator leaves ~70 tokens). The cap counts injected tool results: the default mixture leaves
  out families whose reference answers mostly exceed it (tiny's 64: kv_store's episodes take ~110 tokens,
  agentic_code's ~170), and --tasks with such a family warns; give --max-new-tokens 256 to train them.
- Rewards come from eval.score: un-scoreable output (unclosed turn, bad tool JSON, Thinking without a think block)
  gets 0, before shaping. On a family the model never solves, the overlong penalty is the only signal left, and it
  shortens answers (measured: Instruct's function_call format rate fell from 0.94 to 0.68): the default mixture
  keeps the families the SFT stage trained on; with --tasks, choose families with non-zero pass rates.
- The held-out evaluation runs before (metrics.jsonl, step 0) and after training on the same tasks: two
  evaluations, a third to a half of a `tiny` run's time; --eval-tasks 0 skips both.
"""
import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as E
import model as M
import muon
import sample
import train

# -----------------------------------------------------------------------------
# Recipes

EPS_LOW, EPS_HIGH = 0.2, 0.28   # clip-higher (the report's, after DAPO)
ICEPOP = (0.5, 5.0)             # keep tokens whose rho lies in this closed interval (the report's)
OVERSAMPLE = 1.5                # prompts drawn per kept group (the report's ~1.5x)
MIN_NEW_TOKENS = 16             # a prompt must leave at least this many new tokens in the context


@dataclass
class RLRecipe:
    prompts: int        # P: groups trained per step (all ranks), after dynamic sampling
    samples: int        # G: completions per prompt
    steps: dict         # per variant
    max_new_tokens: dict  # per variant: the length cap of a rollout (tool results included)
    lr: float
    warmup: int
    updates: int        # optimizer steps per rollout batch (mini-batches); unpublished, our choice
    micro_batch: int    # sequences per forward in the update
    aux_coef: float     # balancing loss per MoE layer: SFT's (pre-training's / 10), so RL keeps the router balanced
    max_tool_turns: int = 10
    z_coef: float = 1e-3
    share_prefix: bool = False  # the update's rows hold a prompt once and its G completions (model.SharedPrefix)


RL_RECIPES = {
    # The report: 256 prompts x 16 samples, Instruct 500 steps at 16K tokens, Thinking 100 steps at 40,960, LR 1e-6
    # after 50 warmup iterations, up to 10 tool turns.
    "mellum2-12b": RLRecipe(prompts=256, samples=16, steps={"instruct": 500, "thinking": 100},
                            max_new_tokens={"instruct": 16_384, "thinking": 40_960}, lr=1e-6, warmup=50, updates=2,
                            micro_batch=1, aux_coef=1e-4),  # 16 x 16K-token completions: no shared rows
    # CPU minutes (our choice, measured in RESULTS.md): a 4-layer model takes a far larger LR than 12B parameters,
    # but AdamW normalises every step to ~LR whatever the signal: at 1e-3 the rollouts' noise wrecked the SFT skills
    # within 15-80 steps, at 1e-4 nothing moved in 40. 32 prompts per step halve the noise of 16; the steps fit the
    # 15-minute budget on 2 cores.
    "tiny": RLRecipe(prompts=32, samples=8, steps={"instruct": 150, "thinking": 70},
                     max_new_tokens={"instruct": 64, "thinking": 128}, lr=3e-4, warmup=5, updates=2, micro_batch=32,
                     aux_coef=0.01, share_prefix=True),
}
RL_RECIPES["test"] = RL_RECIPES["tiny"]

# The report's RL data mix (code 22%, math 23-28%, agentic tool use 12-14%, instruction following 19-21%,
# reasoning 13%, knowledge 4-9%) on eval.py's families: code -> python; math -> math + arithmetic + chain; agentic
# tool use -> calculator (executed), function_call (BFCL-style), kv_store (a stateful environment) and agentic_code
# (read, patch, test), equal shares (ours); instruction following -> identity (the only instruction family we
# have). Reasoning and knowledge have no family here and are left out.
RL_MIXTURE = {"python": 22, "math": 8.5, "arithmetic": 8.5, "chain": 8, "calculator": 3.25, "function_call": 3.25,
              "kv_store": 3.25, "agentic_code": 3.25, "identity": 20}

# -----------------------------------------------------------------------------
# Rewards: the verifier's score, plus shaping

# Concision (Instruct, correct answers only): reflection words counted in the answer, the penalty of the highest
# tier reached. The report names the idea ("wait", "hmm", ... in three tiers); the words and constants are ours.
REFLECTION_WORDS = ("wait", "hmm", "actually", "let me check", "double-check", "on second thought", "re-check")
CONCISION_TIERS = ((1, 0.05), (3, 0.1), (6, 0.2))  # (at least this many reflection words, penalty)


def overlong_penalty(length, cap, buffer):
    """DAPO's soft overlong punishment: 0 up to cap - buffer tokens, then linear down to -1 at the cap (and -1
    beyond it)."""
    if length <= cap - buffer:
        return 0.0
    if length <= cap:
        return (cap - buffer - length) / buffer
    return -1.0


def count_reflections(text):
    low = text.lower()
    return sum(len(_word_spans(low, w)) for w in REFLECTION_WORDS)


def _word_spans(text, word):
    """Start offsets of `word` as a whole word (so "waiter" is not "wait")."""
    out, i = [], text.find(word)
    while i >= 0:
        before = text[i - 1] if i else " "
        after = text[i + len(word)] if i + len(word) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            out.append(i)
        i = text.find(word, i + 1)
    return out


def concision_penalty(text, correct, variant):
    if variant != "instruct" or not correct:
        return 0.0
    n = count_reflections(text)
    return -max((p for at_least, p in CONCISION_TIERS if n >= at_least), default=0.0)


# -----------------------------------------------------------------------------
# GRPO: advantages, dynamic sampling, the clipped token-level loss with IcePop

def leave_one_out(rewards):
    """(..., G) rewards -> (..., G) advantages R_i - mean_{j != i} R_j, without std normalisation."""
    G = rewards.size(-1)
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)


def keep_informative(groups, limit):
    """Dynamic sampling: the first `limit` groups (lists of rewards) whose rewards are not all equal; returns their
    indices and the number of groups dropped for zero variance."""
    informative = [i for i, g in enumerate(groups) if max(g) != min(g)]
    return informative[:limit], len(groups) - len(informative)


def policy_loss(logp, logp_old, logp_inf, adv, mask, norm, eps_low=EPS_LOW, eps_high=EPS_HIGH, icepop=ICEPOP):
    """The clipped, IcePop-weighted token-level loss of one micro-batch, and its counts.

    All per-token tensors have one shape: logp = log pi_theta (with grad), logp_old = log pi_old (the trainer's,
    with the rollout weights), logp_inf = the sampler's, adv = the token's advantage, mask = valid tokens.
    loss = -sum_t [M(rho_t) * rho_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)] / norm, with
    r = pi_theta / pi_old, rho = pi_old / pi_inf, M(rho) = 1 inside the closed interval `icepop`, else 0.
    Returns (loss, {"icepop_masked", "clipped", "valid"}) where the counts are over mask."""
    rho = (logp_old - logp_inf).exp()
    keep = mask & (rho >= icepop[0]) & (rho <= icepop[1])
    ratio = (logp - logp_old).exp()
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = torch.minimum(unclipped, clipped) * torch.where(keep, rho, torch.zeros_like(rho))
    loss = -per_token.sum() / norm
    with torch.no_grad():
        clip_active = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
        stats = {"icepop_masked": (mask & ~keep).sum().item(), "clipped": (keep & clip_active).sum().item(),
                 "valid": mask.sum().item()}
    return loss, stats


# -----------------------------------------------------------------------------
# Rollouts

@dataclass
class Rollout:
    family: str
    group: int              # index of its prompt in the step's draw on this rank
    prompt: list            # ids
    tokens: list            # everything after the prompt (sampled + injected tool results)
    logprobs: list          # the sampler's, per token (0.0 for injected ones)
    trained: list           # False for injected tokens: never trained
    cap: int                # the length cap it was generated under
    score: float = 0.0      # the verifier's reward
    correct: bool = False
    reward: float = 0.0     # score + shaping
    advantage: float = 0.0
    text: str = field(default="", repr=False)


def parse_mixture(specs):
    """["python:22", "math"] -> {family: weight} (a bare family weighs 1)."""
    out = {}
    for s in specs:
        name, _, w = s.partition(":")
        if name not in E.FAMILIES or name in E.EVAL_ONLY:
            trainable = [f for f in E.FAMILIES if f not in E.EVAL_ONLY]
            raise data.InputError(f"--tasks: {name!r} is not a trainable family; choose from "
                                  f"{', '.join(trainable)} (as family or family:weight)")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise data.InputError(f"--tasks {s}: the weight after ':' must be a number") from None
    return out


def reference_tokens(tok, task, variant):
    """New tokens an ideal rollout of `task` takes: its reference turns after the prompt, tool results included, and
    for Thinking a think block in every assistant turn that has a trace."""
    conv = E.reference_conversation(task)
    n = len(data.render_chat(tok, conv, "instruct")[0].ids) - len(data.render_prompt(tok, task.messages, task.tools))
    if variant == "thinking":
        turns = [m for m in task.reference if m["role"] == "assistant"]
        traces = [m.get("reasoning") for m in turns[:-1]] + [task.reasoning or turns[-1].get("reasoning")]
        n += sum(len(tok.encode(f"<think>\n{r}\n</think>\n\n")) for r in traces if r)
    return n - 1  # the newline after the last <|im_end|> is never generated


def _mostly(tasks, ok):
    return sum(map(ok, tasks)) >= len(tasks) // 2


def default_mixture(tok, ctx_len, trained=None, max_new=None, variant="instruct"):
    """RL_MIXTURE over the families SFT trained on (`trained`, from the SFT checkpoint's meta; None: all), without
    those whose prompts mostly do not fit the context, or (given max_new) whose reference answers mostly exceed the
    length cap. RL sharpens what SFT taught: on a family the model never solves every group has equal rewards and
    is dropped, or worse, see the module footguns."""
    def fits(family):
        tasks = [E.make_task(family, s) for s in E.task_seeds(family, "train", 20)]
        return (_mostly(tasks, lambda t: len(data.render_prompt(tok, t.messages, t.tools)) + MIN_NEW_TOKENS <= ctx_len)
                and (max_new is None or _mostly(tasks, lambda t: reference_tokens(tok, t, variant) <= max_new)))
    return {f: w for f, w in RL_MIXTURE.items() if (trained is None or f in trained) and fits(f)}


def draw_tasks(mixture, n, rng, tok, ctx_len, max_new):
    """n training tasks drawn from the {family: weight} mixture with rng; tasks whose prompt leaves fewer than
    MIN_NEW_TOKENS (or than the cap, whichever is smaller) in the context are skipped."""
    families, weights = zip(*mixture.items())
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise data.InputError(f"the prompts of {sorted(mixture)} do not fit the model's context of {ctx_len} "
                                  f"tokens with {MIN_NEW_TOKENS} new ones; choose other --tasks")
        task = E.make_task(rng.choices(families, weights)[0], rng.randrange(E.TEST_SEED0))
        prompt = data.render_prompt(tok, task.messages, tools=task.tools)
        if len(prompt) + min(MIN_NEW_TOKENS, max_new) <= ctx_len:
            out.append((task, prompt))
    return out


def rollout(model, tok, drawn, n_samples, max_new, gen, gen_batch, max_tool_turns):
    """G completions of each drawn (task, prompt), ordered by group, and the tool steps' {"seconds", "calls"}
    (environment steps, sandbox runs included, inside generation). Prompts are decoded gen_batch at a time, sorted
    by length (less left padding); each prompt's cap is max_new or what it leaves of the context, whichever is less
    (its own, whatever the batch: gen_batch changes the speed, not the rollouts' caps)."""
    ctx_len = model.config.max_position_embeddings
    order = sorted(range(len(drawn)), key=lambda i: len(drawn[i][1]))
    out, tools = [], {"seconds": 0.0, "calls": 0}
    for b in range(0, len(order), gen_batch):
        idx = order[b:b + gen_batch]
        tasks = [drawn[i][0] for i in idx]
        caps = [min(max_new, ctx_len - len(drawn[i][1])) for i in idx]
        hook = E.make_tool_hook(tok, tasks, max_tool_turns)
        comps = sample.generate_batch(model, [drawn[i][1] for i in idx], caps, n_samples=n_samples, temperature=1.0,
                                      generator=gen, stop_tokens=(tok.special[E.IM_END],), n_vocab=tok.n_vocab,
                                      tool_hook=hook)
        tools["seconds"] += hook.seconds
        tools["calls"] += hook.calls
        for c in comps:
            i = idx[c.prompt_index]
            out.append(Rollout(drawn[i][0].family, i, drawn[i][1], c.tokens, c.logprobs, c.trained,
                               caps[c.prompt_index], text=tok.decode(c.tokens)))
    return sorted(out, key=lambda r: r.group), tools  # stable: samples keep their order within a group


def reward(rows, tasks, variant, workers, overlong):
    """Score every rollout with eval.py's verifiers (code: `workers` sandboxes at once), then shape: reward =
    score + overlong penalty (the last `overlong` fraction of its cap) + concision penalty."""
    scores = E.score_many([tasks[r.group] for r in rows], [r.text for r in rows], variant, workers)
    for r, s in zip(rows, scores):
        r.score, r.correct = s.reward, s.correct
        r.reward = (s.reward + overlong_penalty(len(r.tokens), r.cap, max(1, round(overlong * r.cap)))
                    + concision_penalty(r.text, s.correct, variant))


# -----------------------------------------------------------------------------
# The update

def token_logprobs(model, x, tgt, n_vocab, mask, shared=None):
    """log pi(tgt | x) at the positions in `mask` (B, T) over ids < n_vocab at temperature 1 (the sampler's
    distribution), 0 elsewhere; and their summed entropy (detached). The head runs at the masked positions only.
    shared: x is a model.SharedPrefix layout."""
    logp_N, entropy_N = model(x, at=mask, score=tgt[mask], n_vocab=n_vocab, shared=shared)
    logp = torch.zeros(x.shape, dtype=logp_N.dtype, device=x.device)
    logp[mask] = logp_N
    return logp, entropy_N.sum().item()


def _layout(rows):
    """One row of the update for rollouts `rows` of one prompt: the prompt once, then each completion as its own
    segment (model.SharedPrefix). Completion token j is predicted at its segment's slot j, whose input is the token
    before it (the prompt's last for j = 0) at position len(prompt) - 1 + j, as in the plain row prompt + completion:
    with one rollout, this *is* that row (positions 0, 1, ..., one causal sequence)."""
    prompt = rows[0].prompt
    if any(r.prompt != prompt for r in rows):
        raise ValueError("a shared-prefix row holds the rollouts of one prompt")
    p = len(prompt) - 1
    out = dict(x=prompt[:-1], pos=list(range(p)), seg=[0] * p, tgt=[0] * p, y=[-1] * p, logp_inf=[0.0] * p,
               adv=[0.0] * p)
    for s, r in enumerate(rows, 1):
        n = len(r.tokens)
        out["x"] += (prompt[-1:] + r.tokens)[:n]
        out["pos"] += range(p, p + n)
        out["seg"] += [s] * n
        out["tgt"] += r.tokens
        out["y"] += [t if trained else -1 for t, trained in zip(r.tokens, r.trained)]
        out["logp_inf"] += r.logprobs
        out["adv"] += [r.advantage] * n
    return out


_PAD = dict(x=0, pos=0, seg=-1, tgt=0, y=-1, logp_inf=0.0, adv=0.0)


def micro_batches(rows, size, device, share_prefix=False):
    """Right-padded tensors for rollouts `rows`, `size` sequences per forward, rows of similar lengths together:
    x (inputs), tgt (the completion's ids at the positions that predict them), y (tgt where the token is trained,
    else -1: train.token_normaliser counts it), logp_inf and adv per position, shared (None). share_prefix: one row
    per group, its prompt once and its completions after it (`shared` the model.SharedPrefix layout), size // G
    groups per forward: at RL's tiny shapes the prompt is ~90% of every sequence."""
    if share_prefix:
        groups = {}
        for r in rows:
            groups.setdefault(r.group, []).append(r)
        layouts = [_layout(g) for g in groups.values()]
        size = max(1, size // max(map(len, groups.values()), default=1))
    else:
        layouts = [_layout([r]) for r in rows]
    layouts.sort(key=lambda lay: len(lay["x"]))
    out = []
    for b in range(0, len(layouts), size):
        chunk = layouts[b:b + size]
        T = max(len(lay["x"]) for lay in chunk)
        mb = {k: torch.tensor([lay[k] + [pad] * (T - len(lay[k])) for lay in chunk]).to(device)
              for k, pad in _PAD.items()}
        mb["shared"] = M.SharedPrefix(mb.pop("pos"), mb.pop("seg")) if share_prefix else None
        out.append(mb)
    return out


def _empty_micro_batch(device):
    """One token, nothing trained: a rank short of micro-batches runs it so that DDP's gradient sync still meets
    every rank (its loss, and so its gradient, is zero)."""
    z = torch.zeros(1, 1, device=device)
    return dict(x=z.long(), tgt=z.long(), y=z.long() - 1, logp_inf=z, adv=z, shared=None)


def _agree(n, ctx, op):
    """n combined over ranks (DDP ranks must run the same number of forwards and backwards)."""
    if not ctx.ddp:
        return n
    t = torch.tensor([n], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op)
    return t.item()


def update(ctx, model, opt, rows, n_vocab, updates, micro, grad_clip, aux_coef=0.0, z_coef=0.0, share_prefix=False):
    """`updates` optimizer steps over the rollout batch `rows` (this rank's share), split into as many mini-batches
    of whole groups. The loss is the policy loss plus, per optimizer step, the router's balancing and z losses
    (aux_coef, z_coef: as in SFT, so that RL does not undo the balance). share_prefix: each group's prompt is read
    once (micro_batches), the same log-probabilities up to rounding; the router's losses then count each prompt
    token once, not G times. Returns the step's statistics (token counts summed over ranks)."""
    raw = train.unwrap(model)
    groups = sorted({r.group for r in rows})
    parts = [set(groups[i::updates]) for i in range(updates)]
    minis = [micro_batches([r for r in rows if r.group in part], micro, ctx.device, share_prefix) for part in parts]
    # pi_old: the rollout policy's log-probabilities, computed before any update and in the training forward's
    # precision (ctx.autocast), so the ratio and IcePop's rho mean the same in every mini-batch. Mini-batch 0 uses
    # the live policy, detached: the same weights and precision, and then the ratio is exactly 1.
    with torch.no_grad(), ctx.autocast():
        for mbs in minis[1:]:
            for mb in mbs:
                mb["logp_old"] = token_logprobs(model, mb["x"], mb["tgt"], n_vocab, mb["y"] != -1, mb["shared"])[0]
    stats = dict(icepop_masked=0.0, clipped=0.0, valid=0.0, entropy=0.0, loss=0.0, aux=0.0, grad_norm=0.0)
    for mbs in minis:
        n_micro = int(_agree(len(mbs), ctx, dist.ReduceOp.MAX))
        if n_micro == 0:
            continue
        norm = train.token_normaliser([(None, mb["y"]) for mb in mbs], ctx)[0]
        raw.reset_router_counts()  # the balancing loss counts this optimizer step's micro-batches (and ranks)
        for i in range(n_micro):
            mb = mbs[i] if i < len(mbs) else _empty_micro_batch(ctx.device)
            with train.grad_sync(model, i == n_micro - 1), ctx.autocast():
                mask = mb["y"] != -1
                logp, entropy = token_logprobs(model, mb["x"], mb["tgt"], n_vocab, mask, mb["shared"])
                logp_old = mb.get("logp_old", logp.detach())
                loss, s = policy_loss(logp, logp_old, mb["logp_inf"], mb["adv"], mask, norm)
                aux, z = raw.router_losses([m for m in raw.moe_layers() if m.count_E is not None], logp)
            (loss + (aux_coef * aux + z_coef * z) / n_micro).backward()
            for k in ("icepop_masked", "clipped", "valid"):
                stats[k] += s[k]
            stats["entropy"] += entropy
            stats["loss"] += loss.item() / len(minis)
            stats["aux"] += aux.item() / n_micro / len(minis)
        stats["grad_norm"] += train.optimizer_step(model, opt, grad_clip) / len(minis)
    for k in ("icepop_masked", "clipped", "valid", "entropy", "loss", "aux"):
        stats[k] = _agree(stats[k], ctx, dist.ReduceOp.SUM)
    stats["loss"] /= ctx.world_size
    stats["aux"] /= ctx.world_size
    return stats


# -----------------------------------------------------------------------------
# The script

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    # --- run
    ap.add_argument("--from", dest="init", required=True, help="the SFT checkpoint directory (out/sft/instruct)")
    ap.add_argument("--variant", choices=("instruct", "thinking"), default=None,
                    help="default: the checkpoint's (sft.py records it), else instruct")
    ap.add_argument("--out-dir", default=None, help="default: out/rl/{variant}")
    ap.add_argument("--preset", default=None, choices=list(RL_RECIPES),
                    help="the RL recipe (default: the checkpoint's preset, else tiny)")
    ap.add_argument("--resume", action="store_true", help="continue --out-dir from its latest checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--seed", type=int, default=1337)
    # --- rollouts
    ap.add_argument("--tasks", nargs="+", default=None, help="family[:weight] ... (default: the report's mix, "
                    "RL_MIXTURE, over the families the SFT stage trained on whose prompts fit the context)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None, help="P: groups per step over all ranks")
    ap.add_argument("--samples", type=int, default=None, help="G: completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="length cap of a rollout")
    ap.add_argument("--overlong-buffer", type=float, default=0.2, help="the soft overlong penalty covers this "
                    "fraction of the cap (DAPO: 4,096 of 20,480 tokens)")
    ap.add_argument("--gen-batch", type=int, default=16, help="prompts decoded together (x G rows)")
    ap.add_argument("--workers", type=int, default=4, help="sandboxes running at once")
    # --- optimisation
    ap.add_argument("--lr", type=float, default=None, help="default: the recipe's (mellum2-12b 1e-6, the report's)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--updates", type=int, default=None, help="optimizer steps per rollout batch (1: plain PG)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per forward in the update")
    ap.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=None,
                    help="the update reads each prompt once for its G completions (default: the recipe's; tiny on)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    # --- checkpoints, evaluation
    ap.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks per family at start and end "
                    "(0: no evaluation)")
    ap.add_argument("--eval-samples", type=int, default=8, help="samples per task: pass@1 and pass@k")
    ap.add_argument("--report-card", default=E.REPORT_CARD)
    train.add_stage_args(ap, 10, parallel_help="auto: DDP (the rollouts need whole weights on every rank)")
    return ap.parse_args(argv)


def evaluate(model, tok, families, args, variant, cap, out_dir, log):
    """eval.py's held-out evaluation of the trained families (greedy, pass@1, pass@k)."""
    model.eval()
    res = E.evaluate(model, tok, families, args.eval_tasks, args.eval_samples, variant, max_new_tokens=cap,
                     seed=args.seed, workers=args.workers, out_dir=out_dir, log=log)
    model.train()
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.parallel == "fsdp":
        raise data.InputError("--parallel fsdp: rlvr.py generates rollouts with whole weights on every rank; use ddp")
    ctx = train.compute_init(args.device, dtype=args.dtype)
    log = tqdm.write if ctx.master else None

    # --- the starting checkpoint (never written to), its tokenizer, variant and recipe
    raw, tok, meta0 = train.load_model(args.init, device=ctx.device)
    variant = args.variant or meta0.get("variant", "instruct")
    preset = args.preset or meta0.get("preset") or M.preset_of(raw.config) or "tiny"
    recipe = RL_RECIPES.get(preset, RL_RECIPES["tiny"])
    steps = args.steps or recipe.steps[variant]
    P, G = args.prompts or recipe.prompts, args.samples or recipe.samples
    max_new = args.max_new_tokens or recipe.max_new_tokens[variant]
    lr, warmup = args.lr or recipe.lr, recipe.warmup if args.warmup is None else args.warmup
    updates, micro = args.updates or recipe.updates, args.micro_batch or recipe.micro_batch
    share_prefix = recipe.share_prefix if args.share_prefix is None else args.share_prefix
    ctx_len = raw.config.max_position_embeddings
    mixture = (parse_mixture(args.tasks) if args.tasks
               else default_mixture(tok, ctx_len, meta0.get("data"), max_new, variant))
    if not mixture:
        raise data.InputError(f"none of the SFT stage's families ({', '.join(meta0.get('data', {}))}) is in the RL "
                              f"mixture and fits the context of {ctx_len} and the cap of {max_new}: choose --tasks")
    for f in mixture if args.tasks else ():  # an explicit choice is kept, but a cap it cannot meet is named
        need = sorted(reference_tokens(tok, E.make_task(f, s), variant) for s in E.task_seeds(f, "train", 20))[10]
        if need > max_new and ctx.master:
            print(f"rlvr: warning: {f}'s reference answers take ~{need} new tokens (tool results included), more than "
                  f"the cap of {max_new}: most rollouts will be cut and score 0; raise --max-new-tokens")
    if P % ctx.world_size or G < 2:
        raise data.InputError(f"--prompts {P} must be a multiple of the {ctx.world_size} ranks and --samples {G} at "
                              "least 2 (leave-one-out needs a second sample)")
    out_dir = args.out_dir or os.path.join("out", "rl", variant)
    if os.path.abspath(out_dir) == os.path.abspath(args.init):
        raise data.InputError(f"--out-dir {out_dir} is the starting checkpoint's directory; the reference checkpoint "
                              "stays untouched: choose another --out-dir")
    if ctx.master:
        shared = " (each prompt read once)" if share_prefix else ""
        print(f"rlvr {variant} from {args.init} ({preset} recipe): {steps} steps x {P} prompts x {G} samples "
              f"(oversampled {OVERSAMPLE}x), cap {max_new} new tokens, {updates} update(s) per batch{shared}, AdamW "
              f"lr {lr} (warmup {warmup}), tasks {mixture}, tokenizer {tok.name}, world {ctx.world_size}, device "
              f"{ctx.device}")
    if args.dry_run:
        return train.compute_cleanup(ctx)

    # --- model and optimizer: MTP frozen (not trained here), AdamW (0.9, 0.999) over everything else
    if raw.mtp is not None:
        raw.mtp.requires_grad_(False)
    raw.train()
    model = train.wrap_model(ctx, raw, "ddp")
    opt = muon.MuonAdamW(muon.param_groups(raw, lr, args.weight_decay, adamw_only=True), betas=(0.9, 0.999))
    meta = dict(stage=f"rl-{variant}", variant=variant, tokenizer=tok.name, preset=preset, init=args.init,
                args=vars(args))
    step = train.resume(out_dir, raw, opt, None, ctx, print) if args.resume else 0
    if step >= steps:
        if ctx.master:
            print(f"rlvr: {out_dir} is already complete at step {step}")
        return train.compute_cleanup(ctx)
    os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    train.start_tracking(args, out_dir, ctx)
    families = sorted(mixture)
    if step == 0 and ctx.master:
        open(metrics, "w").close()  # a fresh run starts a fresh log
        if args.eval_tasks:  # where RL starts from, for the record: the same held-out tasks as the final evaluation
            start = evaluate(raw, tok, families, args, variant, max_new, None, log)
            train.log_metrics(metrics, dict(step=0, eval=start), ctx, echo=False)

    # --- the loop: rollouts (generation + rewards), dynamic sampling, advantages, the update
    bar = tqdm(range(step, steps), desc=f"rl-{variant}", disable=not ctx.master, dynamic_ncols=True, initial=step,
               total=steps)
    first = step
    for step in bar:
        lr_mult = train.whd_schedule(step, steps, warmup, 0)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        # every rank draws its own prompts; draws and samples are functions of (seed, step, rank): exact resume
        rng = random.Random(f"{args.seed}:{step}:{ctx.rank}")
        gen = torch.Generator(device=ctx.device).manual_seed(args.seed * 1_000_003 + step * 1009 + ctx.rank)
        t0 = time.perf_counter()
        raw.eval()
        drawn = draw_tasks(mixture, math.ceil(P // ctx.world_size * OVERSAMPLE), rng, tok, ctx_len, max_new)
        rows, tools = rollout(raw, tok, drawn, G, max_new, gen, args.gen_batch, recipe.max_tool_turns)
        raw.train()
        t1 = time.perf_counter()
        reward(rows, [t for t, _ in drawn], variant, args.workers, args.overlong_buffer)
        t2 = time.perf_counter()

        # dynamic sampling, then leave-one-out advantages within each kept group
        groups = [rows[i * G:(i + 1) * G] for i in range(len(drawn))]
        kept, dropped = keep_informative([[r.reward for r in g] for g in groups], P // ctx.world_size)
        for i in kept:
            adv = leave_one_out(torch.tensor([r.reward for r in groups[i]], dtype=torch.float64))
            for r, a in zip(groups[i], adv.tolist()):
                r.advantage = a
        stats = update(ctx, model, opt, [r for i in kept for r in groups[i]], tok.n_vocab, updates, micro,
                       args.grad_clip, recipe.aux_coef, recipe.z_coef, share_prefix)
        t3 = time.perf_counter()
        record = step_record(ctx, raw, step, rows, groups, kept, dropped, stats, families, lr * lr_mult,
                             (t0, t1, t2, t3), tools)
        train.log_metrics(metrics, record, ctx, echo=False)
        if ctx.master and (step + 1) % args.log_every == 0:
            tqdm.write(log_line(record))
        bar.set_postfix(reward=f"{record['reward']:.3f}")
        if train.save_if_due(ctx, out_dir, step + 1, steps, first, args, raw, opt, meta, None, log, "rlvr"):
            break
    bar.close()

    # --- held-out evaluation of the trained families, and this stage's column of the report card
    if step + 1 == steps and args.eval_tasks and ctx.master:
        end = evaluate(raw, tok, families, args, variant, max_new, out_dir, log)
        train.log_metrics(metrics, dict(step=steps, eval=end), ctx, echo=False)
        card = E.update_report_card(args.report_card, f"{variant}-RL", end)
        start = next((r["eval"] for r in map(json.loads, open(metrics)) if r.get("step") == 0 and "eval" in r), None)
        print(comparison(start, end, args.eval_samples) + f"\nreport card: {card}")
    train.compute_cleanup(ctx)


def step_record(ctx, raw, step, rows, groups, kept, dropped, stats, families, lr, times, tools):
    """The step's log record: rewards over every rollout of all ranks, token statistics over the trained ones;
    times on this rank: t_gen the rollouts, t_tools the tool steps inside them (tool_calls of them), t_reward the
    verifiers (episode replays and hidden tests included), t_update the update."""
    pooled = [dict(family=r.family, reward=r.reward, correct=r.correct, length=len(r.tokens)) for r in rows]
    if ctx.ddp:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, pooled)
        pooled = [x for part in everyone for x in part]
    n_groups, n_dropped = _agree(len(groups), ctx, dist.ReduceOp.SUM), _agree(dropped, ctx, dist.ReduceOp.SUM)
    rewards = torch.tensor([x["reward"] for x in pooled], dtype=torch.float64)
    valid = max(stats["valid"], 1)
    t0, t1, t2, t3 = times
    return dict(step=step + 1, reward=rewards.mean().item(), reward_std=rewards.std().item(),
                pass_rate={f: sum(x["correct"] for x in pooled if x["family"] == f)
                           / max(1, sum(x["family"] == f for x in pooled)) for f in families},
                zero_var=n_dropped / n_groups, kept_groups=int(_agree(len(kept), ctx, dist.ReduceOp.SUM)),
                icepop_masked=stats["icepop_masked"] / valid, clip_frac=stats["clipped"] / valid,
                entropy=stats["entropy"] / valid, length=sum(x["length"] for x in pooled) / len(pooled),
                tokens=int(stats["valid"]), loss=stats["loss"], aux=stats["aux"], imbalance=train.imbalance(raw),
                grad_norm=stats["grad_norm"], lr=lr,
                t_gen=t1 - t0, t_tools=tools["seconds"], tool_calls=tools["calls"], t_reward=t2 - t1,
                t_update=t3 - t2)


def log_line(r):
    return (f"step {r['step']:4d} | reward {r['reward']:.3f} ± {r['reward_std']:.3f} | pass "
            + " ".join(f"{f[:5]} {v:.2f}" for f, v in r["pass_rate"].items())
            + f" | zero-var {r['zero_var']:.2f} | icepop {r['icepop_masked']:.3f} | clip {r['clip_frac']:.3f} | len "
            f"{r['length']:.0f} | H {r['entropy']:.2f} | imbalance {r['imbalance']:.2f} | gnorm {r['grad_norm']:.2f} "
            f"| gen {r['t_gen']:.1f}s (tools {r['t_tools']:.1f}s, {r['tool_calls']} calls) reward {r['t_reward']:.1f}s "
            f"update {r['t_update']:.1f}s")


def comparison(start, end, k):
    """Markdown table: greedy accuracy, pass@1 and pass@k per family at the start (SFT) and the end (RL), with
    standard errors, and the pass@1 gain in standard errors: paired over the same test tasks (eval.paired_gain),
    and unpaired (the two errors in quadrature), which ignores that both runs answer the same tasks."""
    keys = ["greedy_acc", "pass@1"] + ([f"pass@{k}"] if k > 1 else [])
    lines = ["| task | " + " | ".join(f"{key} {when}" for key in keys for when in ("SFT", "RL"))
             + " | pass@1 gain | z paired | z unpaired |", "|---" * (2 * len(keys) + 4) + "|"]
    for f, m in end.items():
        s = (start or {}).get(f)
        cells = [f"{ms[key]:.3f} ± {ms[key + '_se']:.3f}" if ms and key in ms else "–"
                 for key in keys for ms in (s, m)]
        gain = paired = unpaired = "–"
        if s and "pass@1" in s and "pass@1" in m:
            g, se, z = E.paired_gain(s, m)
            unpaired_se = math.hypot(s["pass@1_se"], m["pass@1_se"])
            gain = f"{g:+.3f} ± {se:.3f}"
            paired = "–" if z is None else f"{z:+.1f}"
            unpaired = f"{g / unpaired_se:+.1f}" if unpaired_se > 0 else "–"
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {gain} | {paired} | {unpaired} |")
    return "\n".join(lines)


if __name__ == "__main__":
    train.run(main, "rlvr.py")
