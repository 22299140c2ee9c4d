"""
Supervised fine-tuning of a Mellum 2 base into the Instruct and the Thinking model (Mellum 2 report, "SFT"): two
runs from the same base, as Mellum 2 released two models. Instruct trains on every assistant turn and drops the
reasoning; Thinking trains on the final assistant turn with its <think> trace, unfolds multi-turn conversations into
up to 5 samples and leaves conversations without reasoning out (data.render_chat). Loss = masked next-token CE over
the trained tokens of the whole global batch + 0.1 MTP CE (the head keeps drafting for speculative decoding on chat
text) + 1e-4 global-batch balancing loss + 1e-3 router z-loss, the report's coefficients (the balancing coefficient
is pre-training's / 10 per preset: 0.01 on tiny, whose router collapses at 1e-4).

CPU, `tiny` (from the last pre-training / extension stage that exists: out/extend, else out/pretrain/phase3, ...):
    python sft.py --variant instruct
    python sft.py --variant thinking --from out/pretrain/phase3
    python sft.py --variant instruct --mixture my_sft.json      # built-in task families + your JSONL files
    python sample.py --ckpt out/sft/instruct --chat             # then chat with it (tools run, think shown apart)
One GPU: the same commands. Many GPUs (DDP below 2B parameters, FSDP2 above, as in pretrain.py):
    torchrun --nproc_per_node=8 sft.py --variant thinking --from out/extend

Data. The built-in mixture is eval.py's task families rendered from their reference conversations (train seeds
only; eval's test seeds and test prompts are never trained on), identity dialogues oversampled 3x as in the report
(RECIPES: all families for mellum2-12b; for the CPU presets the ones tiny learns in 10 minutes, see RESULTS.md).
A mixture file adds JSONL or Parquet files in the report's schema ({"messages", optional "tools", optional
"reasoning"}, see data.load_conversations; a source's "column" names another messages column of its Parquet files)
and sets every source's weight: how many times each of its conversations is seen per epoch (3 = the report's
oversampling; a fraction keeps a seeded share). JSON or TOML:
    {"sources": {"mine": {"paths": ["chats/*.jsonl"]}, "smol": {"paths": ["smoltalk/*.parquet"]}},
     "weights": {"arithmetic": 1, "python": 1, "identity": 3, "mine": 2, "smol": 1}, "tasks_per_family": 400}
Samples are best-fit packed into rows of --seq-len tokens (data.pack_best_fit); a sample longer than a row is
dropped and counted, never truncated. The rows are packed once and visited in a new seeded order every epoch.

A draft for a checkpoint that ships none (--mtp-only): the released checkpoints carry no MTP weights, and a fine-tune
made with transformers loses any draft it had. --mtp-only trains the MTP block alone on the frozen model: backbone,
embedding and head take no gradient and have no optimizer state; the block (fresh, or --mtp-init continue: the
model's own) learns the main head's own distribution at the next position as a soft target (self-distillation:
the prediction its drafts are verified against), on the stage's conversations or (--mtp-data self) on the model's
own continuations of their prompts. It writes a stage checkpoint and a Hugging Face directory (MTP under mtp.*,
which transformers ignores), and the greedy draft acceptance before / after on held-out prompts (acceptance.json):
    python sft.py --mtp-only --from out/hf/instruct                   # a Hugging Face directory without MTP weights
    python sft.py --mtp-only --from out/sft/instruct --mtp-data self --out-dir out/sft/instruct-mtp
    python sample.py --ckpt out/sft/mtp/hf --speculative --temperature 0
One GPU, a released checkpoint (its own tokenizer.json is read by `tokenizers` and copied to the output):
    python sft.py --mtp-only --from Mellum2-12B-A2.5B-Instruct --seq-len 8192 --out-dir out/instruct-mtp
On a GPU the frozen backbone is held in bf16; torchrun replicates it on every rank and averages the block's
gradients (no DDP / FSDP wrapping). Rows of 8K suffice: the MTP layer attends over a window of 1,024.

Checkpoints, metrics, --resume and --stop-after are train.py's: out/sft/{variant}/, metrics.jsonl. At the end the
final model is evaluated with eval.py on held-out test seeds of every built-in family it trained on, against the
base on the same prompts (eval_base.jsonl, measured once before training), and its column of the report card
(out/report_card.md) is written.

Contents, top to bottom
  Recipe, RECIPES                 the report's settings for a mellum2-12b base, CPU-sized ones otherwise
                                  (train.recipe_for picks one)
  cosine_schedule                 warmup, then cosine to 10% of the peak (the report's 3e-5 -> 3e-6)
  load_sft_mixture, conversations, build_samples   sources -> weighted conversations -> rendered ChatSamples
  SFTLoader                       packed rows, a seeded order per epoch, split across ranks, exactly resumable
  default_source                  the base to start from when --from is not given
  eval_table                      base vs SFT greedy accuracy, the gain in paired standard errors, as markdown
  --mtp-only pieces               mtp_distill_loss (soft targets, chunked: _SoftTargetCE), prepare_mtp_only (freeze,
                                  fresh block), mtp_only_step, self_generated (--mtp-data self), draft_acceptance
  main                            arguments, compute, base, data, model, optimizer, loop, save, evaluation
  main_mtp_only                   the same skeleton for --mtp-only, plus the Hugging Face directory

Footguns
- The optimizer state of the base is not reused: a fresh Muon + AdamW. The base's state belongs to another loss
  landscape (pre-training text) and ends a decay to LR 0, and an HF-format base has none; SFT warms up instead.
- For `tiny` the recipe trains at 512 tokens although the base saw 256: the calculator and function-calling
  conversations take 220-440 tokens with their tool schemas. The checkpoint's config records 512. Positions
  beyond 256 are new only to the full-attention layer (RoPE theta 500k); sliding layers see 64 at most.
- Packed conversations attend to the ones before them in their row (the project-wide choice, data.py), only the
  masks keep their loss apart.
- Resuming checks the loader's data fingerprint: changing the mixture, the tokenizer, --seq-len or the seed refuses
  to resume.
- --mtp-only keeps the recipe's rows (for tiny: 512 tokens) and records their length as the context, like SFT; the
  backbone's weights are untouched, so its logits equal the base's. Its LR is the recipe's mtp_lr (pre-training's
  peak: the block is new), not SFT's. The stage checkpoint holds the whole model (the frozen part included).
- Generation of the evaluation runs on rank 0 alone after the other ranks have left (it reads the final checkpoint
  back with train.load_model, so it works the same after DDP and FSDP2).
"""
import argparse
import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import time
import tomllib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as E
import model as M
import muon
import sample as S
import train

