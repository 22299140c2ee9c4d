"""
Long-context extension of a pre-trained Mellum 2 base with layer-selective YaRN (Mellum 2 report: the base is
extended to 128K). YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071) rescales RoPE on the full-attention
layers only; the sliding-window layers keep their RoPE, because they never attend further than the window. The
script continues training the base at factor x its context on long documents plus a small share of synthetic
passkey-retrieval sequences, then prints how far the model can see: passkey accuracy and loss by position for
(a) the base beyond its context, (b) YaRN without training, (c) after extension.

CPU, the `tiny` preset (256 -> 1024 tokens), from pre-training's final checkpoint:
    python extend.py --from out/pretrain/phase3
    python extend.py --from out/pretrain/phase3 --eval-only     # the table again (and before training)
One GPU:
    python extend.py --from out/pretrain/phase3 --factor 16 --batch-size 1 --global-batch 8
Many GPUs (DDP for small models, FSDP2 above 2B parameters, as in pretrain.py); a mellum2-12b base gets the
report's settings by default (factor 16 from 8,192, 3,500 iterations, peak LR 3e-5, 500 decay iterations):
    torchrun --nnodes=32 --nproc_per_node=8 ... extend.py --from out/pretrain/phase3
Checkpoints, metrics and --resume are train.py's: out/extend/step_{step}/ (DCP: any world size reads it),
metrics.jsonl. The extended config (rope_parameters per layer type, full_attention with rope_type "yarn") travels
in every checkpoint and in train.save_pretrained's config.json, so later stages and transformers reproduce it.

Contents, top to bottom:
  extend_config              YaRN config surgery on the full-attention layers; composes with an earlier extension
  step_memory_bytes          rough peak memory of a step at a context length, checked before anything is allocated
  passkey_sample             filler text with "The pass key is N" at a depth, then the question and the answer
  LongContextLoader          (B, T) rows of long documents (+ a passkey share); seeded per row, resumable by step
  passkey_accuracy, loss_by_position, evaluate_extension, format_tables   the built-in evaluation
  Recipe, RECIPES             the report's settings for a mellum2-12b base, CPU-sized ones otherwise
  main                       arguments, compute, data, model, evaluation before, the training loop, evaluation after

Footguns:
- `--factor` multiplies the checkpoint's *current* context. An already extended checkpoint (YaRN factor s0 from
  context L0) is extended again by composing: YaRN factor s0 * factor, still relative to L0, because the
  frequencies YaRN interpolates are the ones the model was pre-trained with at L0.
- Passkey accuracy is greedy exact match computed by teacher forcing: every answer token must be the argmax given
  the true previous ones, which is exactly "greedy decoding reproduces the key's tokens". A greedy continuation
  that spells the key with other tokens counts as wrong.
- The YaRN ramp follows the reference code and transformers (linear in the dimension index between floor/ceil
  bounds), not the paper's text (linear in the number of rotations); both agree outside the ramp band.
- Evaluation runs the same samples on every rank (it is not split across ranks): FSDP needs every rank in every
  forward, and the numbers stay identical to a single-process run.
- The memory check is an estimate (activations saved for backward, fp32 logits, (T, T) masks of sliding layers
  when no Triton kernel runs); on CPU it came within 10% of the measured peak RSS of tiny-preset training steps
  of 2K to 8K tokens. --skip-memory-check when you know better.
"""
import argparse
import copy
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import kernels
import model as M
import muon
import train

# -----------------------------------------------------------------------------
# YaRN config surgery: the full-attention layers only

BETA_FAST, BETA_SLOW = 32.0, 1.0  # the paper's beta = 32, alpha = 1 (Sec. 3.2): rotation counts bounding the ramp


