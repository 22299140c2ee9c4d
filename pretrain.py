"""
Three-phase pre-training of Mellum 2: one continuous Warmup-Hold-Decay run whose data mixture shifts from diverse
prose toward curated code and math (phase 1 -> 2 -> 3), optimised with Muon + AdamW, loss = next-token CE +
lambda * MTP CE + aux * load-balancing loss.

CPU, the default `tiny` preset on the embedded corpus (built and cached under data/ on first use):
    python pretrain.py --phase 1
    python pretrain.py --phase 2        # starts from phase 1's final checkpoint
    python pretrain.py --phase 3        # the decay phase: the learning rate reaches zero at its last step
One GPU (bf16 autocast; --fp8 for FP8 GEMMs on Hopper/Ada):
    python pretrain.py --preset mellum2-1b --phase 1 --batch-size 8 --seq-len 4096
Many GPUs / nodes (DDP for small presets, FSDP2 for large ones, chosen by --parallel auto):
    torchrun --nproc_per_node=8 pretrain.py --preset mellum2-1b --phase 1
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 \
        pretrain.py --preset mellum2-12b --phase 1
Plan only: python pretrain.py --phase 1 --dry-run --world-size 64 --preset mellum2-12b

Checkpoints: out/pretrain/phase{N}/model_{step}.pt + meta_{step}.json + optim_{step}_rank{r}.pt, written
atomically every --ckpt-every steps and at the end of the phase; --resume continues exactly (model, optimizer,
loader position, RNG). Steps are counted globally across the three phases, so the schedule is one curve.
Metrics: out/pretrain/phase{N}/metrics.jsonl, one JSON object per step and per evaluation.
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


# -----------------------------------------------------------------------------
# Schedule: Warmup-Hold-Decay over the three phases, decaying linearly to zero

def whd_schedule(step, total, warmup, decay):
    """LR multiplier at global step `step` of `total`: linear warmup over `warmup` steps, hold at 1, linear decay
    over the last `decay` steps reaching exactly 0 at step == total."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total - decay:
        return max(0.0, (total - step) / decay)
    return 1.0


# -----------------------------------------------------------------------------
# The training loop (shared with extend.py and the later stages)

def evaluate(model, batches, ctx=None):
    """Mean next-token CE over an iterable of (x, y), averaged over ranks."""
    model.eval()
    device = ctx.device if ctx else next(model.parameters()).device
    total, n = torch.zeros((), device=device), 0
    with torch.no_grad(), (ctx.autocast() if ctx else contextlib.nullcontext()):
        for x, y in batches:
            _, losses = model(x.to(device), y.to(device))
            total += losses["ce"].float()
            n += 1
    model.train()
    if ctx is not None and ctx.ddp:
        dist.all_reduce(total)
        n *= ctx.world_size
    return (total / max(n, 1)).item()


def _rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


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


