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
Many GPUs / nodes (DDP for small presets, FSDP2 for large ones, chosen by --parallel auto; --ep 8: expert
parallelism over each node's 8 GPUs, FSDP2 over the rest, the report's layout):
    torchrun --nproc_per_node=8 pretrain.py --preset mellum2-1b --phase 1
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 \
        pretrain.py --preset mellum2-12b --phase 1 --ep 8
Plan only: python pretrain.py --phase 1 --dry-run --world-size 64 --preset mellum2-12b
Share: python pretrain.py --export-hf out/pretrain/phase3 out/hf/base     (one Hugging Face-format directory)

Checkpoints: out/pretrain/phase{N}/step_{step}/ (a torch.distributed.checkpoint of model + optimizer, every rank's
loader/RNG state, meta.json), written atomically every --ckpt-every steps and at the end of the phase; --resume
continues exactly (model, optimizer, loader position, RNG) at the same world size, and at another one with the
weights and optimizer resharded. Any later stage loads it in one process or many. Steps are counted globally
across the three phases, so the schedule is one curve.
Metrics: out/pretrain/phase{N}/metrics.jsonl, one JSON object per step and per evaluation.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from tqdm import tqdm

import data
import kernels
import model as M
import muon

# DCP warns on every single-process save/load (sample.py, one-process training) that it assumes one process: it does.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# -----------------------------------------------------------------------------
# Compute: one CPU process, one GPU, or torchrun's N processes

@dataclass
class Compute:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False
    ep: int = 1  # expert-parallel group size: each layer's experts are split over `ep` consecutive ranks
    mesh: DeviceMesh = None  # (dp, ep) when ep > 1; rank = dp_index * ep + ep_index
    mesh_ep_major: DeviceMesh = None  # the same ranks as (ep, dp): how checkpoints see the expert slices

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):  # bf16 autocast on GPU; fp32 on CPU (CPU bf16 matmuls are slow and not what we test)
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def compute_init(device=None, ep=1):
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        return Compute(dev, rank, local, world, ddp=world > 1, **_meshes(dev, world, ep))
    if ep != 1:
        raise SystemExit(f"--ep {ep} needs {ep} or a multiple of {ep} processes (torchrun); one process holds all "
                         "experts, leave --ep at 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Compute(dev)


def _meshes(device, world, ep):
    if ep < 1 or world % ep:
        raise SystemExit(f"--ep {ep} must divide the number of processes ({world})")
    if ep == 1:
        return {}
    ranks = torch.arange(world).view(world // ep, ep)  # EP groups are consecutive ranks: one node's GPUs
    return dict(ep=ep, mesh=init_device_mesh(device.type, tuple(ranks.shape), mesh_dim_names=("dp", "ep")),
                mesh_ep_major=DeviceMesh(device.type, ranks.T, mesh_dim_names=("ep", "dp")))


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
# Training checkpoints: <dir>/step_{N:06d}/ holds the model and optimizer state as a torch.distributed.checkpoint
# (DCP) directory (*.distcp + .metadata: each rank writes its own shards, any number of ranks reads them back,
# resharding as needed), rank_{r}.pt (rank r's loader position and RNG state) and meta.json (stage, tokenizer,
# config, world size, ...). All ranks write into step_{N}.tmp; rank 0 adds meta.json last and renames the
# directory, so a step_{N} directory exists only once it is complete.

def _step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:06d}")


def latest_step(ckpt_dir):
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    steps = [int(n[5:]) for n in names if re.fullmatch(r"step_\d+", n)
             and os.path.isfile(os.path.join(ckpt_dir, n, "meta.json"))]
    return max(steps, default=None)


def read_meta(ckpt_dir, step=None):
    """(step, meta dict) of a checkpoint directory's given or latest step."""
    step = latest_step(ckpt_dir) if step is None else step
    path = os.path.join(_step_dir(ckpt_dir, step), "meta.json") if step is not None else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint{'' if step is None else f' for step {step}'} here "
                                "(expected step_NNNNNN/meta.json from a training stage, or a Hugging Face "
                                "config.json + *.safetensors)")
    with open(path) as f:
        return step, json.load(f)