def extend_config(config, factor):
    """A copy of `config` whose full-attention layers use YaRN for `factor` x the current context; sliding layers,
    and everything else, unchanged. max_position_embeddings becomes the new context."""
    if not factor >= 1:  # `not >=` also refuses NaN
        raise ValueError(f"--factor {factor}: the extension factor must be >= 1 (it multiplies the context)")
    if M.FULL not in config.layer_types:
        raise ValueError("the model has no full-attention layer: sliding layers never see beyond their window, so "
                         "there is nothing for YaRN to extend")
    full = config.rope_parameters[M.FULL]
    kind = full.get("rope_type", "default")
    if kind == "default":
        original, previous = config.max_position_embeddings, 1.0
    elif kind == "yarn":
        original, previous = full["original_max_position_embeddings"], full["factor"]
    else:
        raise ValueError(f"rope_parameters['{M.FULL}'] has rope_type {kind!r}; extend.py composes only with "
                         "'default' or 'yarn'")
    new = copy.deepcopy(config)
    new.rope_parameters[M.FULL] = {
        "rope_type": "yarn", "rope_theta": full["rope_theta"], "factor": previous * factor,
        "original_max_position_embeddings": original,
        "beta_fast": full.get("beta_fast", BETA_FAST), "beta_slow": full.get("beta_slow", BETA_SLOW)}
    new.max_position_embeddings = round(config.max_position_embeddings * factor)
    return new


# -----------------------------------------------------------------------------
# Memory: refuse a context that cannot fit, before allocating it

LOGIT_CHUNK = 256  # positions per lm_head call in the evaluation: full-vocabulary logits of a long row are large


def step_memory_bytes(config, batch_size, seq_len, device, training=True):
    """Rough peak bytes of one training step (fp32 weights, grads, optimizer state, activations saved for backward,
    fp32 logits of the main and MTP heads) or of one no-grad evaluation forward (one layer alive at a time)."""
    D, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
    H, K, hd, V = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size
    c = M.count_params(config)
    n_params = c["total"] + c["mtp_total"]
    act = 2 if device.type == "cuda" else 4  # bf16 autocast on GPU, fp32 on CPU
    mlp_types = config.mlp_layer_types + ["sparse"] * config.num_mtp_layers

    def layer(mlp):  # elements per token one decoder layer keeps: norms, q/k/v before and after QK-norm + RoPE, MLP
        attn = 8 * D + 4 * (H + 2 * K) * hd
        return attn + (2 * E + k * (3 * D + 5 * config.moe_intermediate_size) if mlp == "sparse"
                       else 5 * config.intermediate_size)

    tokens = batch_size * seq_len
    # without the Triton kernel, a sliding layer longer than its window attends through a (T, T) boolean mask (CPU's
    # fused attention takes it without materialising the scores; backward keeps each layer's mask), unless it
    # attends in blocks of the window (kernels.attends_in_blocks decides), whose masks are small
    dense = config.sliding_window < seq_len and not kernels.attends_in_blocks(seq_len, config.sliding_window)
    mask = seq_len * seq_len if dense and not kernels.use_kernels(device) else 0
    if not training:
        return n_params * 4 + tokens * max(map(layer, mlp_types)) * act + mask + batch_size * LOGIT_CHUNK * V * 8
    n_sliding = (config.layer_types + [M.SLIDING] * config.num_mtp_layers).count(M.SLIDING)
    logits = tokens * V * 4 * 3 * (1 + config.num_mtp_layers)  # logits, log-softmax, their gradient
    return 4 * n_params * 4 + tokens * sum(map(layer, mlp_types)) * act + logits + n_sliding * mask