# -----------------------------------------------------------------------------
# Recipes and the schedule

FAMILIES = tuple(f for f in E.FAMILIES if f not in E.EVAL_ONLY)  # the built-in sources: eval.py's task families


@dataclass
class Recipe:
    lr: float
    warmup: int
    epochs: int
    micro_batch: int
    global_batch: int       # rows per optimizer step
    min_seq_len: int        # rows are max(this, the base's context) tokens
    tasks_per_family: dict  # train conversations drawn from each built-in family of the mixture
    weights: dict           # the built-in mixture: family -> times each of its conversations is seen per epoch
    eval_tasks: int         # held-out test tasks per family at the end
    aux_coef: float         # balancing loss per MoE layer: the base's pre-training coefficient / 10 (the report's
    #                         1e-3 -> 1e-4); tiny's router, pre-trained at 0.1, collapses at 1e-4
    mtp_lr: float           # --mtp-only: peak LR of the MTP block, pre-training's peak (our choice: a fresh block
    #                         learns from scratch; SFT's LR is for weights that are trained already)


RECIPES = {
    # The report: LR 3e-5 -> 3e-6 cosine after 100 warmup iterations, 3 epochs, rows of the extended context
    # (131,072). Batch size unpublished: 32 rows of 128K (4M tokens) is our choice.
    "mellum2-12b": Recipe(lr=3e-5, warmup=100, epochs=3, micro_batch=1, global_batch=32, min_seq_len=0,
                          tasks_per_family=dict.fromkeys(FAMILIES, 100_000),
                          weights=dict.fromkeys(FAMILIES, 1) | {"identity": 3}, eval_tasks=200, aux_coef=1e-4,
                          mtp_lr=3e-4),
    # CPU-sized, measured on `tiny` (RESULTS.md): peak 1e-2, a third of pre-training's 3e-2 (3e-3 learned too slowly
    # for a 10-minute run), rows of 512 so tool conversations fit. Batches of 4 rows: at equal tokens, 258 steps of
    # 4 rows took the Thinking trace of `chain` to 76% where 129 steps of 8 rows reached 14%. The families tiny can
    # learn in 10 CPU minutes, with as many conversations as fit: arithmetic (3-digit numbers are single tokens),
    # math and calculator measured ~0 after SFT (RESULTS.md) and are left out. The two episode families (kv_store,
    # agentic_code: 280-500 tokens with their tool schemas, about a row each) cost more steps than the rest together.
    "default": Recipe(lr=1e-2, warmup=10, epochs=3, micro_batch=4, global_batch=4, min_seq_len=512,
                      tasks_per_family=dict.fromkeys(FAMILIES, 400) | {"chain": 3000, "python": 800, "identity": 100},
                      weights={"chain": 1, "function_call": 1, "python": 1, "identity": 3, "kv_store": 1,
                               "agentic_code": 1}, eval_tasks=100, aux_coef=0.01, mtp_lr=3e-2),
}