def train(ctx, model, loader, val_loss_fn, *, out_dir, stage, steps, lr, schedule, mtp_weight=0.3, grad_accum=1,
          grad_clip=1.0, eval_every=100, ckpt_every=500, meta=None, resume=False, optimizer="muon",
          weight_decay=0.1, start_step=0, optim_state=None, parallel="ddp", stop_after=None, log_every=1,
          compile=False):
    """Run global steps start_step .. start_step + steps - 1 (or continue from out_dir's latest checkpoint when
    resume). `schedule(step)` is the LR multiplier; `mtp_weight` a float or a function of the step.
    `optim_state` (from an earlier stage's checkpoint) seeds the optimizer. Returns final metrics."""
    raw = model
    end_step = start_step + steps
    resumed = resume and M.latest_step(out_dir) is not None
    if resumed:
        start_step = M.latest_step(out_dir)
        ckpt_model, rmeta = M.load_checkpoint(out_dir, start_step)
        if rmeta["config"] != raw.config.to_hf():
            raise ValueError(f"{out_dir}: checkpoint config differs from this run's model; resume with the same "
                             "--preset / flags, or use a new --out-dir")
        raw.load_state_dict(ckpt_model.state_dict())
        extra = M.load_optim_state(out_dir, start_step, ctx.rank)
        optim_state = extra["optimizer"]
        loader.load_state_dict(extra["loader"])
        _set_rng_state(extra["rng"])
        if ctx.master:
            print(f"resumed {out_dir} at step {start_step}")
    if start_step >= end_step:
        if ctx.master:
            print(f"{stage}: already complete at step {start_step} ({out_dir})")
        return {"step": start_step, "val_loss": float("nan")}

    model = wrap_model(ctx, raw, parallel)
    if compile:
        model = torch.compile(model)
    opt = muon.MuonAdamW(muon.param_groups(model, lr, weight_decay, adamw_only=optimizer == "adamw"))
    if optim_state is not None:
        opt.load_state_dict(optim_state)
    meta = dict(meta or {}, stage=stage)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    B, T = loader.batch_size, loader.seq_len
    tokens_per_step = B * T * grad_accum * ctx.world_size
    fpt, peak = M.flops_per_token(raw.config, T), peak_flops(ctx.device)
    aux_coef = raw.config.router_aux_loss_coef

    def log(record):
        if ctx.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step):
        extra = {"optimizer": opt.state_dict(), "loader": loader.state_dict(), "rng": _rng_state()}
        M.save_checkpoint(out_dir, step, raw, meta, optim_state=extra, rank=ctx.rank)
        if ctx.ddp:
            dist.barrier()

    val_loss = float("nan")
    if not resumed:  # where this stage starts from, for the record
        val_loss = val_loss_fn(model)
        log(dict(step=start_step, val_loss=val_loss))
        if ctx.master:
            print(f"step {start_step:6d} | val loss {val_loss:.4f} (start of {stage})")
    bar = tqdm(range(start_step, end_step), desc=stage, disable=not ctx.master, dynamic_ncols=True,
               initial=start_step, total=end_step)
    model.train()
    for step in bar:
        t0 = time.perf_counter()
        mult = schedule(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        lam = mtp_weight(step) if callable(mtp_weight) else mtp_weight
        parts = torch.zeros(3, device=ctx.device)
        for micro in range(grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            last = micro == grad_accum - 1
            sync = (model.no_sync() if ctx.ddp and parallel == "ddp" and not last else contextlib.nullcontext())
            if ctx.ddp and parallel == "fsdp":
                model.set_requires_gradient_sync(last)
            with sync, ctx.autocast():
                _, losses = model(x, y)
                loss = losses["ce"] + lam * losses["mtp"] + aux_coef * losses["aux"]
                (loss / grad_accum).backward()
            parts += torch.stack([losses["ce"], losses["mtp"], losses["aux"]]).detach().float() / grad_accum
        if ctx.ddp:
            dist.all_reduce(parts, op=dist.ReduceOp.AVG)
        if not torch.isfinite(parts).all():
            last_good = M.latest_step(out_dir)
            msg = (f"{stage}: non-finite loss at step {step} (ce, mtp, aux = {parts.tolist()}); stopping. "
                   f"Last good checkpoint: {out_dir} step {last_good}. Lower --lr or check the data.")
            raise FloatingPointError(msg)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        load = raw.expert_load().float()
        imbalance = (load.max(dim=1).values / load.mean(dim=1)).mean().item() if load.numel() else 1.0
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        ce, mtp_l, aux = parts.tolist()
        record = dict(step=step + 1, ce=ce, mtp=mtp_l, aux=aux, lr=lr * mult, grad_norm=grad_norm,
                      tok_per_s=tps, mfu=(fpt * tps / ctx.world_size / peak) if peak else None, imbalance=imbalance)
        log(record)
        bar.set_postfix(loss=f"{ce:.3f}", lr=f"{lr * mult:.2e}")
        if ctx.master and (step + 1) % log_every == 0:
            mfu = f" | mfu {record['mfu'] * 100:.1f}%" if peak else ""
            tqdm.write(f"step {step + 1:6d}/{end_step} | ce {ce:.4f} | mtp {mtp_l:.4f} | aux {aux:.3f} | "
                       f"lr {lr * mult:.2e} | gnorm {grad_norm:.2f} | {tps:,.0f} tok/s{mfu} | "
                       f"imbalance {imbalance:.2f}")
        done = step + 1 == end_step
        stopping = stop_after is not None and step + 1 - start_step >= stop_after
        if (step + 1) % eval_every == 0 or done:
            val_loss = val_loss_fn(model)
            log(dict(step=step + 1, val_loss=val_loss))
            if ctx.master:
                tqdm.write(f"step {step + 1:6d} | val loss {val_loss:.4f}")
        if (step + 1) % ckpt_every == 0 or done or stopping:
            save(step + 1)
        if stopping:
            if ctx.master:
                tqdm.write(f"{stage}: stopped after {stop_after} steps at step {step + 1}; continue with --resume")
            break
    bar.close()
    return {"step": step + 1, "val_loss": val_loss}


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
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per rank per micro-step")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_position_embeddings")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override the steps of this phase (default: from "
                    "the mixture's token budget)")
    ap.add_argument("--seed", type=int, default=1337)
    # --- optimisation
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon", help="adamw: the ablation baseline")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: 0.02 with muon, 3e-3 with adamw)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup-frac", type=float, default=0.05, help="of all three phases' steps")
    ap.add_argument("--decay-frac", type=float, default=0.3, help="of all three phases' steps (ends phase 3)")
    ap.add_argument("--mtp-weight", type=float, default=0.3, help="lambda for phases 1-2 (DeepSeek-V3 uses 0.3)")
    ap.add_argument("--mtp-weight-final", type=float, default=0.1, help="lambda in phase 3 (DeepSeek-V3: 0.1)")
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
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = compute_init(args.device)
    torch.manual_seed(args.seed + ctx.rank)
    # --- tokenizer, config and the plan: steps per phase are fixed in phase 1 and read back in phases 2-3
    phase_dir = os.path.join(args.out_dir, f"phase{args.phase}")
    prev_dir = os.path.join(args.out_dir, f"phase{args.phase - 1}")
    prev_meta = None
    if args.phase > 1:
        prev_step = M.latest_step(prev_dir)
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
    seq_len = args.seq_len or config.max_position_embeddings
    lr = args.lr or 3e-3  # Muon's updates are scaled to AdamW's RMS, so one peak LR serves both
    mixture = data.load_mixture(args.mixture)
    if args.phase not in mixture.phases:
        raise SystemExit(f"the mixture {args.mixture or '(default)'} has no phase {args.phase} "
                         f"(it has {sorted(mixture.phases)})")
    world = args.world_size or ctx.world_size
    tokens_per_step = args.batch_size * seq_len * args.grad_accum * world
    if prev_meta is not None:
        phase_steps = {int(p): n for p, n in prev_meta["phase_steps"].items()}
    else:
        phase_steps = {p: max(1, math.ceil(ph.tokens / tokens_per_step)) for p, ph in mixture.phases.items()}
    if args.steps is not None:
        phase_steps[args.phase] = args.steps
    total = sum(phase_steps.values())
    start = sum(n for p, n in phase_steps.items() if p < args.phase)
    warmup, decay = max(1, round(args.warmup_frac * total)), max(1, round(args.decay_frac * total))
    n_params = M.count_params(config)
    parallel = args.parallel if args.parallel != "auto" else ("fsdp" if n_params["total"] > 2e9 else "ddp")

    if args.dry_run:
        if ctx.master:
            print(M.summary(config, seq_len, n_gpus=world if parallel == "fsdp" else 1))
            fpt = M.flops_per_token(config, seq_len)
            for p, ph in sorted(mixture.phases.items()):
                print(f"phase {p}: {ph.tokens:,} tokens = {phase_steps[p]} steps of {tokens_per_step:,} tokens, "
                      f"{fpt * phase_steps[p] * tokens_per_step:.3g} FLOPs, mixture {ph.weights}")
            print(f"world size {world} ({parallel}), global steps {total}: warmup {warmup}, decay to zero over the "
                  f"last {decay}; peak lr {lr} ({args.optimizer})")
        compute_cleanup(ctx)
        return

    if args.fp8 and not kernels.fp8_supported(ctx.device):
        raise SystemExit("--fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper) and Triton; "
                         f"this run's device is {ctx.device}")

    if ctx.ddp and not ctx.master:  # rank 0 builds the token shards once, the others then read its cache
        dist.barrier()
    shards = data.prepare_data(mixture, tok, data_dir=args.data_dir, phases=(args.phase,),
                               log=print if ctx.master else (lambda *a, **k: None))
    if ctx.ddp and ctx.master:
        dist.barrier()
    loader = data.TokenLoader(data.phase_sources(mixture, shards, args.phase), args.batch_size, seq_len,
                              eot=tok.eot, rank=ctx.rank, world_size=ctx.world_size, seed=args.seed + args.phase)
    # validation: the same few batches of every source's held-out documents, each source weighted equally
    val = [b for name in sorted(shards) for b in data.val_batches(
        shards[name].val, args.batch_size, seq_len, args.eval_batches, rank=ctx.rank, world_size=ctx.world_size,
        eot=tok.eot)]

    # --- model: fresh in phase 1, the previous phase's final checkpoint (weights + optimizer) in phases 2 and 3
    optim_state = None
    if args.phase == 1:
        model = M.Mellum(config).init_weights(args.seed)
    else:
        if prev_step != start:
            raise SystemExit(f"{prev_dir} ends at step {prev_step}, but phase {args.phase} starts at step {start}: "
                             f"finish phase {args.phase - 1} first (`--phase {args.phase - 1} --resume`)")
        model, meta = M.load_checkpoint(prev_dir, prev_step)
        if meta["config"] != config.to_hf():
            raise SystemExit(f"{prev_dir}: checkpoint was trained with another config than --preset {args.preset}")
        optim_state = M.load_optim_state(prev_dir, prev_step, ctx.rank)["optimizer"]
    model.to(ctx.device)
    if args.fp8:
        model.set_fp8(True)

    mtp_weight = args.mtp_weight_final if args.phase == 3 else args.mtp_weight
    meta = dict(tokenizer=tok.name, phase=args.phase, preset=args.preset, args=vars(args),
                phase_steps=phase_steps)
    if ctx.master:
        print(f"phase {args.phase}: global steps {start}..{start + phase_steps[args.phase]} of {total}, "
              f"{tokens_per_step:,} tokens/step, {args.optimizer} lr {lr}, world {ctx.world_size} ({parallel}), "
              f"device {ctx.device}")
    result = train(ctx, model, loader, lambda m: evaluate(m, val, ctx), out_dir=phase_dir, stage=f"phase{args.phase}",
                   steps=phase_steps[args.phase], start_step=start, lr=lr,
                   schedule=lambda s: whd_schedule(s, total, warmup, decay), mtp_weight=mtp_weight,
                   grad_accum=args.grad_accum, grad_clip=args.grad_clip, eval_every=args.eval_every,
                   ckpt_every=args.ckpt_every, meta=meta, resume=args.resume, optimizer=args.optimizer,
                   weight_decay=args.weight_decay, optim_state=optim_state, parallel=parallel,
                   stop_after=args.stop_after, log_every=args.log_every, compile=args.compile)
    if ctx.master:
        packing = loader.stats()
        print(f"phase {args.phase} done at step {result['step']}: val loss {result['val_loss']:.4f}; "
              f"checkpoint in {phase_dir}; packing: {packing['padding']:.1%} of positions without a target, "
              f"{packing['dropped']:,} of {packing['docs']:,} documents dropped (low diversity)")
    compute_cleanup(ctx)
    return result


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
