"""
Three-phase pre-training of Mellum 2: one continuous Warmup-Hold-Decay run whose data mixture shifts from diverse
prose toward curated code and math (phase 1 -> 2 -> 3), optimised with Muon + AdamW. Loss = next-token CE
+ 0.1 MTP CE + 1e-3 global-batch balancing loss per MoE layer + 1e-3 router z-loss per MoE layer (the report's).

CPU, the default `tiny` preset on the embedded corpus (built and cached under data/ on first use):
    python pretrain.py --phase 1
    python pretrain.py --phase 2        # starts from phase 1's final checkpoint
    python pretrain.py --phase 3        # the decay phase: the learning rate reaches zero at its last step
One GPU (bf16 autocast; --fp8 for FP8 GEMMs on Hopper/Ada):
    python pretrain.py --preset mellum2-1b --phase 1
Many GPUs / nodes (DDP for small presets, FSDP2 for large ones, chosen by --parallel auto):
    torchrun --nproc_per_node=8 pretrain.py --preset mellum2-1b --phase 1
    torchrun --nnodes=32 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 \
        pretrain.py --preset mellum2-12b --phase 1
Plan only (the report's recipe): python pretrain.py --preset mellum2-12b --phase 1 --dry-run --world-size 256

Each preset carries a recipe (RECIPES): micro-batch, a global batch that ramps linearly in whole rounds of
micro-batches (the loader is simply called more times per step), peak LR, warmup and decay, token budgets.
Checkpoints: out/pretrain/phase{N}/model_{step}.pt + meta_{step}.json + optim_{step}_rank{r}.pt, written
atomically every --ckpt-every steps and at the end of the phase; --resume continues exactly (model, optimizer,
loader position, RNG). Steps are counted globally across the three phases, so the schedule is one curve.
Metrics: out/pretrain/phase{N}/metrics.jsonl, one JSON object per step and per evaluation.

Shared with the later stages (extend.py, sft.py, rlvr.py import them; each stage writes its own loop):
  compute_init / compute_cleanup, wrap_model       one CPU process, one GPU, or torchrun's N processes
  whd_schedule, batch_ramp, Recipe / RECIPES       the schedules
  save_checkpoint, latest_step, load_checkpoint, resume_checkpoint
  token_normaliser, forward_backward, optimizer_step   one optimizer step, every target token weighted equally
  evaluate, log_metrics                            validation CE and the per-step log line / metrics.jsonl

Footguns:
- Losses are normalised by the number of targets (y != -1) of the whole global batch, not per micro-batch:
  a micro-batch with few targets (padding, SFT masks) weighs less, exactly as in one big batch.
- The balancing loss of a micro-batch uses the expert counts of the step so far (model.py, router_losses):
  forward_backward calls `reset_router_counts()` at the start of every step; a loop that calls the model's
  forward directly must do the same, or it gets per-micro-batch counts.
- --compile needs a GPU: on CPU torch.compile (torch 2.13) fails inside dynamo on torch._grouped_mm.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import kernels
import model as M
import muon


# -----------------------------------------------------------------------------
# Compute: one CPU process, one GPU, or torchrun's N processes

@dataclass
class Compute:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):  # bf16 autocast on GPU; fp32 on CPU (CPU bf16 matmuls are slow and not what we test)
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def compute_init(device=None):
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        return Compute(dev, rank, local, world, ddp=world > 1)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Compute(dev)


def compute_cleanup(ctx):
    if ctx.ddp and dist.is_initialized():
        dist.destroy_process_group()


def peak_flops(device):
    """Dense bf16 peak of the device, for MFU (None when unknown: CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in [("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("4090", 165), ("3090", 71),
                        ("A6000", 155), ("L4", 121)]:
        if key in name:
            return tflops * 1e12
    return None


def wrap_model(ctx, model, parallel):
    """DDP (replicated weights, all-reduced grads) or FSDP2 (every decoder layer sharded) when world > 1."""
    if not ctx.ddp:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else []):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


# -----------------------------------------------------------------------------
# Schedules: Warmup-Hold-Decay over the three phases, and the batch-size ramp

def whd_schedule(step, total, warmup, decay):
    """LR multiplier at global step `step` of `total`: linear warmup over `warmup` steps, hold at 1, linear decay
    over the last `decay` steps reaching exactly 0 at step == total."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total - decay:
        return max(0.0, (total - step) / decay)
    return 1.0


def batch_ramp(step, start, end, ramp_steps, unit):
    """Global batch (sequences) at `step`: linear from `start` to `end` over `ramp_steps` steps, rounded down to a
    multiple of `unit` (micro-batch x ranks: one round of micro-batches), never below one unit. The report ramps
    2,048 -> 4,096 sequences "done by ~19K steps"; the shape and granularity are unpublished, this is our choice."""
    batch = end if step >= ramp_steps else start + (end - start) * step / ramp_steps
    return max(unit, int(batch // unit) * unit)


@dataclass
class Recipe:
    """A preset's pre-training plan. warmup / decay: steps, or a fraction of all three phases' steps when < 1."""
    micro_batch: int                 # sequences per rank per forward
    batch: tuple                     # (start, end) global batch in sequences, ramped by batch_ramp
    ramp_steps: int
    lr: float                        # peak LR of both optimizer groups (Muon's update is scaled to AdamW's RMS)
    warmup: float
    decay: float
    phase_tokens: dict = None        # {phase: tokens}; None: the mixture's budgets
    total_steps: int = None          # pinned step count (the report's); None: from the token budgets


RECIPES = {
    # The Mellum 2 report: 8,192-token sequences (the preset's context), micro-batch 2, global batch 2,048 -> 4,096,
    # peak 3e-4, 2,000 warmup steps, linear decay to 0 over the last 49,306 of 323,459 steps (phase 3).
    "mellum2-12b": Recipe(micro_batch=2, batch=(2048, 4096), ramp_steps=19_000, lr=3e-4, warmup=2000, decay=49_306,
                          phase_tokens={1: 6_180_000_000_000, 2: 2_790_000_000_000, 3: 1_690_000_000_000},
                          total_steps=323_459),
    # One 24 GB GPU at 4,096 tokens (our choice): the budgets are the mixture's.
    "mellum2-1b": Recipe(micro_batch=8, batch=(64, 128), ramp_steps=500, lr=3e-3, warmup=0.02, decay=0.2),
    # CPU: the README's Muon ablation on tiny found 3e-2 best of 1e-3 .. 1e-1 (120 steps).
    "tiny": Recipe(micro_batch=2, batch=(2, 4), ramp_steps=20, lr=3e-2, warmup=0.05, decay=0.3),
}
RECIPES["test"] = RECIPES["tiny"]


def steps_for_tokens(tokens, first_step, seq_len, batch_at, ramp_steps):
    """Steps from `first_step` until `tokens` tokens are trained, batch_at(step) sequences per step (constant from
    ramp_steps on)."""
    step, done = first_step, 0
    while done < tokens and step < ramp_steps:
        done, step = done + batch_at(step) * seq_len, step + 1
    return step - first_step + max(0, math.ceil((tokens - done) / (batch_at(step) * seq_len)))


def plan_phases(budgets, seq_len, batch_at, ramp_steps, total_steps=None, decay_steps=None):
    """{phase: steps} from the token budgets under the ramp. With a pinned total (the report's) phase 3 is the
    decay and phase 1 follows its budget; phase 2 takes the steps in between. (The report's step and token figures
    disagree by 1-2% for phases 2-3, by rounding and a mid-run move to 16 nodes: we keep its steps.)"""
    steps, at = {}, 0
    for p in sorted(budgets):
        steps[p] = max(1, steps_for_tokens(budgets[p], at, seq_len, batch_at, ramp_steps))
        at += steps[p]
    if total_steps is not None:
        steps[3] = decay_steps
        steps[2] = total_steps - steps[1] - steps[3]
    return steps


def planned_tokens(first_step, n_steps, seq_len, batch_at):
    return sum(batch_at(s) for s in range(first_step, first_step + n_steps)) * seq_len


def human(n):
    """6.18T, 2.820T, 300.0K: token counts at the precision the report gives them."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}" if n % (div / 100) == 0 else f"{n / div:.3f}{unit}"
    return str(n)


# -----------------------------------------------------------------------------
# Checkpoints: <dir>/model_{step}.pt + meta_{step}.json + optim_{step}_rank{r}.pt (rank_state rides with the
# optimizer shard). Thin wrappers over model.py's functions; the loops use only these names.

def save_checkpoint(ckpt_dir, step, model, optimizer, meta, rank_state, ctx):
    """model: the unwrapped model. meta: JSON dict, written last (a step counts only once complete).
    rank_state: this rank's loader position and RNG."""
    M.save_checkpoint(ckpt_dir, step, model, meta, optim_state={"optimizer": optimizer.state_dict(), **rank_state},
                      rank=ctx.rank)
    if ctx.ddp:
        dist.barrier()


def latest_step(ckpt_dir):
    return M.latest_step(ckpt_dir)


def load_checkpoint(path, step=None, device="cpu"):
    """(model, meta) in one process: a training checkpoint directory or a Hugging Face-format directory."""
    return M.load_checkpoint(path, step, device)


def resume_checkpoint(ckpt_dir, step, model, optimizer, ctx):
    """Load weights and optimizer state in place; return this rank's rank_state (loader, RNG)."""
    saved, meta = M.load_checkpoint(ckpt_dir, step)
    if meta["config"] != model.config.to_hf():
        raise SystemExit(f"{ckpt_dir}: the checkpoint's config differs from this run's model; use the same "
                         "--preset / flags, or a new --out-dir")
    model.load_state_dict(saved.state_dict())
    state = M.load_optim_state(ckpt_dir, step, ctx.rank)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# -----------------------------------------------------------------------------
# One optimizer step

def token_normaliser(batches, ctx):
    """(CE targets, MTP targets) of one step: y != -1 over all its micro-batches and ranks, divided by the world
    size (DDP and FSDP average gradients over ranks, so a rank's sum / (N / W) averages to the global sum / N).
    Counts are clamped to 1 first: a step without targets gives loss 0 and zero gradient, not NaN."""
    n = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for _, y in batches:
        n += torch.stack([(y != -1).sum(), (y[:, 1:] != -1).sum()]).to(n)
    if ctx.ddp:
        dist.all_reduce(n)
    return (n.clamp(min=1) / ctx.world_size).float()


def grad_sync(model, enabled):
    """DDP / FSDP2: all-reduce gradients only in the last micro-batch's backward (accumulate locally before)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "no_sync") and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def forward_backward(ctx, model, raw, batches, norm, mtp_weight=0.1, aux_coef=1e-3, z_coef=1e-3):
    """Forward and backward over the micro-batches of one optimizer step (gradients accumulate in .grad).
    CE and MTP are target sums over the step's target count `norm` (token_normaliser), so every target token of the
    global batch weighs the same however its rows are split; aux and z (per-layer sums of per-micro-batch
    statistics over equal token counts) are averaged over the micro-batches. `raw` is the unwrapped model, whose
    expert counts start afresh. Returns (ce, mtp, aux, z) of the step, averaged over ranks."""
    raw.reset_router_counts()
    parts = torch.zeros(4, device=ctx.device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with grad_sync(model, i == len(batches) - 1), ctx.autocast():
            _, losses = model(x, y, norm=norm)
            router = (aux_coef * losses["aux"] + z_coef * losses["z"]) / len(batches)
            loss = losses["ce"] + mtp_weight * losses["mtp"] + router
        loss.backward()
        parts += torch.stack([losses["ce"], losses["mtp"], losses["aux"] / len(batches),
                              losses["z"] / len(batches)]).detach().float()
    if ctx.ddp:
        dist.all_reduce(parts)
        parts /= ctx.world_size
    return parts


def optimizer_step(model, optimizer, grad_clip):
    """Clip the global gradient norm, step, zero the gradients; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def check_finite(parts, step, ckpt_dir):
    if not torch.isfinite(parts).all():
        raise FloatingPointError(f"non-finite loss at step {step} (ce, mtp, aux, z = {parts.tolist()}); stopping. "
                                 f"Last good checkpoint: {ckpt_dir} step {latest_step(ckpt_dir)}. Lower --lr or "
                                 "check the data.")


# -----------------------------------------------------------------------------
# Evaluation and logging

def evaluate(model, batches, ctx):
    """Next-token CE per target token over an iterable of (x, y), over all ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # CE sum, targets
    with torch.no_grad(), ctx.autocast():
        for x, y in batches:
            _, losses = model(x.to(ctx.device), y.to(ctx.device), norm=(1, 1))
            total += torch.stack([losses["ce"].double(), (y != -1).sum().to(total)])
    model.train()
    if ctx.ddp:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def imbalance(raw):
    """Max / mean expert load of the last step, averaged over the MoE layers (1 = perfectly balanced)."""
    load = raw.expert_load().float()
    return (load.max(dim=1).values / load.mean(dim=1)).mean().item() if load.numel() else 1.0


def log_metrics(path, record, ctx, echo=True):
    """Append `record` to metrics.jsonl and print its log line (rank 0 only): a training step's loss parts, lr,
    grad norm, tokens/s, MFU (GPU), expert imbalance, padding, or a validation loss."""
    if not ctx.master:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if not echo:
        return
    r = record
    if "ce" not in r:
        tqdm.write(f"step {r['step']:6d} | val loss {r['val_loss']:.4f}")
        return
    line = (f"step {r['step']:6d} | ce {r['ce']:.4f} | mtp {r['mtp']:.4f} | aux {r['aux']:.3f} | z {r['z']:.3f} | "
            f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | {r['tok_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        line += f" | mfu {r['mfu'] * 100:.1f}%"
    line += f" | imbalance {r['imbalance']:.2f}"
    if r.get("padding") is not None:
        line += f" | padding {r['padding'] * 100:.1f}%"
    tqdm.write(line)


# -----------------------------------------------------------------------------
# The script

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    # --- run
    ap.add_argument("--phase", type=int, choices=(1, 2, 3), required=True)
    ap.add_argument("--preset", default="tiny", choices=list(M.PRESETS))
    ap.add_argument("--out-dir", default="out/pretrain")
    ap.add_argument("--resume", action="store_true", help="continue this phase from its latest checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--world-size", type=int, default=None, help="with --dry-run: plan for this many ranks")
    # --- data
    ap.add_argument("--mixture", default=None, help="JSON/TOML mixture file (default: the embedded corpus)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--tokenizer", default=None, help="cl100k_base, cl100k_base:N or a .tiktoken file (default: "
                    "cl100k_base, cut to the preset's vocab_size)")
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch: sequences per rank per forward "
                    "(default: the preset's recipe)")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step, constant "
                    "(default: the recipe's ramp, e.g. 2,048 -> 4,096 for mellum2-12b)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_position_embeddings")
    ap.add_argument("--steps", type=int, default=None, help="override the steps of this phase (default: from "
                    "the token budget)")
    ap.add_argument("--seed", type=int, default=1337)
    # --- optimisation
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon", help="adamw: the ablation baseline "
                    "(its best LR on tiny was 3e-3, README)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: the recipe's; tiny 3e-2, the best "
                    "Muon LR of the README's ablation; mellum2-12b 3e-4, the report's)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=None, help="warmup steps, or a fraction of all three phases' "
                    "steps when < 1 (default: the recipe's)")
    ap.add_argument("--decay", type=float, default=None, help="steps of the final linear decay to zero, or a "
                    "fraction when < 1 (default: the recipe's)")
    ap.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the MTP loss (the report's 0.1)")
    ap.add_argument("--aux-coef", type=float, default=1e-3, help="balancing-loss coefficient per MoE layer (the "
                    "report's 1e-3; its ablation found 1e-2 better on short runs)")
    # --- evaluation, checkpoints, logging
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=4, help="per source")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--stop-after", type=int, default=None, help="train this many steps, checkpoint and exit "
                    "(for time-limited job slots; continue with --resume)")
    ap.add_argument("--log-every", type=int, default=1)
    # --- runtime
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                    help="auto: FSDP2 above 2B parameters, DDP below")
    ap.add_argument("--fp8", action="store_true", help="FP8 GEMMs (E4M3 fwd / E5M2 grads) on Hopper/Ada GPUs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (GPU only)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = compute_init(args.device)
    torch.manual_seed(args.seed + ctx.rank)
    if args.compile and ctx.device.type != "cuda":
        raise SystemExit("--compile needs a CUDA GPU: on CPU, torch.compile (torch 2.13) fails inside dynamo on "
                         "torch._grouped_mm, whose fake kernel wants bf16 experts; run without --compile")
    if args.fp8 and not kernels.fp8_supported(ctx.device):
        raise SystemExit("--fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper) and Triton; "
                         f"this run's device is {ctx.device}")

    # --- tokenizer, config and the plan: steps per phase are fixed in phase 1 and read back in phases 2-3
    phase_dir = os.path.join(args.out_dir, f"phase{args.phase}")
    prev_dir = os.path.join(args.out_dir, f"phase{args.phase - 1}")
    prev_meta = None
    if args.phase > 1:
        prev_step = latest_step(prev_dir)
        if prev_step is None:
            raise SystemExit(f"phase {args.phase} starts from phase {args.phase - 1}'s final checkpoint, but "
                             f"{prev_dir} has none: run `python pretrain.py --phase {args.phase - 1}` with the "
                             "same flags first")
        with open(os.path.join(prev_dir, f"meta_{prev_step:06d}.json")) as f:
            prev_meta = json.load(f)
    preset_config = M.get_config(args.preset)
    tok = data.get_tokenizer(args.tokenizer or (prev_meta or {}).get("tokenizer")
                             or data.tokenizer_for_vocab(preset_config.vocab_size))
    config = M.get_config(args.preset, vocab_size=tok.vocab_size)  # the model's vocabulary is the tokenizer's
    mixture = data.load_mixture(args.mixture)
    if args.phase not in mixture.phases:
        raise SystemExit(f"the mixture {args.mixture or '(default)'} has no phase {args.phase} "
                         f"(it has {sorted(mixture.phases)})")
    recipe = RECIPES.get(args.preset, RECIPES["tiny"])
    T = args.seq_len or config.max_position_embeddings
    B = args.batch_size or recipe.micro_batch
    lr = args.lr or recipe.lr
    world = args.world_size or ctx.world_size
    unit = B * world  # sequences of one round of micro-batches over all ranks
    start_batch, end_batch = (args.global_batch,) * 2 if args.global_batch else recipe.batch
    if end_batch % unit:
        raise SystemExit(f"pretrain.py: a global batch of {end_batch} sequences is not a multiple of --batch-size "
                         f"{B} x {world} ranks = {unit}; change --global-batch or --batch-size")

    def batch_at(step):
        return batch_ramp(step, start_batch, end_batch, recipe.ramp_steps, unit)

    pinned = args.mixture is None and recipe.phase_tokens is not None  # the recipe's budgets and step counts
    budgets = recipe.phase_tokens if pinned else {p: ph.tokens for p, ph in mixture.phases.items()}
    if prev_meta is not None:
        phase_steps = {int(p): n for p, n in prev_meta["phase_steps"].items()}
    else:
        phase_steps = plan_phases(budgets, T, batch_at, recipe.ramp_steps, *((recipe.total_steps, int(recipe.decay))
                                                                             if pinned else ()))
    if args.steps is not None:
        phase_steps[args.phase] = args.steps
    total = sum(phase_steps.values())
    start = sum(n for p, n in phase_steps.items() if p < args.phase)
    end = start + phase_steps[args.phase]
    warmup, decay = (args.warmup or recipe.warmup), (args.decay or recipe.decay)
    warmup, decay = (min(total, max(1, round(x * total)) if x < 1 else int(x)) for x in (warmup, decay))
    parallel = args.parallel if args.parallel != "auto" else \
        ("fsdp" if M.count_params(config)["total"] > 2e9 else "ddp")

    if args.dry_run:
        if ctx.master:
            print(M.summary(config, T, n_gpus=world if parallel == "fsdp" else 1))
            ramp_end = next(s for s in range(recipe.ramp_steps + 1) if batch_at(s) == end_batch)
            print(f"recipe {args.preset}: {T:,}-token sequences, micro-batch {B} x {world} ranks; global batch "
                  f"{batch_at(0):,} -> {end_batch:,} sequences (linear in rounds of {unit:,}, reached at step "
                  f"{ramp_end:,}); peak lr {lr:g} ({args.optimizer}), warmup {warmup:,} steps, hold, linear decay "
                  f"to 0 over the last {decay:,} of {total:,} steps; mtp weight {args.mtp_weight}, aux coef "
                  f"{args.aux_coef} per layer")
            fpt, at = M.flops_per_token(config, T), 0
            for p in sorted(phase_steps):
                tokens = planned_tokens(at, phase_steps[p], T, batch_at)
                print(f"phase {p}: budget {human(budgets[p])} tokens, {phase_steps[p]:,} steps (global "
                      f"{at:,}..{at + phase_steps[p]:,}) = {human(tokens)} tokens planned, "
                      f"{fpt * tokens:.3g} FLOPs, mixture {mixture.phases[p].weights}")
                at += phase_steps[p]
        compute_cleanup(ctx)
        return

    # --- data: rank 0 builds the token shards once, the others then read its cache
    if ctx.ddp and not ctx.master:
        dist.barrier()
    shards = data.prepare_data(mixture, tok, data_dir=args.data_dir, phases=(args.phase,),
                               log=print if ctx.master else (lambda *a, **k: None))
    if ctx.ddp and ctx.master:
        dist.barrier()
    loader = data.TokenLoader(data.phase_sources(mixture, shards, args.phase), B, T, rank=ctx.rank,
                              world_size=ctx.world_size, eot=tok.eot, seed=args.seed + args.phase)
    # validation: the same few batches of every source's held-out documents, each source weighted equally
    val = [b for name in sorted(shards) for b in data.val_batches(
        shards[name].val, B, T, args.eval_batches, rank=ctx.rank, world_size=ctx.world_size,
        eot=tok.eot)]

    # --- model and optimizer: fresh in phase 1; phases 2 and 3 load the previous phase's final weights + optimizer
    if args.phase > 1 and prev_step != start:
        raise SystemExit(f"{prev_dir} ends at step {prev_step}, but phase {args.phase} starts at step {start}: "
                         f"finish phase {args.phase - 1} first (`--phase {args.phase - 1} --resume`)")
    raw = M.Mellum(config).init_weights(args.seed).to(ctx.device)
    if args.fp8:
        raw.set_fp8(True)
    model = wrap_model(ctx, raw, parallel)
    if args.compile:
        model = torch.compile(model)
    opt = muon.MuonAdamW(muon.param_groups(model, lr, args.weight_decay, adamw_only=args.optimizer == "adamw"))
    step = start
    if args.resume and latest_step(phase_dir) is not None:
        step = latest_step(phase_dir)
        rank_state = resume_checkpoint(phase_dir, step, raw, opt, ctx)
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        if ctx.master:
            print(f"resumed {phase_dir} at step {step}")
    elif args.phase > 1:
        resume_checkpoint(prev_dir, prev_step, raw, opt, ctx)
    meta = dict(stage=f"phase{args.phase}", tokenizer=tok.name, phase=args.phase, preset=args.preset,
                args=vars(args), phase_steps=phase_steps)
    metrics = os.path.join(phase_dir, "metrics.jsonl")
    os.makedirs(phase_dir, exist_ok=True)
    fpt, peak = M.flops_per_token(config, T), peak_flops(ctx.device)
    if ctx.master:
        print(f"phase {args.phase}: global steps {start}..{end} of {total}, global batch {batch_at(step)} -> "
              f"{end_batch} sequences of {T}, {args.optimizer} lr {lr}, world {ctx.world_size} ({parallel}), "
              f"device {ctx.device}")
    if step >= end:
        if ctx.master:
            print(f"phase {args.phase}: already complete at step {step} ({phase_dir})")
        compute_cleanup(ctx)
        return {"step": step, "val_loss": float("nan")}

    # --- the loop: each step takes batch_at(step) / unit micro-batches, so the batch ramp is real
    val_loss, first = float("nan"), step
    if step == start:  # where this phase starts from, for the record
        val_loss = evaluate(model, val, ctx)
        log_metrics(metrics, dict(step=step, val_loss=val_loss), ctx)
    bar = tqdm(range(step, end), desc=f"phase{args.phase}", disable=not ctx.master, dynamic_ncols=True,
               initial=step, total=end)
    for step in bar:
        t0 = time.perf_counter()
        mult = whd_schedule(step, total, warmup, decay)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        lr_now = lr * mult
        batches = [loader.next_batch() for _ in range(batch_at(step) // unit)]
        parts = forward_backward(ctx, model, raw, batches, token_normaliser(batches, ctx), mtp_weight=args.mtp_weight,
                                 aux_coef=args.aux_coef)
        check_finite(parts, step, phase_dir)
        grad_norm = optimizer_step(model, opt, args.grad_clip)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        tps = len(batches) * unit * T / (time.perf_counter() - t0)
        ce, mtp, aux, z = parts.tolist()
        record = dict(step=step + 1, ce=ce, mtp=mtp, aux=aux, z=z, lr=lr_now, grad_norm=grad_norm,
                      batch=batch_at(step), tok_per_s=tps, mfu=fpt * tps / ctx.world_size / peak if peak else None,
                      imbalance=imbalance(raw), padding=getattr(loader, "stats", dict)().get("padding"))
        log_metrics(metrics, record, ctx, echo=(step + 1) % args.log_every == 0)
        bar.set_postfix(loss=f"{ce:.3f}", lr=f"{lr_now:.2e}")
        done = step + 1 == end
        stopping = args.stop_after is not None and step + 1 - first >= args.stop_after
        if (step + 1) % args.eval_every == 0 or done:
            val_loss = evaluate(model, val, ctx)
            log_metrics(metrics, dict(step=step + 1, val_loss=val_loss), ctx)
        if (step + 1) % args.ckpt_every == 0 or done or stopping:
            save_checkpoint(phase_dir, step + 1, raw, opt, meta, {"loader": loader.state_dict(), "rng": rng_state()},
                            ctx)
        if stopping:
            if ctx.master:
                tqdm.write(f"phase{args.phase}: stopped after {args.stop_after} steps at step {step + 1}; continue "
                           "with --resume")
            break
    bar.close()
    if ctx.master:
        packing = loader.stats()
        print(f"phase {args.phase} at step {step + 1}: val loss {val_loss:.4f}; checkpoint in {phase_dir}; "
              f"packing: {packing['padding']:.1%} of positions without a target, "
              f"{packing['dropped']:,} of {packing['docs']:,} documents dropped (low diversity)")
    compute_cleanup(ctx)
    return {"step": step + 1, "val_loss": val_loss}


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