def cosine_schedule(step, total, warmup, floor=0.1):
    """LR multiplier at `step` of `total`: linear warmup over `warmup` steps, then a cosine from 1 down to `floor`,
    reached at the last step (step total - 1). The report: 3e-5 -> 3e-6, so floor 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# -----------------------------------------------------------------------------
# Data: sources -> conversations -> samples



@dataclass
class SFTMixture:
    paths: dict             # user source -> files
    weights: dict           # source -> conversations seen per epoch per conversation
    tasks_per_family: dict  # built-in family -> train conversations drawn from it
    columns: dict = field(default_factory=dict)  # user source -> the messages column of its Parquet files


def load_sft_mixture(path, tasks_per_family, weights):
    """`weights` and `tasks_per_family` (built-in family -> conversations) of the recipe, or a JSON / TOML file
    (module docstring) whose tasks_per_family is one number for every family or a map over the recipe's; errors
    name the file and the field."""
    if path is None:
        return SFTMixture({}, dict(weights), tasks_per_family)
    with open(path, "rb") as f:
        try:
            spec = tomllib.load(f) if path.endswith(".toml") else json.load(f)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise data.InputError(f"SFT mixture {path} is not valid "
                                  f"{'TOML' if path.endswith('.toml') else 'JSON'}: {e}")
    unknown = set(spec) - {"sources", "weights", "tasks_per_family"}
    if unknown:
        raise data.InputError(f"SFT mixture {path}: unknown keys {sorted(unknown)} (known: sources, weights, "
                              "tasks_per_family)")
    base_dir, paths, columns = os.path.dirname(os.path.abspath(path)), {}, {}
    for name, s in spec.get("sources", {}).items():
        if name in FAMILIES:
            raise data.InputError(f"SFT mixture {path}: source name '{name}' is a built-in task family; rename it")
        if (not isinstance(s, dict) or "paths" not in s or set(s) - {"paths", "column"}
                or not isinstance(s["paths"], list) or not isinstance(s.get("column", ""), str)):
            raise data.InputError(f"SFT mixture {path}: source '{name}' must be {{\"paths\": [\"file.jsonl\", "
                                  "\"shard.parquet\", ...]}, optionally with \"column\": the messages column of "
                                  "its Parquet files (default \"messages\")")
        columns[name] = s.get("column", "messages")
        files = []
        for p in s["paths"]:
            matches = sorted(glob.glob(os.path.join(base_dir, os.path.expanduser(p)), recursive=True))
            if not matches:
                raise FileNotFoundError(f"SFT mixture {path}: source '{name}': '{p}' matches no file")
            files += matches
        paths[name] = files
    weights = spec.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise data.InputError(f"SFT mixture {path}: \"weights\" must map sources to numbers, e.g. "
                              "{\"arithmetic\": 1, \"identity\": 3}")
    for name, w in weights.items():
        if name not in FAMILIES and name not in paths:
            raise data.InputError(f"SFT mixture {path}: weights name unknown source '{name}' (built-in: "
                                  f"{', '.join(FAMILIES)}; declared: {', '.join(paths) or 'none'})")
        if not isinstance(w, (int, float)) or w < 0:
            raise data.InputError(f"SFT mixture {path}: weight of '{name}' is {w!r}; weights are numbers >= 0")
    n = spec.get("tasks_per_family", tasks_per_family)
    n = dict.fromkeys(FAMILIES, n) if isinstance(n, int) else {**tasks_per_family, **n} if isinstance(n, dict) else n
    if not isinstance(n, dict) or not all(f in FAMILIES and isinstance(k, int) and k >= 1 for f, k in n.items()):
        raise data.InputError(f"SFT mixture {path}: tasks_per_family must be a positive integer, or map built-in "
                              f"families to positive integers, got {spec['tasks_per_family']!r}")
    return SFTMixture(paths, {k: float(v) for k, v in weights.items() if v > 0}, n, columns)


def conversations(mixture, seed):
    """{source: conversations of one epoch}: each conversation repeated floor(weight) times, plus a seeded share
    weight - floor(weight) of them once more."""
    out = {}
    for name, w in mixture.weights.items():
        if name in FAMILIES:
            convs = [E.reference_conversation(E.make_task(name, s))
                     for s in E.task_seeds(name, "train", mixture.tasks_per_family[name])]
        else:
            convs = [c for p in mixture.paths[name] for c in data.load_conversations(p, mixture.columns[name])]
        extra = np.random.default_rng([seed, *name.encode()]).permutation(len(convs))[:round((w % 1) * len(convs))]
        out[name] = convs * int(w) + [convs[i] for i in sorted(extra)]
    return out


def build_samples(tok, convs, variant):
    """(samples, stats): every source's conversations rendered for `variant`; stats per source counts the
    conversations, the samples they gave, and (Thinking) the conversations left out for having no reasoning."""
    samples, stats = [], {}
    for name, cs in convs.items():
        rendered = [data.render_chat(tok, c, variant) for c in cs]
        samples += [s for r in rendered for s in r]
        stats[name] = dict(conversations=len(cs), samples=sum(map(len, rendered)),
                           no_reasoning=sum(1 for r in rendered if not r))
    return samples, stats


# -----------------------------------------------------------------------------
# The loader: packed rows, a new order every epoch


class SFTLoader:
    """(B, T) micro-batches of packed SFT rows. The rows are packed once (best fit, a sample that does not fit a
    row is dropped: `dropped`); epoch e visits them in a permutation seeded by (seed, e), epochs back to back.
    Global micro-batch s is rows [s*G, (s+1)*G) of that stream (G = B * world_size) and rank r keeps its B, so N
    ranks see what one process with batch N*B sees. The state is s (plus the data's fingerprint, checked)."""

    def __init__(self, samples, seq_len, batch_size, *, pad, rank=0, world_size=1, seed=0):
        x, y, self.dropped = data.pack_best_fit([s.ids for s in samples], seq_len, masks=[s.mask for s in samples],
                                                split=False, pad=pad)
        if len(x) == 0:
            raise data.InputError(f"no SFT sample fits a row of {seq_len + 1} tokens ({self.dropped} dropped): raise "
                                  "--seq-len or give shorter conversations")
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.batch_size, self.rank, self.world_size, self.seed, self.step = batch_size, rank, world_size, seed, 0
        self.fingerprint = hashlib.sha1(x.tobytes() + y.tobytes()).hexdigest()[:16]
        self._order = (None, None)

    def __len__(self):
        return len(self.x)

    def targets(self):
        return int((self.y != -1).sum())

    def _row(self, i):
        epoch, j = divmod(i, len(self.x))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.x)))
        return self._order[1][j]

    def next_batch(self):
        B, G = self.batch_size, self.batch_size * self.world_size
        rows = [self._row(self.step * G + self.rank * B + b) for b in range(B)]
        self.step += 1
        return self.x[rows], self.y[rows]

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "global_batch": self.batch_size * self.world_size,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("seed", "global_batch", "fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]} but this run has {mine[key]}: resume with the "
                                 "data, tokenizer, --seq-len, --seed and batch of the checkpointed run")
        self.step = int(state["step"])


# -----------------------------------------------------------------------------
# The base, and the evaluation table

SOURCES = ("out/extend", "out/pretrain/phase3", "out/pretrain/phase2", "out/pretrain/phase1")


def default_source():
    """The last pre-training / extension stage that has a checkpoint (the report fine-tunes the extended base)."""
    for path in SOURCES:
        if train.latest_step(path) is not None:
            return path
    raise data.InputError(f"no base checkpoint in {', '.join(SOURCES)}: run `python pretrain.py --phase 1` (and "
                          "2, 3) first, or pass --from DIR (a training stage's directory or a Hugging Face directory)")