def available_bytes(device):
    """Free memory of the device: CUDA's free bytes, or MemAvailable on Linux; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_memory(config, batch_size, seq_len, device, training=True):
    need, have = step_memory_bytes(config, batch_size, seq_len, device, training), available_bytes(device)
    if have is not None and need > have:
        what = "training step" if training else "evaluation forward"
        raise MemoryError(
            f"a {what} at context {seq_len:,} with batch size {batch_size} needs about {need / 2**30:.1f} GiB, but "
            f"{device} has {have / 2**30:.1f} GiB free: lower --batch-size (--global-batch stays, in more "
            "micro-batches), lower --factor, run on a GPU with the Triton kernels, or pass --skip-memory-check if "
            "the estimate is too pessimistic")


# -----------------------------------------------------------------------------
# Data: long documents from token shards, plus synthetic passkey retrieval (Mohtashami & Jaggi 2023,
# https://arxiv.org/abs/2305.16300)

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the filler placed before the needle
# default-corpus sources with long documents (whole files, docs; math problems are a few hundred tokens and carry no
# long range) and repository-level FIM documents (the report's extension data); the shares are our choice
LONG_DOC_WEIGHTS = {"code": 0.5, "prose": 0.3, "repo": 0.2}


def passkey_sample(tok, filler, n_tokens, depth, key):
    """(ids (n_tokens,), answer length): <|endoftext|>, filler with the needle after `depth` of it, the question,
    then the answer " {key}" as the last tokens."""
    needle, question, answer = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION), tok.encode(f" {key}")
    n_fill = n_tokens - 1 - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"a passkey sample of {n_tokens} tokens is too short: <|endoftext|>, the needle, question "
                         f"and answer alone take {n_tokens - n_fill} tokens")
    if len(filler) < n_fill:
        raise ValueError(f"a passkey sample of {n_tokens} tokens needs {n_fill} filler tokens, got {len(filler)}")
    cut = round(depth * n_fill)
    ids = [tok.eot, *filler[:cut], *needle, *filler[cut:n_fill], *question, *answer]
    return np.array(ids, dtype=np.int64), len(answer)


class DocStream:
    """One source's token shard (documents back to back, each opened by <|endoftext|>)."""

    def __init__(self, path, eot):
        self.path, self.eot = path, eot
        self.tokens = data.read_shard(path)
        self.starts = data.doc_starts(self.tokens, eot)
        if len(self.starts) == 0:
            self.starts = np.zeros(1, dtype=np.int64)
        self.ends = np.append(self.starts[1:], len(self.tokens))

    def window(self, rng, n):
        """n tokens starting at a document picked with probability proportional to its length (long documents fill
        whole rows), at a random offset when the document is longer than n; a short document runs on into the next
        ones of the shard."""
        if len(self.tokens) < n:
            raise data.InputError(f"{self.path} has {len(self.tokens):,} tokens, fewer than a row of {n:,}: use a "
                                  "larger corpus or a smaller --factor")
        d = max(0, np.searchsorted(self.starts, rng.integers(len(self.tokens)), side="right") - 1)
        start, end = int(self.starts[d]), int(self.ends[d])
        if end - start > n:
            start += int(rng.integers(end - start - n + 1))
        start = min(start, len(self.tokens) - n)
        return np.asarray(self.tokens[start:start + n], dtype=np.int64)

    def filler(self, rng, n):
        """n tokens of running text without document separators (the passkey's haystack is one document)."""
        parts, have = [], 0
        while have < n:
            w = self.window(rng, n)
            parts.append(w[w != self.eot])
            have += len(parts[-1])
        return np.concatenate(parts)[:n]


class LongContextLoader:
    """(B, T) batches for the extension. Row g of step s draws, from a generator seeded by (seed, s, g), its source
    (by weight) and then either a long-document window or, with probability passkey_share, a passkey sequence at a
    random depth. Rank r builds rows [r*B, (r+1)*B) of the global batch, so N ranks together see exactly what one
    process with batch N*B sees, and the state is just the step."""

    def __init__(self, sources, tok, batch_size, seq_len, passkey_share=0.1, rank=0, world_size=1, seed=0):
        if not 0 <= passkey_share <= 1:
            raise data.InputError(f"passkey_share={passkey_share} must be in [0, 1]")
        self.names = sorted(n for n, (_, w) in sources.items() if w > 0)
        if not self.names:
            raise data.InputError(f"no source with a positive weight in {sources}")
        self.streams = {n: DocStream(sources[n][0], tok.eot) for n in self.names}
        weights = np.array([sources[n][1] for n in self.names], dtype=np.float64)
        self.p = weights / weights.sum()
        self.tok, self.batch_size, self.seq_len, self.passkey_share = tok, batch_size, seq_len, passkey_share
        self.rank, self.world_size, self.seed, self.step = rank, world_size, seed, 0
        if passkey_share > 0:  # fail now rather than at the first passkey row
            passkey_sample(tok, np.zeros(seq_len + 1, dtype=np.int64), seq_len + 1, 0.5, 99_999)

    def row(self, step, g):
        rng = np.random.default_rng([self.seed, step, g])
        stream = self.streams[self.names[rng.choice(len(self.names), p=self.p)]]
        n = self.seq_len + 1
        if rng.random() < self.passkey_share:
            key = int(rng.integers(10_000, 100_000))
            return passkey_sample(self.tok, stream.filler(rng, n), n, rng.random(), key)[0]
        return stream.window(rng, n)

    def next_batch(self):
        B = self.batch_size
        batch = torch.from_numpy(np.stack([self.row(self.step, g) for g in range(self.rank * B, (self.rank + 1) * B)]))
        self.step += 1
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "passkey_share": self.passkey_share,
                "global_batch": self.batch_size * self.world_size,
                "weights": {n: float(p) for n, p in zip(self.names, self.p)}}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("seed", "seq_len", "passkey_share", "global_batch", "weights"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]} but this run has {mine[key]}: resume with the "
                                 "settings of the checkpointed run")
        self.step = int(state["step"])


