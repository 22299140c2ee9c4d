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
Many GPUs / nodes (DDP for small presets, FSDP2 for large ones, chosen by --parallel auto; --ep 8: expert
parallelism over each node's 8 GPUs, FSDP2 over the rest, the report's layout):
    torchrun --nproc_per_node=8 pretrain.py --preset mellum2-1b --phase 1
    torchrun --nnodes=32 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 \
        pretrain.py --preset mellum2-12b --phase 1 --ep 8
Plan only (the report's recipe): python pretrain.py --preset mellum2-12b --phase 1 --dry-run --world-size 256
Share: python pretrain.py --export-hf out/pretrain/phase3 out/hf/base     (one Hugging Face-format directory)

Each preset carries a recipe (RECIPES): micro-batch, a global batch that ramps linearly in whole rounds of
micro-batches (the loader is simply called more times per step), peak LR, warmup and decay, token budgets.
Checkpoints: out/pretrain/phase{N}/step_{step}/ (a torch.distributed.checkpoint of model + optimizer, every rank's
loader/RNG state, meta.json), written atomically every --ckpt-every steps and at the end of the phase; --resume
continues exactly (model, optimizer, loader position, RNG) at the same world size, and at another one with the
weights and optimizer resharded. Any later stage loads it in one process or many. Steps are counted globally
across the three phases, so the schedule is one curve.
Metrics: out/pretrain/phase{N}/metrics.jsonl, one JSON object per step and per evaluation.

Contents, top to bottom
  batch_ramp, Recipe / RECIPES              the global-batch ramp and each preset's plan (the report's for mellum2-12b)
  steps_for_tokens, plan_phases             token budgets -> steps per phase under the ramp
  summary, print_plan                       parameters, FLOPs, memory and the recipe: --dry-run
  main                                      arguments, compute, tokenizer + plan, data, model, optimizer, loop, save
The shared pieces (compute, checkpoints, one optimizer step, evaluation, logging) are train.py's.

Footguns
- --compile needs a GPU: on CPU torch.compile (torch 2.13) fails inside dynamo on torch._grouped_mm.
- Phases 2 and 3 continue phase 1's plan (steps per phase, read from its meta.json) and its optimizer state: run
  them with the same --preset / --global-batch / --seq-len flags.
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import kernels
import model as M
import muon
import train

# -----------------------------------------------------------------------------
# The plan: the batch-size ramp, each preset's recipe, steps per phase (the WHD schedule is train.whd_schedule)

