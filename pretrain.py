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
# Model construction: meta device -> expert slice -> FSDP2 shards -> materialise -> init

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
    # CPU: the README's Muon ablation on tiny found 3e-2 best of 1e-3 .. 1e-1 (120 steps). Its balancing ablation
    # (README): at 1e-3 the router collapses (max/mean expert load ~7 of a possible 8) and stays there; 1e-1 keeps
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
# RNG state (saved per rank with the loader position)

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




def optimizer_step(model, optimizer, grad_clip):
    """Clip the global gradient norm, step, zero the gradients; returns the norm before clipping."""
    norm = clip_grad_norm(model, grad_clip)
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

def add_loop_args(ap, ckpt_every, parallel_help="auto: FSDP2 above 2B parameters, DDP below"):
    """The flags every training stage shares: checkpoints, stopping early, logging, device and data parallelism."""
    ap.add_argument("--ckpt-every", type=int, default=ckpt_every)
    ap.add_argument("--stop-after", type=int, default=None, help="train this many steps, checkpoint and exit "
                    "(for time-limited job slots; continue with --resume)")
    ap.add_argument("--log-every", type=int, default=1)
    # --- runtime
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto", help=parallel_help)


def run(main, errors=(FloatingPointError,), name=None):
    """A stage's entry point: `errors` (a non-finite loss, ...) end the process with their message, not a
    traceback."""
    try:
        main()
    except errors as e:
        print(f"{name}: {e}" if name else e, file=sys.stderr)
        sys.exit(1)


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
                    "(its best LR on tiny was 3e-3, README)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: the recipe's; tiny 3e-2, the best "
                    "Muon LR of the README's ablation; mellum2-12b 3e-4, the report's)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=None, help="warmup steps, or a fraction of all three phases' "
                    "steps when < 1 (default: the recipe's)")
    ap.add_argument("--decay", type=float, default=None, help="steps of the final linear decay to zero, or a "
                    "fraction when < 1 (default: the recipe's; tiny and mellum2-1b: the whole last phase, the report's shape)")
    ap.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the MTP loss (the report's 0.1)")
    ap.add_argument("--aux-coef", type=float, default=None, help="balancing-loss coefficient per MoE layer "
                    "(default: the recipe's: the report's 1e-3; tiny 0.1, from the README's ablation)")
    # --- evaluation, checkpoints, logging
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=4, help="per source")
    add_loop_args(ap, 100, parallel_help="auto: FSDP2 above 2B parameters or with --ep > 1, DDP below")
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


def main(argv=None):
    args = parse_args(argv)
    if args.export_hf:
        return export_hf(*args.export_hf)
    ctx = compute_init(args.device, args.ep)
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
        _, prev_meta = read_meta(prev_dir, prev_step)
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
    aux_coef = recipe.aux_coef if args.aux_coef is None else args.aux_coef
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
    # a resumed phase keeps the plan it was started with (also at another world size); later phases inherit it
    resume_step = latest_step(phase_dir) if args.resume else None
    plan_meta = read_meta(phase_dir, resume_step)[1] if resume_step is not None else prev_meta
    if plan_meta is not None:
        phase_steps = {int(p): n for p, n in plan_meta["phase_steps"].items()}
    else:
        phase_steps = plan_phases(budgets, T, batch_at, recipe.ramp_steps, *((recipe.total_steps, int(recipe.decay))
                                                                             if pinned else ()))
    if args.steps is not None:
        phase_steps[args.phase] = args.steps
    total = sum(phase_steps.values())
    start = sum(n for p, n in phase_steps.items() if p < args.phase)
    end = start + phase_steps[args.phase]
    warmup, decay = (args.warmup or recipe.warmup), (args.decay or recipe.decay or phase_steps[max(phase_steps)])
    warmup, decay = (min(total, max(1, round(x * total)) if x < 1 else int(x)) for x in (warmup, decay))
    parallel = args.parallel if args.parallel != "auto" else \
        ("fsdp" if M.count_params(config)["total"] > 2e9 or args.ep > 1 else "ddp")

    if args.dry_run:
        if ctx.master:
            print(M.summary(config, T, n_gpus=world if parallel == "fsdp" else 1))
            ramp_end = next(s for s in range(recipe.ramp_steps + 1) if batch_at(s) == end_batch)
            print(f"recipe {args.preset}: {T:,}-token sequences, micro-batch {B} x {world} ranks; global batch "
                  f"{batch_at(0):,} -> {end_batch:,} sequences (linear in rounds of {unit:,}, reached at step "
                  f"{ramp_end:,}); peak lr {lr:g} ({args.optimizer}), warmup {warmup:,} steps, hold, linear decay "
                  f"to 0 over the last {decay:,} of {total:,} steps; mtp weight {args.mtp_weight}, aux coef "
                  f"{aux_coef} per layer")
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
    model, raw = build_model(config, ctx, parallel, args.seed)  # meta device -> shards -> init: no full copy
    if args.fp8:
        raw.set_fp8(True)
    opt = muon.MuonAdamW(muon.param_groups(model, lr, args.weight_decay, adamw_only=args.optimizer == "adamw"))
    step = start
    if resume_step is not None:
        step = resume_step
        rank_state = resume_checkpoint(phase_dir, step, raw, opt, ctx)
        if rank_state is not None:
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
        if ctx.master:
            print(f"resumed {phase_dir} at step {step}" + ("" if rank_state is not None else
                  " with another number of ranks: weights and optimizer resharded, the data stream starts afresh"))
    elif args.phase > 1:
        resume_checkpoint(prev_dir, prev_step, raw, opt, ctx)
    if args.compile:
        model = torch.compile(model)
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
                                 aux_coef=aux_coef)
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
    run(main)