def val_rows(streams, n_rows, seq_len, seed=0):
    """(n_rows, seq_len + 1) fixed validation rows, sources taken in turn."""
    names = sorted(streams)
    return torch.from_numpy(np.stack([streams[names[i % len(names)]].window(np.random.default_rng([seed, i]),
                                                                            seq_len + 1) for i in range(n_rows)]))


def passkey_eval_set(tok, streams, lengths, trials, seed=0):
    """{(length, depth): (ids (trials, length + 1), answer lengths)}: the model reads `length` tokens."""
    names, out = sorted(streams), {}
    for length in lengths:
        for j, depth in enumerate(DEPTHS):
            rng = np.random.default_rng([seed, length, j])
            samples = [passkey_sample(tok, streams[names[t % len(names)]].filler(rng, length + 1), length + 1, depth,
                                      int(rng.integers(10_000, 100_000))) for t in range(trials)]
            out[length, depth] = (torch.from_numpy(np.stack([s[0] for s in samples])), [s[1] for s in samples])
    return out


# -----------------------------------------------------------------------------
# Evaluation: passkey retrieval and loss by position

def _hidden(model, x, ctx):
    if hasattr(model, "reshard"):  # FSDP2: `hidden` must unshard like forward does
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, "hidden")
    with ctx.autocast():
        return model.hidden(x.to(ctx.device))


@torch.no_grad()
def passkey_accuracy(model, ids, answer_lens, ctx):
    """Greedy exact match by teacher forcing: the key counts as retrieved when every answer token is the argmax
    given the prompt and the previous answer tokens (= greedy decoding would produce those tokens)."""
    model.eval()
    A = max(answer_lens)
    h = _hidden(model, ids[:, :-1], ctx)[:, -A:]  # the positions that predict the last A tokens
    with ctx.autocast():
        pred = model.lm_head(h).argmax(-1).cpu()
    return sum(bool((pred[i, A - a:] == ids[i, -a:]).all()) for i, a in enumerate(answer_lens)) / len(answer_lens)


@torch.no_grad()
def loss_by_position(model, rows, edges, ctx):
    """Mean next-token CE of rows (N, T+1) in each position bucket [edges[b], edges[b+1]) of the input."""
    model.eval()
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    for row in rows:
        h = _hidden(model, row[None, :-1], ctx)[0]
        y = row[1:].to(ctx.device)
        with ctx.autocast():
            ce = torch.cat([F.cross_entropy(model.lm_head(h[i:i + LOGIT_CHUNK]).float(), y[i:i + LOGIT_CHUNK],
                                            reduction="none") for i in range(0, len(y), LOGIT_CHUNK)]).cpu()
        sums += torch.stack([ce[lo:hi].double().mean() for lo, hi in zip(edges[:-1], edges[1:])])
    return (sums / len(rows)).tolist()


def eval_lengths(context, extended):
    """context, 2x, 4x, ... below the extended length, then the extended length."""
    lengths = [context * 2**i for i in range(64) if context * 2**i < extended]
    return lengths + [extended]