def _expert_views(state, ctx, path=""):
    """The state with every expert tensor (the parameters' and their optimizer state's: any entry under a key path
    that names `.experts.`) replaced by a DTensor of the whole layer's experts over the (ep, dp) mesh: experts are
    split into ep slices (EP), each slice sharded by FSDP2 over dp, which is Shard(0) on the ep-major mesh. The
    views share memory with the originals, so DCP reads and writes the real tensors, and a checkpoint holds
    [E, ...] tensors whatever the EP size that wrote it."""
    if ctx.ep == 1:
        return state
    out = {}
    for k, v in state.items():
        key = f"{path}.{k}"
        if isinstance(v, dict):
            out[k] = _expert_views(v, ctx, key)
        elif isinstance(v, DTensor) and ".experts." in key:
            shape = (v.size(0) * ctx.ep, *v.shape[1:])
            out[k] = DTensor.from_local(v.to_local(), ctx.mesh_ep_major, [Shard(0), Shard(0)], run_check=False,
                                        shape=shape, stride=torch.empty(shape, device="meta").stride())
        else:
            out[k] = v
    return out


def save_checkpoint(ckpt_dir, step, model, optimizer, meta, rank_state=None, ctx=None):
    """Collective under torchrun: every rank calls it. model: raw, DDP- or FSDP2-wrapped (+ EP); optimizer:
    muon.MuonAdamW or None; meta: JSON dict (stage, tokenizer, ...) to which step, config and world size are
    added; rank_state: this rank's picklable dict (loader state, RNG), or None."""
    ctx = ctx or Compute(torch.device("cpu"))
    final, tmp = _step_dir(ckpt_dir, step), _step_dir(ckpt_dir, step) + ".tmp"
    if ctx.master:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
        os.makedirs(tmp)
    if ctx.ddp:
        dist.barrier()
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(_expert_views(state, ctx), checkpoint_id=tmp, no_dist=not ctx.ddp)
    if rank_state is not None:
        torch.save(rank_state, os.path.join(tmp, f"rank_{ctx.rank}.pt"))
    if ctx.ddp:
        dist.barrier()
    if ctx.master:
        meta = {**meta, "step": step, "world_size": ctx.world_size, "config": unwrap(model).config.to_hf()}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run's last step)
        os.replace(tmp, final)
    if ctx.ddp:
        dist.barrier()