def eval_table(base, tuned, variant):
    """Markdown: greedy accuracy of the base and the SFT model per family, ± standard errors, and the gain in units
    of its paired standard error (eval.paired_gain: both models answer the same test tasks)."""
    lines = [f"| family | base | {variant}-SFT | gain / SE | {variant}-SFT format |", "|---|---|---|---|---|"]
    for f, m in tuned.items():
        diff, _, z = E.paired_gain(base[f], m, "greedy_acc")
        gain = f"{z:+.1f}" if z is not None else ("0" if diff == 0 else "inf" if diff > 0 else "-inf")
        lines.append(f"| {f} | {E.card_cell(base[f])} | {E.card_cell(m)} | {gain} | {100 * m['format_rate']:.0f}% |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# --mtp-only: a speculative-decoding draft for a checkpoint that ships none. The MTP block alone learns to agree
# with the frozen model: at position t (reading h_t and token t+1) its distribution for token t+2 is pulled towards
# the main head's own distribution at t+1, the very prediction a draft is verified against (self-distillation).

SOFT_CE_ELEMENTS = 1 << 26  # logits per chunk of the soft cross-entropy: 256 MB in fp32, whatever the vocabulary
MTP_EVAL_TASKS = 10         # --mtp-only: held-out prompts per family for the acceptance table (default)
SELF_MAX_NEW_TOKENS = 128   # --mtp-data self: tokens per continuation, as many as the evaluation generates
SELF_SAMPLING = dict(temperature=0.6, top_k=20, top_p=0.95)  # the report's recommended sampling


def _teacher_student(g, h, W):
    """(p, log q) over the rows of W: the teacher p = softmax(h W^T), the student log q = log_softmax(g W^T), both
    fp32, the matmuls in W's dtype (bf16 for a backbone frozen in bf16) whatever the surrounding autocast."""
    with torch.autocast(g.device.type, enabled=False):
        p = (h.to(W.dtype) @ W.T).float().softmax(-1)
        logq = (g.to(W.dtype) @ W.T).float().log_softmax(-1)
    return p, logq


class _SoftTargetCE(torch.autograd.Function):
    """(sum over rows n of -sum_v p_nv log q_nv (_teacher_student), the same sum of the teacher's entropies
    -sum_v p_nv log p_nv: the difference is the KL, 0 for a perfect draft), `chunk` rows at a time: the (N, V)
    teacher and student never exist whole (at mellum2-12b's 98,304 ids they take 0.4 MB per position each in fp32,
    50 GB for a 128K row). The gradient is made in the same pass, d/dg = (q - p) W since p sums to 1, and kept
    (N, D): three matmuls with W in all, as plain autograd would do, without its (N, V) saved tensors. W is the
    frozen head: no gradient for it or for h."""

    @staticmethod
    def forward(ctx, g, h, W, chunk):
        total, entropy, grad_g = torch.zeros((), device=g.device), torch.zeros((), device=g.device), torch.empty_like(g)
        for i in range(0, len(g), chunk):
            p, logq = _teacher_student(g[i:i + chunk], h[i:i + chunk], W)
            total -= (p * logq).sum()
            entropy -= torch.special.xlogy(p, p).sum()
            with torch.autocast(g.device.type, enabled=False):
                grad_g[i:i + chunk] = ((logq.exp() - p).to(W.dtype) @ W).to(g.dtype)
        ctx.save_for_backward(grad_g)
        ctx.mark_non_differentiable(entropy)
        return total, entropy

    @staticmethod
    def backward(ctx, grad, _):
        (grad_g,) = ctx.saved_tensors
        return grad_g * grad.to(grad_g.dtype), None, None, None


def mtp_moe(model):
    return [m for m in model.mtp.modules() if isinstance(m, M.MoE)]


def mtp_distill_loss(model, x, mask, norm=None, n_vocab=None):
    """The --mtp-only loss of the inputs x (B, T): the MTP block at position t, which reads h_t and token t+1,
    against the main head's distribution at t+1 (its prediction of the same token t+2) as a soft target, both over
    ids < n_vocab (default: all). mask (B, T) marks the positions whose next token is a target (y != -1), as for
    the main CE: the MTP at t counts where mask[:, t+1]. The backbone runs under no_grad; gradients reach the MTP
    block alone (prepare_mtp_only freezes the embedding and head it shares). Returns {"mtp": the summed soft
    cross-entropies / norm (default: their count), "entropy": the teacher's, likewise (mtp - entropy is the KL),
    "aux", "z": the MTP block's router losses, unweighted}."""
    V = min(n_vocab or model.config.vocab_size, model.config.vocab_size)
    with torch.no_grad():
        h = model.hidden(x)  # (B, T, D)
    keep = mask[:, 1:]  # (B, T-1)
    g = model.mtp_hidden(h[:, :-1], x[:, 1:])  # (B, T-1, D)
    W = model.lm_head.weight[:V]
    ce, entropy = _SoftTargetCE.apply(g[keep], h[:, 1:][keep], W, max(1, SOFT_CE_ELEMENTS // V))
    aux, z = model.router_losses(mtp_moe(model), g)
    norm = keep.sum().clamp(min=1) if norm is None else norm
    return {"mtp": ce / norm, "entropy": entropy / norm, "aux": aux, "z": z}


def prepare_mtp_only(model, init, seed, source):
    """The model --mtp-only trains, in place: its own MTP block (init "continue") or a fresh one drawn as
    Mellum.init_weights draws it ("fresh"), and every other parameter frozen (requires_grad False: no gradient
    reaches them, and muon.param_groups leaves them out of the optimizer, so they get no optimizer state)."""
    if init == "continue" and model.mtp is None:
        raise data.InputError(f"--mtp-init continue: {source} has no MTP weights (no mtp.* tensors; released Mellum 2 "
                              "checkpoints ship none): use --mtp-init fresh")
    if init == "fresh":
        model.config.num_mtp_layers = 1
        model.mtp = M.MTP(model.config).to(model.lm_head.weight.device)
        model.init_weights(seed, prefix="mtp")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
    return model


def mtp_only_step(ctx, raw, optimizer, batches, lr_mult, step, n_vocab, aux_coef, z_coef=1e-3, grad_clip=1.0):
    """One --mtp-only optimizer step; returns its log record (train.train_step's, the loss being the distillation).
    The model runs unwrapped on every rank (the frozen backbone replicated: 24 GB in bf16 for mellum2-12b), so the
    MTP block's gradients are averaged over the ranks here. Soft CE is summed over the step's MTP targets and
    divided by their global count (train.token_normaliser), aux and z averaged over the micro-batches."""
    t0 = time.perf_counter()
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_mult
    norm = train.token_normaliser(batches, ctx)[1]
    raw.reset_router_counts()
    parts = torch.zeros(4, device=ctx.device)
    for x, y in batches:
        x, y = x.to(ctx.device), y.to(ctx.device)
        with ctx.autocast():
            losses = mtp_distill_loss(raw, x, y != -1, norm, n_vocab)
            loss = losses["mtp"] + (aux_coef * losses["aux"] + z_coef * losses["z"]) / len(batches)
        loss.backward()
        parts += torch.stack([losses["mtp"], losses["entropy"], losses["aux"] / len(batches),
                              losses["z"] / len(batches)]).detach()
    if ctx.ddp:
        for p in raw.mtp.parameters():
            if p.grad is None:  # a block that saw no target on this rank still joins the all-reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size
        dist.all_reduce(parts)
        parts /= ctx.world_size
    if not torch.isfinite(parts).all():
        raise FloatingPointError(f"non-finite loss at step {step} (mtp, entropy, aux, z = {parts.tolist()}); "
                                 "stopping. Lower --lr or check the data.")
    grad_norm = train.optimizer_step(raw, optimizer, grad_clip)
    tps = sum(x.numel() for x, _ in batches) * ctx.world_size / (time.perf_counter() - t0)
    mtp, entropy, aux, z = parts.tolist()
    return dict(step=step + 1, mtp=mtp, kl=mtp - entropy, aux=aux, z=z, lr=optimizer.param_groups[0]["lr"],
                grad_norm=grad_norm, tok_per_s=tps, imbalance=train.imbalance(raw))


def self_generated(model, tok, convs, seq_len, ctx, seed, batch=32):
    """--mtp-data self: ChatSamples of the model's own continuations of the stage's prompts (every conversation up
    to its first assistant turn, with its tools; SELF_SAMPLING, up to SELF_MAX_NEW_TOKENS or <|im_end|>), the
    continuation trained. Each rank generates every world_size-th prompt; all ranks end with all samples."""
    prompts = []
    for c in (c for cs in convs.values() for c in cs):
        first = next((i for i, m in enumerate(c["messages"]) if m["role"] == "assistant"), None)
        ids = data.render_prompt(tok, c["messages"][:first], c.get("tools")) if first else []
        if 0 < len(ids) < seq_len:
            prompts.append(ids)
    mine = sorted(range(ctx.rank, len(prompts), ctx.world_size), key=lambda i: len(prompts[i]))  # less padding
    gen = torch.Generator(device=ctx.device).manual_seed(seed + ctx.rank)
    stops = (tok.special[data.CHAT_STOP], tok.eot)
    out = []
    for j in tqdm(range(0, len(mine), batch), desc="self-generated data", disable=not ctx.master):
        rows = mine[j:j + batch]
        room = min(SELF_MAX_NEW_TOKENS, seq_len + 1 - len(prompts[rows[-1]]),
                   model.config.max_position_embeddings - len(prompts[rows[-1]]))
        done = S.generate_batch(model, [prompts[i] for i in rows], room, generator=gen, stop_tokens=stops,
                                n_vocab=tok.n_vocab, **SELF_SAMPLING)
        out += [(i, prompts[i] + c.tokens, len(prompts[i])) for i, c in zip(rows, done)]
    if ctx.ddp:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, out)
        out = [s for part in everyone for s in part]
    return [data.ChatSample(ids, [False] * n + [True] * (len(ids) - n)) for _, ids, n in sorted(out)]


@contextlib.contextmanager
def one_dtype(model):
    """The model in one dtype for generation (a KV cache holds one): beside a backbone frozen in bf16, a bf16 copy of
    the MTP block stands in for its fp32 master weights."""
    mtp, dtype = model.mtp, model.lm_head.weight.dtype
    if mtp is not None and mtp.norm.weight.dtype != dtype:
        with torch.device("meta"):
            model.mtp = M.MTP(model.config)
        model.mtp.to_empty(device=model.lm_head.weight.device).to(dtype).load_state_dict(mtp.state_dict())
    try:
        yield model
    finally:
        model.mtp = mtp


def draft_acceptance(model, tok, families, n_tasks, max_new_tokens):
    """{family: {drafted, accepted, rate}}: greedy MTP speculative decoding of n_tasks held-out test prompts per
    family (chat template, stop at <|im_end|>), drafts over all ids < n_vocab."""
    device, context = next(model.parameters()).device, model.config.max_position_embeddings
    out = {}
    for f in families:
        drafted = accepted = 0
        for seed in E.task_seeds(f, "test", n_tasks):
            task = E.make_task(f, seed)
            ids = data.render_prompt(tok, task.messages, task.tools)
            if len(ids) >= context - 1:
                continue
            _, st = S.generate(model, torch.tensor([ids], device=device), min(max_new_tokens, context - len(ids)),
                               temperature=0, stop_token=tok.special[data.CHAT_STOP], speculative=True,
                               n_vocab=tok.n_vocab)
            drafted, accepted = drafted + st["drafted"], accepted + st["accepted"]
        out[f] = dict(drafted=drafted, accepted=accepted, rate=accepted / max(drafted, 1))
    return out


# -----------------------------------------------------------------------------
# The script

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    # --- run
    ap.add_argument("--variant", choices=("instruct", "thinking"), default=None, help="required, except with "
                    "--mtp-only (default instruct there: how the stage's conversations are rendered)")
    ap.add_argument("--from", dest="base", default=None, help="base checkpoint: a training stage's directory or a "
                    f"Hugging Face directory (default: the first of {', '.join(SOURCES)} that exists)")
    ap.add_argument("--out-dir", default=None, help="default: out/sft/{variant}, out/sft/mtp with --mtp-only")
    ap.add_argument("--resume", action="store_true", help="continue from --out-dir's latest checkpoint")
    # --- --mtp-only: train a speculative-decoding draft (the MTP block) on the frozen model
    ap.add_argument("--mtp-only", action="store_true", help="train only the MTP block, self-distilled from the "
                    "frozen model (module docstring); writes a stage checkpoint and a Hugging Face directory")
    ap.add_argument("--mtp-init", choices=("fresh", "continue"), default="fresh", help="fresh: a newly drawn MTP "
                    "block (the only choice for released checkpoints, which ship none); continue: the base's own")
    ap.add_argument("--mtp-data", choices=("stage", "self"), default="stage", help="stage: the mixture's "
                    "conversations; self: the model's own continuations of their prompts (sampled at 0.6 / top-k 20 "
                    "/ top-p 0.95)")
    ap.add_argument("--export-hf", default=None, help="with --mtp-only: the Hugging Face directory written at the end "
                    "(default: {out-dir}/hf)")
    # --- data (defaults: the recipe for the base, RECIPES)
    ap.add_argument("--mixture", default=None, help="JSON/TOML SFT mixture: JSONL sources and per-source weights "
                    "(default: the built-in task families with the recipe's weights, identity 3x)")
    ap.add_argument("--tasks-per-family", type=int, default=None, help="train conversations per built-in family")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default: the base's context; "
                    "at least 512 for the CPU presets)")
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch: rows per rank per forward")
    ap.add_argument("--global-batch", type=int, default=None, help="rows per optimizer step")
    ap.add_argument("--seed", type=int, default=1337)
    # --- optimisation: warmup, then cosine to 10% of the peak
    ap.add_argument("--epochs", type=int, default=None, help="passes over the packed rows (the report's 3)")
    ap.add_argument("--steps", type=int, default=None, help="override the steps the epochs give")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (3e-5 for mellum2-12b, the report's; 1e-2 on "
                    "the CPU presets)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (the report's 100)")
    ap.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the MTP loss (the report's 0.1)")
    ap.add_argument("--aux-coef", type=float, default=None, help="balancing-loss coefficient per MoE layer "
                    "(default: the recipe's, pre-training's / 10: the report's 1e-4 for mellum2-12b, 0.01 on tiny)")
    # --- evaluation, checkpoints, logging
    ap.add_argument("--eval-tasks", type=int, default=None, help="held-out test tasks per family at the end (0: no "
                    f"evaluation); --mtp-only: prompts per family for draft acceptance (default {MTP_EVAL_TASKS})")
    ap.add_argument("--eval-max-new-tokens", type=int, default=256, help="tool results included: an "
                    "agentic_code episode takes ~170 on tiny")
    ap.add_argument("--report-card", default=E.REPORT_CARD)
    train.add_stage_args(ap, 100)
    args = ap.parse_args(argv)
    if args.variant is None and not args.mtp_only:
        ap.error("the following arguments are required: --variant (or --mtp-only)")
    args.variant = args.variant or "instruct"
    return args


def main(argv=None):
    args = parse_args(argv)
    ctx = train.compute_init(args.device, dtype=args.dtype)
    torch.manual_seed(args.seed + ctx.rank)
    log = print if ctx.master else (lambda *a, **k: None)
    out_dir = args.out_dir or os.path.join("out", "sft", "mtp" if args.mtp_only else args.variant)

    # --- the base, its recipe and the config SFT trains at
    base_dir = args.base or default_source()
    base, tok, base_meta = train.load_model(base_dir)
    if not data.renders_chat(tok):
        raise data.InputError(f"--from {base_dir}: the chat template needs a tokenizer whose <|im_start|> and "
                              "<|im_end|> are single tokens (nanoMellum's, or a released checkpoint's tokenizer.json); "
                              f"got {tok.name if tok else 'none'}")
    recipe = train.recipe_for(RECIPES, base.config)
    context = base.config.max_position_embeddings
    T = args.seq_len or max(context, recipe.min_seq_len)
    config = copy.deepcopy(base.config)
    config.max_position_embeddings = max(T, context)  # the context SFT trains at, recorded in the checkpoint
    B = args.batch_size or recipe.micro_batch
    global_batch = args.global_batch or max(recipe.global_batch, B * ctx.world_size)
    n_micro = train.micro_batches(global_batch, B, ctx.world_size)
    lr, epochs = args.lr or recipe.lr, args.epochs or recipe.epochs
    eval_tasks = recipe.eval_tasks if args.eval_tasks is None else args.eval_tasks
    aux_coef = recipe.aux_coef if args.aux_coef is None else args.aux_coef

    # --- data: every rank renders and packs the same rows (deterministic, seconds), then keeps its share
    tasks = dict.fromkeys(FAMILIES, args.tasks_per_family) if args.tasks_per_family else recipe.tasks_per_family
    mixture = load_sft_mixture(args.mixture, tasks, recipe.weights)
    convs = conversations(mixture, args.seed)
    samples, stats = build_samples(tok, convs, args.variant)
    if args.mtp_only:
        base.config.max_position_embeddings = config.max_position_embeddings  # in place: the modules share it
        return main_mtp_only(args, ctx, log, out_dir, base_dir, base, base_meta, tok, mixture, convs, samples, stats,
                             T, B, global_batch, n_micro, recipe, aux_coef)
    loader = SFTLoader(samples, T, B, pad=tok.eot, rank=ctx.rank, world_size=ctx.world_size, seed=args.seed)
    steps = args.steps or max(1, epochs * len(loader) // global_batch)
    warmup = min(args.warmup if args.warmup is not None else recipe.warmup, steps)
    log_data(stats, mixture, samples, loader, T, args.variant, log)

    # --- model and optimizer: the base's weights, a fresh optimizer (see the module footguns)
    raw = M.Mellum(config)
    raw.load_state_dict(base.state_dict())
    del base
    raw.to(ctx.device)
    os.makedirs(out_dir, exist_ok=True)
    families = [f for f in mixture.weights if f in FAMILIES] if eval_tasks else []
    base_eval = os.path.join(out_dir, "eval_base.jsonl")
    if ctx.master and families and not os.path.exists(base_eval):  # the base, at SFT's context, on the same prompts
        # (before wrapping: rank 0 generates alone; the other ranks wait in the first collective)
        base_results = E.evaluate(raw.eval(), tok, families, eval_tasks, 0, "instruct",
                                  max_new_tokens=args.eval_max_new_tokens, seed=args.seed)
        E.atomic_write(base_eval, "".join(json.dumps({"family": f, **m}) + "\n" for f, m in base_results.items()))
    raw.train()
    parallel = train.choose_parallel(args.parallel, config)
    model = train.wrap_model(ctx, raw, parallel)
    opt = muon.MuonAdamW(muon.param_groups(model, lr, 0.1), ns_dtype=ctx.ns_dtype)
    step = train.resume(out_dir, raw, opt, loader, ctx, log) if args.resume else 0
    meta = dict(stage="sft", variant=args.variant, tokenizer=tok.name, sft_from=os.path.abspath(base_dir),
                args=vars(args), data=stats, dropped=loader.dropped)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    train.start_tracking(args, out_dir, ctx)
    log(f"sft {args.variant}: from {base_dir} (context {context}) at {T} tokens per row, {steps} steps of "
        f"{global_batch} rows ({epochs} epochs of {len(loader)} rows), {n_micro} micro-batches of {B} per rank, "
        f"lr {lr:g} (warmup {warmup}, cosine to {lr / 10:g}), mtp {args.mtp_weight}, aux {aux_coef}, "
        f"device {ctx.device}, world {ctx.world_size} ({parallel})")

    # --- the loop
    first, fpt = step, M.flops_per_token(config, T)
    for step in tqdm(range(step, steps), desc=f"sft {args.variant}", disable=not ctx.master, dynamic_ncols=True,
                     initial=step, total=steps):
        batches = [loader.next_batch() for _ in range(n_micro)]
        record = train.train_step(ctx, model, raw, opt, batches, cosine_schedule(step, steps, warmup), out_dir, step,
                                  1.0, fpt, mtp_weight=args.mtp_weight, aux_coef=aux_coef)
        record["targets"] = sum(int((y != -1).sum()) for _, y in batches)
        train.log_metrics(metrics, record, ctx, echo=(step + 1) % args.log_every == 0)
        if train.save_if_due(ctx, out_dir, step + 1, steps, first, args, raw, opt, meta, loader, log,
                             f"sft {args.variant}"):
            train.compute_cleanup(ctx)
            return None
    train.compute_cleanup(ctx)

    # --- evaluation of the final checkpoint on held-out seeds, rank 0 alone
    if not ctx.master or not families:
        return None
    final = train.latest_step(out_dir)
    tuned, _, _ = train.load_model(out_dir, final, device=ctx.device)
    results = E.evaluate(tuned, tok, families, eval_tasks, 0, args.variant, max_new_tokens=args.eval_max_new_tokens,
                         seed=args.seed, out_dir=out_dir)
    with open(base_eval) as f:
        base_results = {r.pop("family"): r for r in map(json.loads, f)}
    card = E.update_report_card(args.report_card, f"{args.variant}-SFT", results)
    print(f"\n{args.variant}-SFT at step {final}, greedy accuracy on {eval_tasks} held-out test tasks per family "
          f"(%, ± standard error):\n\n{eval_table(base_results, results, args.variant)}\n\nreport card: {card}")
    return results


def main_mtp_only(args, ctx, log, out_dir, base_dir, raw, base_meta, tok, mixture, convs, samples, stats, T, B,
                  global_batch, n_micro, recipe, aux_coef):
    """sft.py --mtp-only: the MTP block (fresh, or the base's own) trained alone on the frozen base, on the stage's
    conversations or the model's own continuations; then the stage checkpoint, the Hugging Face directory and the
    draft acceptance before and after on held-out prompts."""
    # --- the model: a draft block beside the frozen backbone, in bf16 on a GPU (no master weights to keep; the MTP
    # block keeps fp32 ones), cast before it moves there; the draft's acceptance before training (rank 0)
    prepare_mtp_only(raw, args.mtp_init, args.seed, f"--from {base_dir}")
    if ctx.bf16:
        raw.model.to(torch.bfloat16)
        raw.lm_head.to(torch.bfloat16)
    raw.to(ctx.device)
    os.makedirs(out_dir, exist_ok=True)
    families = [f for f in mixture.weights if f in FAMILIES]
    n_eval = MTP_EVAL_TASKS if args.eval_tasks is None else args.eval_tasks
    before_path = os.path.join(out_dir, "acceptance_before.json")
    if ctx.master and n_eval and families and not os.path.exists(before_path):
        with one_dtype(raw.eval()):
            before = draft_acceptance(raw, tok, families, n_eval, args.eval_max_new_tokens)
        E.atomic_write(before_path, json.dumps(before))

    # --- data: the stage's conversations, or the model's own continuations of their prompts (cached for --resume)
    if args.mtp_data == "self":
        cached = os.path.join(out_dir, "self_generated.jsonl")
        if args.resume and os.path.exists(cached):
            with open(cached) as f:
                samples = [data.ChatSample(**json.loads(line)) for line in f]
        else:
            with one_dtype(raw.eval()):
                samples = self_generated(raw, tok, convs, T, ctx, args.seed)
            if ctx.master:
                E.atomic_write(cached, "".join(json.dumps(vars(s)) + "\n" for s in samples))
    loader = SFTLoader(samples, T, B, pad=tok.eot, rank=ctx.rank, world_size=ctx.world_size, seed=args.seed)
    epochs = args.epochs or recipe.epochs
    steps = args.steps or max(1, epochs * len(loader) // global_batch)
    warmup = min(args.warmup if args.warmup is not None else recipe.warmup, steps)
    log_data(stats, mixture, samples, loader, T, args.variant, log)
    if args.mtp_data == "self":
        log(f"sft --mtp-only: the rows are the model's own continuations of those {len(samples):,} prompts")

    # --- the optimizer: the MTP block's parameters alone (the others do not require grad)
    raw.train()
    lr = args.lr or recipe.mtp_lr
    opt = muon.MuonAdamW(muon.param_groups(raw, lr, 0.1), ns_dtype=ctx.ns_dtype)
    step = train.resume(out_dir, raw, opt, loader, ctx, log) if args.resume else 0
    meta = dict(stage="mtp", variant=args.variant, tokenizer=tok.name, mtp_from=os.path.abspath(base_dir),
                base_stage=base_meta.get("stage"), args=vars(args), data=stats, dropped=loader.dropped)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    log(f"sft --mtp-only: from {base_dir}, {args.mtp_init} MTP block ({trained:,} parameters trained, the other "
        f"{sum(p.numel() for p in raw.parameters()) - trained:,} frozen), {args.mtp_data} data at {T} tokens per "
        f"row, {steps} steps of {global_batch} rows, {n_micro} micro-batches of {B} per rank, lr {lr:g} (warmup "
        f"{warmup}, cosine to {lr / 10:g}), aux {aux_coef}, device {ctx.device}, world {ctx.world_size}")

    # --- the loop
    first = step
    for step in tqdm(range(step, steps), desc="sft mtp-only", disable=not ctx.master, dynamic_ncols=True,
                     initial=step, total=steps):
        batches = [loader.next_batch() for _ in range(n_micro)]
        r = mtp_only_step(ctx, raw, opt, batches, cosine_schedule(step, steps, warmup), step, tok.n_vocab, aux_coef)
        r["targets"] = sum(int((y[:, 1:] != -1).sum()) for _, y in batches)
        train.log_metrics(metrics, r, ctx, echo=False)
        if ctx.master and (step + 1) % args.log_every == 0:
            tqdm.write(f"step {r['step']:6d} | mtp soft CE {r['mtp']:.4f} | KL {r['kl']:.4f} | aux {r['aux']:.3f} | "
                       f"z {r['z']:.3f} | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | {r['tok_per_s']:,.0f} "
                       f"tok/s | imbalance {r['imbalance']:.2f}")
        if train.save_if_due(ctx, out_dir, step + 1, steps, first, args, raw, opt, meta, loader, log,
                             "sft --mtp-only"):
            train.compute_cleanup(ctx)
            return None
    train.compute_cleanup(ctx)
    if not ctx.master:
        return None

    # --- the Hugging Face directory (transformers loads it and ignores mtp.*), and the acceptance it gives
    hf_dir = args.export_hf or os.path.join(out_dir, "hf")
    train.save_pretrained(raw, hf_dir, dtype=torch.bfloat16 if ctx.bf16 else None, tokenizer=tok)
    log(f"sft --mtp-only: wrote {hf_dir} (Hugging Face format, MTP under mtp.*): python sample.py --ckpt {hf_dir} "
        "--speculative")
    if not os.path.exists(before_path):
        return None
    with open(before_path) as f, one_dtype(raw.eval()):
        result = dict(before=json.load(f), after=draft_acceptance(raw, tok, families, n_eval,
                                                                   args.eval_max_new_tokens))
    E.atomic_write(os.path.join(out_dir, "acceptance.json"), json.dumps(result, indent=2))
    print(f"\ngreedy draft acceptance on {n_eval} held-out test prompts per family (drafts accepted / drafted):\n")
    print(f"| family | before ({args.mtp_init} block) | after |\n|---|---|---|")
    for f in families:
        print("| " + " | ".join([f] + [f"{100 * r[f]['rate']:.1f}% ({r[f]['accepted']}/{r[f]['drafted']})"
                                        for r in (result["before"], result["after"])]) + " |")
    return result


def log_data(stats, mixture, samples, loader, T, variant, log):
    """What the mixture gave: conversations and samples per source, rows, trained tokens, dropped samples."""
    for name, s in stats.items():
        left = f", {s['no_reasoning']:,} left out (no reasoning)" if variant == "thinking" else ""
        log(f"  {name:>14}: weight {mixture.weights[name]:g}, {s['conversations']:,} conversations -> "
            f"{s['samples']:,} samples{left}")
    log(f"sft {variant}: {len(samples):,} samples -> {len(loader):,} rows of {T} tokens ({loader.targets():,} trained "
        f"tokens, {1 - loader.targets() / loader.x.numel():.1%} of positions without a target); {loader.dropped:,} "
        "samples longer than a row dropped")


if __name__ == "__main__":
    train.run(main, "sft.py")