def evaluate_extension(model, passkeys, rows, edges, ctx):
    return {"passkey": {key: passkey_accuracy(model, ids, alens, ctx) for key, (ids, alens) in passkeys.items()},
            "loss": loss_by_position(model, rows, edges, ctx)}


def format_tables(results, context, lengths, trials, title):
    """Two markdown tables: passkey (mean over depths) + loss by position bucket, then passkey by depth."""
    edges = [0] + lengths
    lines = [f"### {title}", "",
             f"Passkey: greedy exact match, mean over {len(DEPTHS)} depths x {trials} keys. "
             f"Loss: validation CE of {lengths[-1]:,}-token rows by position.", "",
             "| model | " + " | ".join(f"passkey @{n:,} ({n / context:g}x)" for n in lengths) + " | "
             + " | ".join(f"loss {lo:,}-{hi:,}" for lo, hi in zip(edges[:-1], edges[1:])) + " |",
             "|---" * (1 + 2 * len(lengths)) + "|"]
    for name, r in results.items():
        acc = [np.mean([r["passkey"][n, d] for d in DEPTHS]) for n in lengths]
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in acc) + " | "
                     + " | ".join(f"{v:.3f}" for v in r["loss"]) + " |")
    lines += ["", "Passkey by depth (share of the filler before the key):", "",
              "| model | length | " + " | ".join(f"{d:.0%}" for d in DEPTHS) + " |", "|---" * (2 + len(DEPTHS)) + "|"]
    for name, r in results.items():
        for n in lengths:
            lines.append(f"| {name} | {n:,} | " + " | ".join(f"{r['passkey'][n, d]:.2f}" for d in DEPTHS) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The script

@dataclass
class Recipe:
    factor: float
    steps: int
    lr: float
    warmup: int
    decay: int  # the last `decay` steps fall linearly to zero (Warmup-Hold-Decay)
    micro_batch: int
    global_batch: int  # sequences per optimizer step
    aux_coef: float    # balancing-loss coefficient per MoE layer: the base's pre-training one


RECIPES = {
    # The Mellum 2 report: factor 16 from 8,192 (-> 131,072), 3,500 iterations (~117B tokens, so ~256 sequences of
    # 131,072 tokens per step), WHD with peak LR 3e-5 and 500 decay iterations. Warmup unpublished: 100 is our choice.
    "mellum2-12b": Recipe(factor=16, steps=3500, lr=3e-5, warmup=100, decay=500, micro_batch=1, global_batch=256,
                          aux_coef=1e-3),
    # CPU-sized (tiny: 256 -> 1,024 tokens): a short warmup, then decay all the way (RESULTS.md's measured run). The
    # balancing coefficient is tiny's pre-training 0.1: at 1e-3 a small router collapses (pretrain.py's RECIPES).
    "default": Recipe(factor=4, steps=60, lr=1e-3, warmup=6, decay=54, micro_batch=2, global_batch=2, aux_coef=0.1),
}



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    # --- run
    ap.add_argument("--from", dest="base", required=True,
                    help="base checkpoint: a training stage's directory (latest step) or a Hugging Face directory")
    ap.add_argument("--factor", type=float, default=None, help="multiply the checkpoint's context by this (default: "
                    "16 for a mellum2-12b base, the report's; 4 otherwise)")
    ap.add_argument("--out-dir", default="out/extend")
    ap.add_argument("--resume", action="store_true", help="continue from --out-dir's latest checkpoint")
    ap.add_argument("--eval-only", action="store_true", help="only the table: the base, YaRN without training, and "
                    "--out-dir's latest checkpoint when there is one")
    # --- data
    ap.add_argument("--mixture", default=None, help="JSON/TOML mixture file: its last phase's sources and weights "
                    f"(default: the embedded corpus, {LONG_DOC_WEIGHTS})")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch: sequences per rank per forward")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step")
    ap.add_argument("--passkey-share", type=float, default=0.1, help="share of rows that are passkey retrieval")
    ap.add_argument("--seed", type=int, default=1337)
    # --- optimisation: Warmup-Hold-Decay (defaults: the recipe for the base, RECIPES)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (3e-5 for mellum2-12b, the report's; 1e-3 for "
                    "the CPU presets)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps")
    ap.add_argument("--decay", type=int, default=None, help="steps of the final linear decay to zero")
    ap.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the MTP loss (the report's 0.1)")
    ap.add_argument("--aux-coef", type=float, default=None, help="balancing-loss coefficient per MoE layer (default: "
                    "the base's pre-training one, 1e-3 for mellum2-12b, 0.1 on the CPU presets)")
    # --- evaluation, checkpoints, logging
    ap.add_argument("--passkey-trials", type=int, default=4, help="keys per (length, depth)")
    ap.add_argument("--eval-rows", type=int, default=8, help="validation rows at the extended length")
    ap.add_argument("--eval-every", type=int, default=20)
    train.add_stage_args(ap, 50)
    ap.add_argument("--skip-memory-check", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = train.compute_init(args.device, dtype=args.dtype)
    torch.manual_seed(args.seed + ctx.rank)
    log = print if ctx.master else (lambda *a, **k: None)

    # --- the base, its recipe and the extended config; refuse what cannot work before the long context is allocated
    base, tok, _ = train.load_model(args.base)
    recipe = train.recipe_for(RECIPES, base.config)
    B = args.batch_size or recipe.micro_batch
    global_batch = args.global_batch or max(recipe.global_batch, B * ctx.world_size)
    n_micro = train.micro_batches(global_batch, B, ctx.world_size)
    steps, lr = args.steps or recipe.steps, args.lr or recipe.lr
    aux_coef = recipe.aux_coef if args.aux_coef is None else args.aux_coef
    warmup = args.warmup if args.warmup is not None else min(recipe.warmup, steps)
    decay = args.decay if args.decay is not None else min(recipe.decay, steps - warmup)
    try:
        config = extend_config(base.config, args.factor or recipe.factor)
    except ValueError as e:
        raise data.InputError(str(e)) from None
    context, T = base.config.max_position_embeddings, config.max_position_embeddings
    yarn = config.rope_parameters[M.FULL]
    if base.config.rope_parameters[M.FULL].get("rope_type") == "yarn":
        log(f"{args.base} is already extended (YaRN x{base.config.rope_parameters[M.FULL]['factor']:g} from "
            f"{yarn['original_max_position_embeddings']:,}): composing to YaRN x{yarn['factor']:g}, context {T:,}")
    if not args.skip_memory_check:
        if not args.eval_only:
            check_memory(config, B, T, ctx.device, training=True)
        check_memory(config, args.passkey_trials, T, ctx.device, training=False)

    # --- data: long documents (train), fixed rows and passkeys from the validation split; rank 0 builds the shards
    mixture = data.load_mixture(args.mixture)
    phase = max(mixture.phases)
    weights = mixture.phases[phase].weights if args.mixture else LONG_DOC_WEIGHTS
    if ctx.ddp and not ctx.master:
        dist.barrier()
    shards = data.prepare_data(mixture, tok, data_dir=args.data_dir, phases=(phase,), log=log, extra=tuple(weights))
    if ctx.ddp and ctx.master:
        dist.barrier()
    sources = {n: (shards[n].train, w) for n, w in weights.items() if w > 0}
    val_streams = {n: DocStream(shards[n].val, tok.eot) for n in sources}
    lengths = eval_lengths(context, T)
    rows = val_rows(val_streams, args.eval_rows, T)
    passkeys = passkey_eval_set(tok, val_streams, lengths, args.passkey_trials)
    edges = [0] + lengths

    # --- (a) the base beyond its context, (b) the same weights with YaRN, before any training
    results = {"base (no YaRN)": evaluate_extension(base.to(ctx.device), passkeys, rows, edges, ctx)}
    raw = M.Mellum(config)
    raw.load_state_dict(base.state_dict())
    del base
    raw.to(ctx.device)
    results[f"YaRN x{yarn['factor']:g}, no training"] = evaluate_extension(raw, passkeys, rows, edges, ctx)
    name = f"YaRN x{yarn['factor']:g}, extended {{}} steps"
    if args.eval_only:  # (c) from --out-dir's latest checkpoint, when there is one
        step = train.latest_step(args.out_dir)
        if step is not None:
            trained, _, _ = train.load_model(args.out_dir, step, device=ctx.device)
            if train.config_to_hf(trained.config) != train.config_to_hf(config):
                raise data.InputError(f"{args.out_dir} holds a model extended from another base or factor than "
                                      f"--from {args.base} --factor {yarn['factor']:g}")
            results[name.format(step)] = evaluate_extension(trained, passkeys, rows, edges, ctx)
        log(format_tables(results, context, lengths, args.passkey_trials, _title(args, config, context, T, ctx)))
        train.compute_cleanup(ctx)
        return results

    # --- (c) extension training: data, model, optimizer, resume
    loader = LongContextLoader(sources, tok, B, T, args.passkey_share, rank=ctx.rank, world_size=ctx.world_size,
                               seed=args.seed)
    val = [(r[:, :-1], r[:, 1:]) for r in rows.split(B)]
    parallel = train.choose_parallel(args.parallel, config)
    model = train.wrap_model(ctx, raw, parallel)
    opt = muon.MuonAdamW(muon.param_groups(model, lr, 0.1, adamw_only=args.optimizer == "adamw"),
                         ns_dtype=ctx.ns_dtype)
    step = train.resume(args.out_dir, raw, opt, loader, ctx, log) if args.resume else 0
    meta = dict(stage="extend", tokenizer=tok.name, extended_from=os.path.abspath(args.base),
                factor=yarn["factor"], args=vars(args))
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    os.makedirs(args.out_dir, exist_ok=True)
    train.start_tracking(args, args.out_dir, ctx)
    log(f"extend: context {context:,} -> {T:,} (YaRN x{yarn['factor']:g} on the full-attention layers: "
        f"{config.layer_types.count(M.FULL)}; sliding layers unchanged: {config.layer_types.count(M.SLIDING)}), "
        f"{steps} steps of {global_batch} x {T:,} tokens, {args.optimizer} lr {lr} (warmup {warmup}, decay to 0 over "
        f"the last {decay}), aux {aux_coef}, passkey share {args.passkey_share}, device {ctx.device}, world "
        f"{ctx.world_size} ({parallel})")

    # --- the loop
    first, fpt = step, M.flops_per_token(config, T)
    if step == 0:
        train.log_metrics(metrics, dict(step=0, val_loss=train.evaluate(model, val, ctx)), ctx)
    for step in tqdm(range(step, steps), desc="extend", disable=not ctx.master, dynamic_ncols=True, initial=step,
                     total=steps):
        batches = [loader.next_batch() for _ in range(n_micro)]
        record = train.train_step(ctx, model, raw, opt, batches, train.whd_schedule(step, steps, warmup, decay),
                                  args.out_dir, step, 1.0, fpt, mtp_weight=args.mtp_weight, aux_coef=aux_coef)
        train.log_metrics(metrics, record, ctx, echo=(step + 1) % args.log_every == 0)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            train.log_metrics(metrics, dict(step=step + 1, val_loss=train.evaluate(model, val, ctx)), ctx)
        if train.save_if_due(ctx, args.out_dir, step + 1, steps, first, args, raw, opt, meta, loader, log, "extend"):
            break
    step = train.latest_step(args.out_dir)

    # --- (c) after extension
    results[name.format(step)] = evaluate_extension(raw, passkeys, rows, edges, ctx)
    log(format_tables(results, context, lengths, args.passkey_trials, _title(args, config, context, T, ctx)))
    train.compute_cleanup(ctx)
    return results


def _title(args, config, context, T, ctx):
    return (f"Layer-selective YaRN: context {context:,} -> {T:,} ({os.path.basename(args.base.rstrip('/'))}, "
            f"{config.num_hidden_layers} layers, {ctx.device.type})")


if __name__ == "__main__":
    train.run(main, "extend.py")