def batch_ramp(step, start, end, ramp_steps, unit):
    """Global batch (sequences) at `step`: linear from `start` to `end` over `ramp_steps` steps, rounded down to a
    multiple of `unit` (micro-batch x ranks: one round of micro-batches), never below one unit. The report ramps
    2,048 -> 4,096 sequences "done by ~19K steps"; the shape and granularity are unpublished, this is our choice."""
    batch = end if step >= ramp_steps else start + (end - start) * step / ramp_steps
    return max(unit, int(batch // unit) * unit)


@dataclass
class Recipe:
    """A preset's pre-training plan. warmup / decay: steps, or a fraction of all three phases' steps when < 1;
    decay None: the whole of phase 3, the report's shape (hold through phases 1-2, decay to zero over phase 3)."""
    micro_batch: int                 # sequences per rank per forward
    batch: tuple                     # (start, end) global batch in sequences, ramped by batch_ramp
    ramp_steps: int
    lr: float                        # peak LR of both optimizer groups (Muon's update is scaled to AdamW's RMS)
    warmup: float
    decay: float = None
    aux_coef: float = 1e-3           # balancing-loss coefficient per MoE layer (the report's 1e-3)
    phase_tokens: dict = None        # {phase: tokens}; None: the mixture's budgets
    total_steps: int = None          # pinned step count (the report's); None: from the token budgets


RECIPES = {
    # The Mellum 2 report: 8,192-token sequences (the preset's context), micro-batch 2, global batch 2,048 -> 4,096,
    # peak 3e-4, 2,000 warmup steps, linear decay to 0 over the last 49,306 of 323,459 steps (phase 3).
    "mellum2-12b": Recipe(micro_batch=2, batch=(2048, 4096), ramp_steps=19_000, lr=3e-4, warmup=2000, decay=49_306,
                          phase_tokens={1: 6_180_000_000_000, 2: 2_790_000_000_000, 3: 1_690_000_000_000},
                          total_steps=323_459),
    # One 24 GB GPU at 4,096 tokens (our choice): the budgets are the mixture's.
    "mellum2-1b": Recipe(micro_batch=8, batch=(64, 128), ramp_steps=500, lr=3e-3, warmup=0.02),
    # CPU: RESULTS.md's Muon ablation on tiny found 3e-2 best of 1e-3 .. 1e-1 (120 steps). Its balancing ablation
    # (RESULTS.md): at 1e-3 the router collapses (max/mean expert load ~7 of a possible 8) and stays there; 1e-1 keeps
    # the load near 2.5 at the same validation loss. Small models route few tokens per step, so they need more.
    "tiny": Recipe(micro_batch=2, batch=(2, 4), ramp_steps=20, lr=3e-2, warmup=0.05, aux_coef=0.1),
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
# Dry run: the model summary and the plan

def summary(config, seq_len=None, n_gpus=1, weight_bytes=4):
    """Parameters (total, active), layers, training FLOPs per token and memory per GPU, computed on the meta device."""
    seq_len = seq_len or config.max_position_embeddings
    c = M.count_params(config)
    fpt = M.flops_per_token(config, seq_len)
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
        f"layers: {config.num_hidden_layers} ({config.layer_types.count(M.SLIDING)} sliding W={config.sliding_window}, "
        f"{config.layer_types.count(M.FULL)} full), experts {config.num_experts} top-{config.num_experts_per_tok}",
        f"training FLOPs/token at seq_len {seq_len}: {fpt / 1e9:.3f} GFLOP",
        f"memory per GPU ({n_gpus} GPU{'s' if n_gpus > 1 else ''}, FSDP-sharded): weights "
        f"{n * weight_bytes / gib:.2f} GiB, grads {n * weight_bytes / gib:.2f} GiB, "
        f"optimizer {opt / gib:.2f} GiB (plus activations)",
    ]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The script

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    # --- run
    ap.add_argument("--phase", type=int, choices=(1, 2, 3))
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
                    "(its best LR on tiny was 3e-3, RESULTS.md)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: the recipe's; tiny 3e-2, the best "
                    "Muon LR of RESULTS.md's ablation; mellum2-12b 3e-4, the report's)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=None, help="warmup steps, or a fraction of all three phases' "
                    "steps when < 1 (default: the recipe's)")
    ap.add_argument("--decay", type=float, default=None, help="steps of the final linear decay to zero, or a "
                    "fraction when < 1 (default: the recipe's; tiny and mellum2-1b: the whole last phase, the "
                    "report's shape)")
    ap.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the MTP loss (the report's 0.1)")
    ap.add_argument("--aux-coef", type=float, default=None, help="balancing-loss coefficient per MoE layer "
                    "(default: the recipe's: the report's 1e-3; tiny 0.1, from RESULTS.md's ablation)")
    # --- evaluation, checkpoints, logging
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=4, help="per source")
    train.add_stage_args(ap, 100, parallel_help="auto: FSDP2 above 2B parameters or with --ep > 1, DDP below")
    ap.add_argument("--ep", type=int, default=1, help="expert parallelism: each layer's experts split over groups "
                    "of this many consecutive ranks (the report trains with 8), FSDP2 over the rest")
    ap.add_argument("--fp8", action="store_true", help="FP8 GEMMs (E4M3 fwd / E5M2 grads) on Hopper/Ada GPUs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (GPU only)")
    ap.add_argument("--export-hf", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"), help="write CKPT_DIR's latest "
                    "checkpoint as one Hugging Face-format directory (config.json + safetensors) and exit")
    args = ap.parse_args(argv)
    if args.phase is None and not args.export_hf:
        ap.error("--phase is required (or --export-hf CKPT_DIR OUT_DIR)")
    return args


@dataclass
class Plan:
    """What this run trains: the recipe with the flags applied, and steps per phase (fixed in phase 1)."""
    seq_len: int
    micro_batch: int
    lr: float
    aux_coef: float
    unit: int             # sequences of one round of micro-batches over all ranks
    batch: tuple          # (start, end) global batch in sequences
    ramp_steps: int
    budgets: dict         # {phase: tokens}
    phase_steps: dict     # {phase: steps}
    warmup: int
    decay: int

    def batch_at(self, step):
        return batch_ramp(step, *self.batch, self.ramp_steps, self.unit)

    @property
    def total(self):
        return sum(self.phase_steps.values())

    def span(self, phase):
        """(first, end) global steps of a phase."""
        start = sum(n for p, n in self.phase_steps.items() if p < phase)
        return start, start + self.phase_steps[phase]


def make_plan(args, config, mixture, world, plan_meta):
    """The Plan from the preset's recipe, the flags and, for a resumed phase or a later one, the steps per phase
    that phase 1 fixed (plan_meta: that checkpoint's meta)."""
    recipe = RECIPES.get(args.preset, RECIPES["tiny"])
    B = args.batch_size or recipe.micro_batch
    batch = (args.global_batch,) * 2 if args.global_batch else recipe.batch
    train.micro_batches(batch[1], B, world)  # whole rounds of micro-batches, or a clear error
    T = args.seq_len or config.max_position_embeddings
    pinned = args.mixture is None and recipe.phase_tokens is not None  # the recipe's budgets and step counts
    budgets = recipe.phase_tokens if pinned else {p: ph.tokens for p, ph in mixture.phases.items()}
    plan = Plan(T, B, args.lr or recipe.lr, recipe.aux_coef if args.aux_coef is None else args.aux_coef, B * world,
                batch, recipe.ramp_steps, budgets, {}, 0, 0)
    if plan_meta is not None:
        plan.phase_steps = {int(p): n for p, n in plan_meta["phase_steps"].items()}
    else:
        plan.phase_steps = plan_phases(budgets, T, plan.batch_at, recipe.ramp_steps,
                                       *((recipe.total_steps, int(recipe.decay)) if pinned else ()))
    if args.steps is not None:
        plan.phase_steps[args.phase] = args.steps
    warmup, decay = args.warmup or recipe.warmup, args.decay or recipe.decay or plan.phase_steps[max(plan.phase_steps)]
    plan.warmup, plan.decay = (min(plan.total, max(1, round(x * plan.total)) if x < 1 else int(x))
                               for x in (warmup, decay))
    return plan


def print_plan(args, config, plan, mixture, world, parallel):
    """--dry-run: the model summary, the recipe and every phase's steps, tokens and FLOPs."""
    print(summary(config, plan.seq_len, n_gpus=world if parallel == "fsdp" else 1))
    end_batch = plan.batch[1]
    ramp_end = next(s for s in range(plan.ramp_steps + 1) if plan.batch_at(s) == end_batch)
    print(f"recipe {args.preset}: {plan.seq_len:,}-token sequences, micro-batch {plan.micro_batch} x {world} ranks; "
          f"global batch {plan.batch_at(0):,} -> {end_batch:,} sequences (linear in rounds of {plan.unit:,}, reached "
          f"at step {ramp_end:,}); peak lr {plan.lr:g} ({args.optimizer}), warmup {plan.warmup:,} steps, hold, linear "
          f"decay to 0 over the last {plan.decay:,} of {plan.total:,} steps; mtp weight {args.mtp_weight}, aux coef "
          f"{plan.aux_coef} per layer")
    fpt, at = M.flops_per_token(config, plan.seq_len), 0
    for p in sorted(plan.phase_steps):
        n = plan.phase_steps[p]
        tokens = planned_tokens(at, n, plan.seq_len, plan.batch_at)
        print(f"phase {p}: budget {human(plan.budgets[p])} tokens, {n:,} steps (global {at:,}..{at + n:,}) = "
              f"{human(tokens)} tokens planned, {fpt * tokens:.3g} FLOPs, mixture {mixture.phases[p].weights}")
        at += n


def main(argv=None):
    args = parse_args(argv)
    if args.export_hf:
        return train.export_hf(*args.export_hf)
    ctx = train.compute_init(args.device, args.ep, args.dtype)
    torch.manual_seed(args.seed + ctx.rank)
    if args.compile and ctx.device.type != "cuda":
        raise data.InputError("--compile needs a CUDA GPU: on CPU, torch.compile (torch 2.13) fails inside dynamo on "
                              "torch._grouped_mm, whose fake kernel wants bf16 experts; run without --compile")
    if args.fp8 and not kernels.fp8_supported(ctx.device):
        raise data.InputError("--fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper) and Triton; "
                              f"this run's device is {ctx.device}")
    log = print if ctx.master else (lambda *a, **k: None)

    # --- tokenizer, config and the plan: steps per phase are fixed in phase 1 and read back in phases 2-3
    phase_dir = os.path.join(args.out_dir, f"phase{args.phase}")
    prev_dir = os.path.join(args.out_dir, f"phase{args.phase - 1}")
    prev_step, prev_meta = None, None
    if args.phase > 1:
        prev_step = train.latest_step(prev_dir)
        if prev_step is None:
            raise data.InputError(f"phase {args.phase} starts from phase {args.phase - 1}'s final checkpoint, but "
                                  f"{prev_dir} has none: run `python pretrain.py --phase {args.phase - 1}` with the "
                                  "same flags first")
        prev_meta = train.read_meta(prev_dir, prev_step)[1]
    tok = data.get_tokenizer(args.tokenizer or (prev_meta or {}).get("tokenizer")
                             or data.tokenizer_for_vocab(M.get_config(args.preset).vocab_size))
    config = M.get_config(args.preset, vocab_size=tok.vocab_size)  # the model's vocabulary is the tokenizer's
    mixture = data.load_mixture(args.mixture)
    if args.phase not in mixture.phases:
        raise data.InputError(f"the mixture {args.mixture or '(default)'} has no phase {args.phase} "
                              f"(it has {sorted(mixture.phases)})")
    world = args.world_size or ctx.world_size
    resume_step = train.latest_step(phase_dir) if args.resume else None  # a resumed phase keeps its plan
    plan = make_plan(args, config, mixture, world,
                     train.read_meta(phase_dir, resume_step)[1] if resume_step is not None else prev_meta)
    start, end = plan.span(args.phase)
    parallel = train.choose_parallel(args.parallel, config, args.ep)
    if args.dry_run:
        if ctx.master:
            print_plan(args, config, plan, mixture, world, parallel)
        return train.compute_cleanup(ctx)
    if args.phase > 1 and prev_step != start:
        raise data.InputError(f"{prev_dir} ends at step {prev_step}, but phase {args.phase} starts at step {start}: "
                              f"finish phase {args.phase - 1} first (`--phase {args.phase - 1} --resume`)")

    # --- data: rank 0 builds the token shards once, the others then read its cache
    if ctx.ddp and not ctx.master:
        dist.barrier()
    shards = data.prepare_data(mixture, tok, data_dir=args.data_dir, phases=(args.phase,), log=log)
    if ctx.ddp and ctx.master:
        dist.barrier()
    B, T = plan.micro_batch, plan.seq_len
    loader = data.TokenLoader(data.phase_sources(mixture, shards, args.phase), B, T, rank=ctx.rank,
                              world_size=ctx.world_size, eot=tok.eot, seed=args.seed + args.phase)
    # validation: the same few batches of every source's held-out documents, each source weighted equally
    val = [b for name in sorted(shards) for b in data.val_batches(
        shards[name].val, B, T, args.eval_batches, rank=ctx.rank, world_size=ctx.world_size, eot=tok.eot)]

    # --- model and optimizer: fresh in phase 1; phases 2 and 3 load the previous phase's final weights + optimizer
    model, raw = train.build_model(config, ctx, parallel, args.seed)  # meta device -> shards -> init: no full copy
    if args.fp8:
        raw.set_fp8(True)
    opt = muon.MuonAdamW(muon.param_groups(model, plan.lr, args.weight_decay, adamw_only=args.optimizer == "adamw"),
                         ns_dtype=ctx.ns_dtype)
    if resume_step is not None:
        step = train.resume(phase_dir, raw, opt, loader, ctx, log)
    else:
        step = start
        if args.phase > 1:
            train.resume_checkpoint(prev_dir, prev_step, raw, opt, ctx)
    if args.compile:
        model = torch.compile(model)
    meta = dict(stage=f"phase{args.phase}", tokenizer=tok.name, phase=args.phase, preset=args.preset,
                args=vars(args), phase_steps=plan.phase_steps)
    metrics = os.path.join(phase_dir, "metrics.jsonl")
    os.makedirs(phase_dir, exist_ok=True)
    train.start_tracking(args, phase_dir, ctx)
    log(f"phase {args.phase}: global steps {start}..{end} of {plan.total}, global batch {plan.batch_at(step)} -> "
        f"{plan.batch[1]} sequences of {T}, {args.optimizer} lr {plan.lr}, world {ctx.world_size} ({parallel}), "
        f"device {ctx.device}")
    if step >= end:
        log(f"phase {args.phase}: already complete at step {step} ({phase_dir})")
        train.compute_cleanup(ctx)
        return {"step": step, "val_loss": float("nan")}

    # --- the loop: each step takes batch_at(step) / unit micro-batches, so the batch ramp is real
    val_loss, first = float("nan"), step
    if step == start:  # where this phase starts from, for the record
        val_loss = train.evaluate(model, val, ctx)
        train.log_metrics(metrics, dict(step=step, val_loss=val_loss), ctx)
    fpt = M.flops_per_token(config, T)
    bar = tqdm(range(step, end), desc=f"phase{args.phase}", disable=not ctx.master, dynamic_ncols=True,
               initial=step, total=end)
    for step in bar:
        batches = [loader.next_batch() for _ in range(plan.batch_at(step) // plan.unit)]
        record = train.train_step(ctx, model, raw, opt, batches, train.whd_schedule(step, plan.total, plan.warmup,
                                  plan.decay), phase_dir, step, args.grad_clip, fpt, mtp_weight=args.mtp_weight,
                                  aux_coef=plan.aux_coef)
        record.update(batch=plan.batch_at(step), padding=loader.stats()["padding"])
        train.log_metrics(metrics, record, ctx, echo=(step + 1) % args.log_every == 0)
        bar.set_postfix(loss=f"{record['ce']:.3f}", lr=f"{record['lr']:.2e}")
        if (step + 1) % args.eval_every == 0 or step + 1 == end:
            val_loss = train.evaluate(model, val, ctx)
            train.log_metrics(metrics, dict(step=step + 1, val_loss=val_loss), ctx)
        if train.save_if_due(ctx, phase_dir, step + 1, end, first, args, raw, opt, meta, loader, log,
                             f"phase{args.phase}"):
            break
    bar.close()
    packing = loader.stats()
    log(f"phase {args.phase} at step {step + 1}: val loss {val_loss:.4f}; checkpoint in {phase_dir}; packing: "
        f"{packing['padding']:.1%} of positions without a target, {packing['dropped']:,} of {packing['docs']:,} "
        "documents dropped (low diversity)")
    train.compute_cleanup(ctx)
    return {"step": step + 1, "val_loss": val_loss}


if __name__ == "__main__":
    train.run(main, "pretrain.py")
