"""
The toolkit every training stage shares (pretrain.py, extend.py, sft.py, rlvr.py import it; no stage imports
another). Each stage writes its own loop from these pieces.

Contents, top to bottom
  Compute, compute_init, compute_cleanup     one CPU process, one GPU, or torchrun's N processes (+ the EP mesh)
  Hugging Face format                        config_to_hf / config_from_hf, save_pretrained / from_pretrained
                                             (experts on disk as 2-D tensors per expert, the released layout)
  Training checkpoints                       save_checkpoint, resume_checkpoint, resume, latest_step, read_meta
  load_model                                 THE loader: a stage directory or a Hugging Face directory ->
                                             (model, tokenizer, meta), used by every stage, eval.py and sample.py
  Model construction                         choose_parallel, build_model (meta device -> shards -> init),
                                             wrap_model (DDP / FSDP2 / FSDP2 + EP), unwrap
  One optimizer step                         token_normaliser, forward_backward, clip_grad_norm, optimizer_step,
                                             train_step (all of it, timed, as one log record)
  whd_schedule, recipe_for, rng_state, evaluate, imbalance, log_metrics
  Experiment tracking                        start_tracking, Tracker: metrics.jsonl mirrored to TensorBoard / W&B
  The stage command line                     add_stage_args (the flags every loop shares), micro_batches (the
                                             global-batch check), save_if_due, run (the entry point: expected
                                             errors become one line and exit code 2)

Checkpoints: <dir>/step_{N:06d}/ holds the model and optimizer state as a torch.distributed.checkpoint (DCP)
directory (*.distcp + .metadata: each rank writes its own shards, any number of ranks reads them back, resharding
as needed), rank_{r}.pt (rank r's loader position and RNG state) and meta.json (stage, tokenizer, config, world
size, ...). All ranks write into step_{N}.tmp; rank 0 adds meta.json last and renames the directory, so a
step_{N} directory exists only once it is complete.

Footguns
- Losses are normalised by the number of targets (y != -1) of the whole global batch, not per micro-batch:
  a micro-batch with few targets (padding, SFT masks) weighs less, exactly as in one big batch.
- The balancing loss of a micro-batch uses the expert counts of the step so far (model.py, router_losses):
  forward_backward calls `reset_router_counts()` at the start of every step; a loop that calls the model's
  forward directly must do the same, or it gets per-micro-batch counts.
- Under FSDP2 + EP, state_dict() holds this rank's expert slice only: save/resume go through DCP with the expert
  tensors viewed whole ([E, ...]), so a checkpoint reads back at any EP size.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from tqdm import tqdm

import data
import kernels
import model as M

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
    dtype: str = "auto"  # matmul precision: bf16 autocast, fp32, or auto (bf16 on a GPU, fp32 on a CPU: see autocast)
    tracker: "Tracker" = None  # rank 0's TensorBoard / W&B mirror of metrics.jsonl (start_tracking)

    @property
    def master(self):
        return self.rank == 0

    @property
    def bf16(self):
        return self.dtype == "bf16" or (self.dtype == "auto" and self.device.type == "cuda")

    @property
    def ns_dtype(self):
        """Muon's Newton-Schulz dtype: --dtype fp32 keeps it in fp32 too; else muon.ns_dtype's choice (bf16 on a
        GPU and on a CPU with bf16 matrix instructions) or bf16 when asked."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(self.dtype)

    def autocast(self):
        """bf16 autocast when asked (--dtype bf16, on any device: how the tests run the GPU's precision on a CPU)
        and by default on a GPU. On a CPU by default the model runs in fp32 (bf16 autocast is slower there), but
        where the CPU has bf16 matrix instructions (AMX, AVX512-BF16) the LM head's matmuls run in bf16
        (kernels.head_matmuls: ~40% of tiny's step, 1.8x faster); --dtype fp32 keeps everything fp32. Master
        weights, gradients and optimizer state stay fp32; the router and the losses run in fp32 inside (model.py)."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.dtype == "auto" and kernels.bf16_matmul_fast(self.device):  # here: a bf16 CPU
            return kernels.head_matmuls(torch.bfloat16)
        return contextlib.nullcontext()


def compute_init(device=None, ep=1, dtype="auto"):
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        return Compute(dev, rank, local, world, ddp=world > 1, dtype=dtype, **_meshes(dev, world, ep))
    if ep != 1:
        raise SystemExit(f"--ep {ep} needs {ep} or a multiple of {ep} processes (torchrun); one process holds all "
                         "experts, leave --ep at 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Compute(dev, dtype=dtype)


def _meshes(device, world, ep):
    if ep < 1 or world % ep:
        raise SystemExit(f"--ep {ep} must divide the number of processes ({world})")
    if ep == 1:
        return {}
    ranks = torch.arange(world).view(world // ep, ep)  # EP groups are consecutive ranks: one node's GPUs
    return dict(ep=ep, mesh=init_device_mesh(device.type, tuple(ranks.shape), mesh_dim_names=("dp", "ep")),
                mesh_ep_major=DeviceMesh(device.type, ranks.T, mesh_dim_names=("ep", "dp")))


def compute_cleanup(ctx):
    if ctx.tracker is not None:
        ctx.tracker.close()
        ctx.tracker = None
    if ctx.ddp and dist.is_initialized():
        dist.barrier()  # leave together: no rank tears its group down while a peer is still in a collective with it
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
# Hugging Face format: config.json + *.safetensors, the released checkpoints' layout (transformers loads it)

def config_to_hf(config):
    """The config.json of a Config: field names already match Hugging Face's, except MTP's."""
    d = asdict(config)
    d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
    if config.num_mtp_layers:
        d["mtp_layer_types"], d["mtp_mlp_layer_types"] = [M.SLIDING], ["sparse"]
    return dict(model_type="mellum", architectures=["MellumForCausalLM"], hidden_act="silu",
                tie_word_embeddings=False, attention_bias=False, norm_topk_prob=True, **d)


def config_from_hf(d, source="config.json"):
    """A Config from a config.json dict (ours, or a released checkpoint's); refuses what nanoMellum does not
    implement, naming `source`."""
    if d.get("model_type") != "mellum":
        raise data.InputError(f"{source}: model_type is {d.get('model_type')!r}, expected 'mellum' "
                              "(this is not a Mellum checkpoint)")
    for key, want in [("hidden_act", "silu"), ("tie_word_embeddings", False), ("attention_bias", False),
                      ("norm_topk_prob", True)]:
        if d.get(key, want) != want:
            raise data.InputError(f"{source}: {key}={d[key]!r} is not supported (nanoMellum implements {want!r})")
    d = dict(d)
    d["num_mtp_layers"] = d.get("num_nextn_predict_layers") or d.get("num_mtp_layers") or 0
    d.setdefault("num_experts", d.get("num_local_experts"))
    names = {f.name for f in fields(M.Config)}
    return M.Config(**{k: v for k, v in d.items() if k in names and v is not None})


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json")


def save_pretrained(model, path, max_shard_bytes=5 * 2**30, dtype=None, tokenizer=None):
    """config.json + model(-0000i-of-0000n).safetensors (+ index), written to a temp dir then renamed.
    Experts are written one 2-D tensor each (`experts.{e}.gate_proj.weight`, ...), the on-disk layout of
    the released checkpoints and of transformers. tokenizer (a data.Tokenizer): also write its Hugging Face
    files and the chat stop token as eos_token_id, so transformers and sample.py can use the directory alone; a
    data.HFTokenizer (a released checkpoint's): copy its directory's tokenizer files and token ids."""
    from safetensors.torch import save_file
    tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu() for k, v in model.state_dict().items()}
    state = {k: v.contiguous() for k, v in split_experts(state).items()}
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards, cur, size = shards + [cur], {}, 0
        cur[k], size = v, size + v.nbytes
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf = config_to_hf(model.config)
    if isinstance(tokenizer, data.HFTokenizer):  # a released checkpoint's tokenizer: its files and ids, as they were
        src = os.path.dirname(tokenizer.name)
        for name in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), tmp)
        with open(os.path.join(src, "config.json")) as f:
            hf.update({k: v for k, v in json.load(f).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    elif tokenizer is not None:
        data.save_hf_tokenizer(tokenizer, tmp)
        hf.update(eos_token_id=tokenizer.special[data.CHAT_STOP], pad_token_id=tokenizer.eot, bos_token_id=None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)

def from_pretrained(path, device="cpu", dtype=torch.float32):
    """Load a Hugging Face-format directory (released Mellum 2 checkpoints, or save_pretrained output).
    Per-expert tensors are stacked into the 3-D expert parameters; fused 3-D tensors load as they are."""
    from safetensors import safe_open
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a Hugging Face-format model directory")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f), source=cfg_path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with torch.device("meta"):
        model = M.Mellum(config)
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            state.update({k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys()})
    state = fuse_experts(state, source=path)
    if config.num_mtp_layers and not any(k.startswith("mtp.") for k in state):
        # transformers does not save mtp.* (it has no MTP module): load the main model without one
        print(f"{path}: no mtp.* tensors, loading without the MTP module (no speculative decoding)")
        config.num_mtp_layers = 0
        with torch.device("meta"):
            model = M.Mellum(config)
    expected = model.state_dict()
    for k, t in state.items():
        if k not in expected:
            raise data.InputError(f"{path}: unexpected tensor {k!r} for this config (is config.json from another "
                                  "model, or were the weights saved with a different num_nextn_predict_layers?)")
        if t.shape != expected[k].shape:
            raise data.InputError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise data.InputError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, assign=True)
    return model


_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def split_experts(state):
    """3-D expert tensors -> one 2-D tensor per expert and projection (the on-disk layout)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.size(0)):
                out[f"{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = gate[e].clone()
                out[f"{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = up[e].clone()
        elif k.endswith(".experts.down_proj"):
            for e in range(v.size(0)):
                out[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def fuse_experts(state, source):
    """Inverse of split_experts: stack per-expert tensors into gate_up [E, 2F, D] and down [E, D, F]."""
    out, per_expert = {}, {}
    for k, v in state.items():
        m = _EXPERT_KEY.fullmatch(k)
        if m:
            per_expert.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
        else:
            out[k] = v
    for prefix, kinds in per_expert.items():
        E = 1 + max(max(d) for d in kinds.values())
        for kind in ("gate_proj", "up_proj", "down_proj"):
            lacking = sorted(set(range(E)) - set(kinds.get(kind, {})))
            if lacking:
                raise data.InputError(f"{source}: {prefix}.{{e}}.{kind}.weight missing for experts {lacking[:5]}")
        stack = {kind: torch.stack([kinds[kind][e] for e in range(E)]) for kind in kinds}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        out[f"{prefix}.down_proj"] = stack["down_proj"]
    return out


# -----------------------------------------------------------------------------
# Training checkpoints: <dir>/step_{N:06d}/ holds the model and optimizer state as a torch.distributed.checkpoint
# (DCP) directory; see the module docstring.

def step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:06d}")


def latest_step(ckpt_dir):
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    steps = [int(n[5:]) for n in names if re.fullmatch(r"step_\d+", n)
             and os.path.isfile(os.path.join(ckpt_dir, n, "meta.json"))]
    return max(steps, default=None)


def read_meta(ckpt_dir, step=None):
    """(step, meta dict) of a checkpoint directory's given or latest step."""
    step = latest_step(ckpt_dir) if step is None else step
    path = os.path.join(step_dir(ckpt_dir, step), "meta.json") if step is not None else None
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
    final, tmp = step_dir(ckpt_dir, step), step_dir(ckpt_dir, step) + ".tmp"
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
        meta = {**meta, "step": step, "world_size": ctx.world_size, "config": config_to_hf(unwrap(model).config)}
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
    if meta["config"] != config_to_hf(unwrap(model).config):
        raise data.InputError(f"{ckpt_dir} step {step}: the checkpoint's config differs from this run's model; use "
                              "the same --preset / flags as the run that wrote it, or another --out-dir")
    path = step_dir(ckpt_dir, step)
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


def resume(ckpt_dir, raw, optimizer, loader, ctx, log=print):
    """Continue a stage from ckpt_dir's latest step: weights, optimizer, and (at the same world size) this rank's
    loader position (unless loader is None) and RNG. Returns the step to continue from, 0 when there is none."""
    step = latest_step(ckpt_dir)
    if step is None:
        return 0
    rank_state = resume_checkpoint(ckpt_dir, step, raw, optimizer, ctx)
    if rank_state is not None:
        if loader is not None:
            try:
                loader.load_state_dict(rank_state["loader"])
            except ValueError as e:  # a loader that refuses another run's data
                raise data.InputError(f"{ckpt_dir}: {e}") from None
        set_rng_state(rank_state["rng"])
    if ctx.master:
        log(f"resumed {ckpt_dir} at step {step}" + ("" if rank_state is not None else " with another number of "
            "ranks: weights and optimizer resharded, the data stream starts afresh"))
    return step


def load_model(path, step=None, device="cpu"):
    """(model in eval mode, tokenizer, meta) in this process alone, from any source: a training stage's directory
    (latest step unless given; written by any number of ranks, any sharding or EP size) with the tokenizer its meta
    records, or a Hugging Face-format directory (config.json + safetensors; meta {}) with that directory's own
    tokenizer (None for a checkpoint that records none). Refuses a tokenizer with more ids than the model's
    embedding."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no checkpoint here, no such directory (give a training stage's output "
                                "directory such as out/pretrain/phase1, or a Hugging Face-format directory)")
    if os.path.isfile(os.path.join(path, "config.json")):
        model, meta = from_pretrained(path, device=device), {}
        tok = data.hf_dir_tokenizer(path)
    else:
        step, meta = read_meta(path, step)
        config = config_from_hf(meta["config"], source=os.path.join(step_dir(path, step), "meta.json"))
        with torch.device("meta"):
            model = M.Mellum(config)
        model.to_empty(device=device)
        dcp.load({"model": model.state_dict()}, checkpoint_id=step_dir(path, step), no_dist=True)  # in place
        tok = data.get_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None  # every stage records one
    if tok is not None and tok.n_vocab > model.config.vocab_size:
        raise data.InputError(f"{path}: tokenizer {tok.name} has {tok.n_vocab} ids but the model's vocab_size is "
                              f"{model.config.vocab_size}: this tokenizer does not belong to this checkpoint")
    return model.eval(), tok, meta


def export_hf(ckpt_dir, out_dir, step=None):
    """The checkpoint as one consolidated Hugging Face-format directory (config.json + *.safetensors), for
    sharing: `python pretrain.py --export-hf out/pretrain/phase3 out/hf/base`."""
    model, _, meta = load_model(ckpt_dir, step)
    save_pretrained(model, out_dir)
    print(f"exported {ckpt_dir} step {meta.get('step')} to {out_dir} (Hugging Face format)")


# -----------------------------------------------------------------------------
# Model construction: meta device -> expert slice -> FSDP2 shards -> materialise -> init

def choose_parallel(requested, config, ep=1):
    """--parallel auto: FSDP2 above 2B parameters (a replica per rank no longer fits) or with expert parallelism
    (DDP would average the different experts of the EP ranks), DDP below."""
    if requested != "auto":
        return requested
    return "fsdp" if M.count_params(config)["total"] > 2e9 or ep > 1 else "ddp"


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
        raise data.InputError("expert parallelism needs --parallel fsdp: DDP would average the different experts "
                              "of the EP ranks as if they were replicas")
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


def train_step(ctx, model, raw, optimizer, batches, lr_mult, ckpt_dir, step, grad_clip=1.0, flops_per_token=None,
               **weights):
    """One whole optimizer step of a stage's loop: the learning rate at lr_mult x each group's base LR, forward and
    backward over `batches` (the step's micro-batches; `weights`: mtp_weight, aux_coef, z_coef of forward_backward),
    the finite check, clip + step. Returns the step's log record (the loss parts, lr, grad norm, tokens/s, MFU where
    the device's peak is known, expert imbalance)."""
    t0 = time.perf_counter()
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_mult
    parts = forward_backward(ctx, model, raw, batches, token_normaliser(batches, ctx), **weights)
    check_finite(parts, step, ckpt_dir)
    grad_norm = optimizer_step(model, optimizer, grad_clip)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    tps = sum(x.numel() for x, _ in batches) * ctx.world_size / (time.perf_counter() - t0)
    peak = peak_flops(ctx.device)
    ce, mtp, aux, z = parts.tolist()
    return dict(step=step + 1, ce=ce, mtp=mtp, aux=aux, z=z, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                tok_per_s=tps, mfu=flops_per_token * tps / ctx.world_size / peak if peak and flops_per_token else None,
                imbalance=imbalance(raw))


def check_finite(parts, step, ckpt_dir):
    if not torch.isfinite(parts).all():
        raise FloatingPointError(f"non-finite loss at step {step} (ce, mtp, aux, z = {parts.tolist()}); stopping. "
                                 f"Last good checkpoint: {ckpt_dir} step {latest_step(ckpt_dir)}. Lower --lr or "
                                 "check the data.")


# -----------------------------------------------------------------------------
# Schedules and RNG state

def whd_schedule(step, total, warmup, decay):
    """LR multiplier at global step `step` of `total`: linear warmup over `warmup` steps, hold at 1, linear decay
    over the last `decay` steps reaching exactly 0 at step == total."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total - decay:
        return max(0.0, (total - step) / decay)
    return 1.0


def recipe_for(recipes, config):
    """A later stage's recipe for its base: the report's (recipes["mellum2-12b"]) when the base has mellum2-12b's
    architecture (model.preset_of: vocabulary and context aside), else the CPU-sized recipes["default"]."""
    return recipes["mellum2-12b" if M.preset_of(config) == "mellum2-12b" else "default"]


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


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
    if ctx.tracker is not None:
        ctx.tracker.log(record)
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
# Experiment tracking: metrics.jsonl's records mirrored to TensorBoard and/or Weights & Biases (off by default)

def tracked_scalars(record):
    """A metrics.jsonl record as the trackers log it: {"ce": x, "eval/arithmetic/greedy_acc": y, ...} without the
    step (nested dicts joined with "/"); None (MFU on CPU) and per-task maps (*_by_task, for paired tests) left out."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if v is None or k.endswith("_by_task") or (not prefix and k == "step"):
                continue
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float)):
                out[f"{prefix}{k}"] = v
    walk(record, "")
    return out


class Tracker:
    """TensorBoard event files in tensorboard_dir and/or a W&B run of wandb_project (its files under out_dir/wandb):
    each record logged at its own step, so phases and resumed runs continue one global-step curve."""

    def __init__(self, tensorboard_dir=None, wandb_project=None, out_dir=None, config=None):
        self.writer = self.run = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise data.InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise data.InputError("--wandb needs the wandb package: pip install wandb") from e
            self.run = wandb.init(project=wandb_project, dir=out_dir, config=config)

    def log(self, record):
        scalars = tracked_scalars(record)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.run is not None:
            self.run.log(scalars, step=record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def start_tracking(args, out_dir, ctx):
    """Open rank 0's tracker for --tensorboard / --wandb (nothing is imported without them); log_metrics then
    forwards every record to it and compute_cleanup closes it."""
    if ctx.master and (args.tensorboard or args.wandb):
        ctx.tracker = Tracker(args.tensorboard, args.wandb, out_dir, vars(args))


# -----------------------------------------------------------------------------
# The stage command line

def add_stage_args(ap, ckpt_every, parallel_help="auto: FSDP2 above 2B parameters, DDP below"):
    """The flags every training stage shares: checkpoints, stopping early, logging, device and data parallelism."""
    ap.add_argument("--ckpt-every", type=int, default=ckpt_every)
    ap.add_argument("--stop-after", type=int, default=None, help="train this many steps, checkpoint and exit "
                    "(for time-limited job slots; continue with --resume)")
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--tensorboard", metavar="DIR", default=None, help="also log metrics.jsonl's records as "
                    "TensorBoard scalars in DIR (needs `pip install tensorboard`)")
    ap.add_argument("--wandb", metavar="PROJECT", default=None, help="also log them to a Weights & Biases run of "
                    "PROJECT (needs `pip install wandb`; WANDB_MODE=offline logs without a network)")
    # --- runtime
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="matmul precision: bf16 "
                    "autocast (fp32 master weights) or fp32, Muon's Newton-Schulz included (default auto: bf16 "
                    "autocast on a GPU, fp32 on a CPU, Newton-Schulz in bf16 where its matmul is fast)")
    ap.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto", help=parallel_help)


def micro_batches(global_batch, micro_batch, world_size, flag="--global-batch"):
    """Micro-batches per rank per optimizer step; refuses a global batch that is not whole rounds of micro-batches."""
    unit = micro_batch * world_size
    if global_batch % unit:
        raise data.InputError(f"{flag} {global_batch} is not a multiple of --batch-size {micro_batch} x {world_size} "
                              f"ranks = {unit}: change {flag} or --batch-size")
    return global_batch // unit


def save_if_due(ctx, out_dir, step, end, first, args, raw, opt, meta, loader=None, log=print, name="train"):
    """After the step that makes `step` steps: checkpoint every --ckpt-every steps, at the end, and when
    --stop-after steps have run since `first` (with the loader's position, if any, and the RNG state, so a
    resumed run continues exactly). Returns True when the run should stop there (continue with --resume)."""
    stop = args.stop_after is not None and step - first >= args.stop_after and step < end
    if step % args.ckpt_every == 0 or step == end or stop:
        rank_state = {"rng": rng_state()} if loader is None else {"loader": loader.state_dict(), "rng": rng_state()}
        save_checkpoint(out_dir, step, raw, opt, meta, rank_state, ctx)
    if stop and log is not None:
        log(f"{name}: stopped after {args.stop_after} steps at step {step}; continue with --resume")
    return stop


def run(main, name):
    """A stage's entry point. Expected bad input (data.InputError: a file, a field, a flag; a missing file; a
    SystemExit with a message) ends in one line `name: message` and exit code 2, never a traceback; a non-finite
    loss or too little memory in one line and exit code 1."""
    kernels.keep_freed_memory()
    try:
        main()
    except (data.InputError, FileNotFoundError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, MemoryError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code if e.code.startswith(name) else f"{name}: {e.code}", file=sys.stderr)
            sys.exit(2)
        raise


# -----------------------------------------------------------------------------
# Benchmark: python train.py --bench-transformers

def bench_vs_transformers(preset="tiny", batch=4, seq_len=256, repeats=5, seed=0):
    """Tokens/s of one training step's forward + backward (CE + balancing loss, no MTP: transformers' class trains
    none) of ours against transformers' MellumForCausalLM on the same weights and batch, interleaved, best of
    `repeats` each (other work may share the machine), and the ratio, all in one run."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("train.py --bench-transformers compares against transformers: pip install transformers")
    import tempfile
    config = M.get_config(preset, num_mtp_layers=0)
    ours = M.Mellum(config).init_weights(seed).train()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        hf = transformers.MellumForCausalLM.from_pretrained(d, torch_dtype=torch.float32).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen)
    idx, y = x[:, :-1], x[:, 1:]
    coef = config.router_aux_loss_coef

    def step_ours():
        ours.zero_grad(set_to_none=True)
        _, losses = ours(idx, y)
        (losses["ce"] + coef * losses["aux"]).backward()
        return losses["ce"].item()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        out = hf(input_ids=idx, output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        (ce + coef * out.aux_loss).backward()
        return ce.item()

    def step_ours_bf16_head():  # what a CPU stage runs by default on a bf16 CPU (Compute.autocast)
        with kernels.head_matmuls(torch.bfloat16):
            return step_ours()

    steps = {"ours": step_ours, "transformers": step_hf}
    if kernels.bf16_matmul_fast("cpu"):
        steps["ours bf16 head"] = step_ours_bf16_head
    best = {name: (float("inf"), fn()) for name, fn in steps.items()}  # warm-up; CE on the same weights
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            best[name] = (min(best[name][0], time.perf_counter() - t0), best[name][1])
    print(f"{preset}: forward + backward of {batch} x {seq_len} tokens, CE + balancing loss, fp32 (but where named), "
          f"{torch.get_num_threads()} threads, best of {repeats}")
    for name, (dt, ce) in best.items():
        print(f"  {name:<15} {batch * seq_len / dt:>9,.0f} tok/s   {dt * 1000:7.1f} ms   CE {ce:.4f}")
    for name in [n for n in best if n.startswith("ours")]:
        print(f"  {name} / transformers: {best['transformers'][0] / best[name][0]:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="train.py is the stages' toolkit; run alone it benchmarks a step")
    ap.add_argument("--bench-transformers", action="store_true", help="a tiny training step against transformers' "
                    "MellumForCausalLM on the same weights (needs transformers)")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    if args.bench_transformers:
        bench_vs_transformers(args.preset)
    else:
        ap.print_help()