def resume_checkpoint(ckpt_dir, step, model, optimizer, ctx=None):
    """Load step `step` of ckpt_dir into model (and optimizer, unless None) in place, whatever the world size,
    sharding or EP size that wrote it (DCP reshards). Returns this rank's saved rank_state, or None when the
    checkpoint was written by another world size (the caller re-derives the loader position from meta)."""
    ctx = ctx or Compute(torch.device("cpu"))
    step, meta = read_meta(ckpt_dir, step)
    if meta["config"] != unwrap(model).config.to_hf():
        raise ValueError(f"{ckpt_dir} step {step}: the checkpoint's config differs from this run's model; use the "
                         "same --preset / flags as the run that wrote it, or another --out-dir")
    path = _step_dir(ckpt_dir, step)
    state = get_model_state_dict(model)
    dcp.load(_expert_views({"model": state}, ctx), checkpoint_id=path, no_dist=not ctx.ddp)
    set_model_state_dict(model, state)
    if optimizer is not None:
        # DCP first gives every parameter optimizer state (a zero-lr step on zero gradients); a parameter that
        # had no gradient before the save (the MTP block, if no step ever ran it) has none in the checkpoint and
        # keeps those zeros: a partial load.
        state = get_optimizer_state_dict(model, optimizer)
        dcp.load(_expert_views({"optim": state}, ctx), checkpoint_id=path, no_dist=not ctx.ddp,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        set_optimizer_state_dict(model, optimizer, state)
    path = os.path.join(path, f"rank_{ctx.rank}.pt")
    if meta["world_size"] != ctx.world_size or not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path, step=None, device="cpu"):
    """(model, meta) in this process alone, from a training checkpoint directory (latest step unless given)
    written by any number of ranks, or from a Hugging Face-format directory (config.json + safetensors; meta {})."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return M.Mellum.from_pretrained(path, device=device), {}
    step, meta = read_meta(path, step)
    config = M.Config.from_hf(meta["config"], source=os.path.join(_step_dir(path, step), "meta.json"))
    with torch.device("meta"):
        model = M.Mellum(config)
    model.to_empty(device=device)
    dcp.load({"model": model.state_dict()}, checkpoint_id=_step_dir(path, step), no_dist=True)  # in place
    return model, meta


def export_hf(ckpt_dir, out_dir, step=None):
    """The checkpoint as one consolidated Hugging Face-format directory (config.json + *.safetensors), for
    sharing: `python pretrain.py --export-hf out/pretrain/phase3 out/hf/base`."""
    model, meta = load_checkpoint(ckpt_dir, step)
    model.save_pretrained(out_dir)
    print(f"exported {ckpt_dir} step {meta.get('step')} to {out_dir} (Hugging Face format)")


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
    """DDP (replicated weights, all-reduced grads) or FSDP2 (every decoder layer sharded over all ranks) when
    world > 1. With expert parallelism, each MoE layer's experts (already a different slice on every rank of an EP
    group) are sharded by FSDP2 only over mesh["dp"], the ranks that hold the same slice. Their gradients are
    divided by the world size, not by dp: the all_to_all backward already summed, on the expert's rank, the
    gradients of all `ep` ranks that routed tokens to it, so the dp-sum holds every rank's term once, as the
    all-rank average of the other parameters does."""
    if not ctx.ddp:
        return model
    sharded_experts = any(m.ep_group is not None for m in model.moe_layers())
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for layer in list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else []):
            if isinstance(layer.mlp, M.MoE) and layer.mlp.ep_group is not None:
                fully_shard(layer.mlp.experts, mesh=ctx.mesh["dp"])
                layer.mlp.experts.set_gradient_divide_factor(ctx.world_size)
                # sum, then divide (gloo has no PREMUL_SUM); not with one dp rank, where torch 2.13 would divide twice
                layer.mlp.experts.set_force_sum_reduction_for_comms(ctx.mesh["dp"].size() > 1)
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if sharded_experts:
        raise ValueError("expert parallelism needs --parallel fsdp: DDP would average the different experts of "
                         "the EP ranks as if they were replicas")
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def unwrap(model):
    """The Mellum inside a DDP or torch.compile wrapper (FSDP2 shards in place: the model is its own raw)."""
    while not isinstance(model, M.Mellum):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def build_model(config, ctx, parallel, seed):
    """(model to train, raw Mellum). The model is built on the meta device (no memory), its experts cut to this
    rank's slice (ctx.ep > 1), sharded by FSDP2, and only then materialised and initialised: each rank allocates
    and fills its shard, never the whole model. Mellum.init_weights draws each matrix from its own seed, so the
    weights are those of Mellum(config).init_weights(seed) in one process. DDP wraps after materialising (it
    replicates the whole model anyway)."""
    if ctx.ep > 1 and parallel != "fsdp":
        raise SystemExit(f"--ep {ctx.ep} needs --parallel fsdp (DDP cannot keep different experts per rank)")
    with torch.device("meta"):
        raw = M.Mellum(config)
    if ctx.ep > 1:
        for moe in raw.moe_layers():
            moe.shard_experts(ctx.mesh["ep"].get_group())
    model = wrap_model(ctx, raw, parallel) if parallel == "fsdp" else raw
    raw.to_empty(device=ctx.device)
    raw.init_weights(seed)
    if parallel != "fsdp":
        model = wrap_model(ctx, raw, parallel)
    return model, raw


def clip_grad_norm(model, max_norm):
    """torch.nn.utils.clip_grad_norm_, also for FSDP2 + EP, whose gradients are DTensors on two device meshes
    (torch's version cannot stack their norms). Every element of a sharded gradient lives on exactly one rank,
    so the squares summed locally and then over all ranks give the global norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    local = [g.to_local() for g in grads]
    sq = torch.stack([g.float().square().sum() for g in local]).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return norm


def train(ctx, model, loader, val_loss_fn, *, out_dir, stage, steps, lr, schedule, mtp_weight=0.3, grad_accum=1,
          grad_clip=1.0, eval_every=100, ckpt_every=500, meta=None, resume=False, optimizer="muon",
          weight_decay=0.1, start_step=0, init_from=None, parallel="ddp", stop_after=None, log_every=1,
          compile=False):
    """Run global steps start_step .. start_step + steps - 1 (or continue from out_dir's latest checkpoint when
    resume) on `model`, already wrapped for this world (build_model / wrap_model). `schedule(step)` is the LR
    multiplier; `mtp_weight` a float or a function of the step. `init_from` = (dir, step) of an earlier stage's
    checkpoint loads its weights and optimizer state. Returns final metrics."""
    raw = unwrap(model)
    end_step = start_step + steps
    resumed = resume and latest_step(out_dir) is not None
    if resumed:
        start_step = latest_step(out_dir)
    if start_step >= end_step:
        if ctx.master:
            print(f"{stage}: already complete at step {start_step} ({out_dir})")
        return {"step": start_step, "val_loss": float("nan")}

    opt = muon.MuonAdamW(muon.param_groups(model, lr, weight_decay, adamw_only=optimizer == "adamw"))
    if resumed:
        rank_state = resume_checkpoint(out_dir, start_step, model, opt, ctx)
        if rank_state is not None:
            loader.load_state_dict(rank_state["loader"])
            _set_rng_state(rank_state["rng"])
        if ctx.master:
            print(f"resumed {out_dir} at step {start_step}" + ("" if rank_state is not None else
                  " with another number of ranks: weights and optimizer resharded, the data stream starts afresh"))
    elif init_from is not None:
        resume_checkpoint(*init_from, model, opt, ctx)
    if compile:
        model = torch.compile(model)
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
        save_checkpoint(out_dir, step, model, opt, meta, {"loader": loader.state_dict(), "rng": _rng_state()}, ctx)

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
            last_good = latest_step(out_dir)
            msg = (f"{stage}: non-finite loss at step {step} (ce, mtp, aux = {parts.tolist()}); stopping. "
                   f"Last good checkpoint: {out_dir} step {last_good}. Lower --lr or check the data.")
            raise FloatingPointError(msg)
        grad_norm = clip_grad_norm(model, grad_clip).item()
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
                    help="auto: FSDP2 above 2B parameters or with --ep > 1, DDP below")
    ap.add_argument("--ep", type=int, default=1, help="expert parallelism: each layer's experts split over groups "
                    "of this many consecutive ranks (the report trains with 8), FSDP2 over the rest")
    ap.add_argument("--fp8", action="store_true", help="FP8 GEMMs (E4M3 fwd / E5M2 grads) on Hopper/Ada GPUs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--export-hf", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"), help="write CKPT_DIR's latest "
                    "checkpoint as one Hugging Face-format directory (config.json + safetensors) and exit")
    args = ap.parse_args(argv)
    if args.phase is None and not args.export_hf:
        ap.error("--phase is required (or --export-hf CKPT_DIR OUT_DIR)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export_hf:
        return export_hf(*args.export_hf)
    ctx = compute_init(args.device, args.ep)
    torch.manual_seed(args.seed + ctx.rank)
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
        _, prev_meta = read_meta(prev_dir, prev_step)
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
    parallel = args.parallel if args.parallel != "auto" else ("fsdp" if n_params["total"] > 2e9 or args.ep > 1
                                                              else "ddp")

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
                              rank=ctx.rank, world_size=ctx.world_size, seed=args.seed + args.phase)
    # validation: the same few batches of every source's held-out documents, each source weighted equally
    val = [b for name in sorted(shards) for b in data.val_batches(
        shards[name].val, args.batch_size, seq_len, args.eval_batches, rank=ctx.rank, world_size=ctx.world_size)]

    # --- model: fresh in phase 1, the previous phase's final checkpoint (weights + optimizer) in phases 2 and 3
    init_from = None
    if args.phase > 1:
        if prev_step != start:
            raise SystemExit(f"{prev_dir} ends at step {prev_step}, but phase {args.phase} starts at step {start}: "
                             f"finish phase {args.phase - 1} first (`--phase {args.phase - 1} --resume`)")
        if prev_meta["config"] != config.to_hf():
            raise SystemExit(f"{prev_dir}: checkpoint was trained with another config than --preset {args.preset}")
        init_from = (prev_dir, prev_step)
    model, raw = build_model(config, ctx, parallel, args.seed)
    if args.fp8:
        raw.set_fp8(True)

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
                   weight_decay=args.weight_decay, init_from=init_from, parallel=parallel,
                   stop_after=args.stop_after, log_every=args.log_every, compile=args.compile)
    if ctx.master:
        print(f"phase {args.phase} done at step {result['step']}: val loss {result['val_loss']:.4f}; "
              f"checkpoint in {phase_dir}")
    compute_cleanup(ctx)
    return result


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
