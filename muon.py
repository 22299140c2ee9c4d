"""
Muon for the hidden matrices, AdamW for everything else: one optimizer object that serves 1 or N ranks.

Muon (Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/), with the weight decay and update scale of
"Muon is Scalable for LLM Training" (Moonshot AI 2025, https://arxiv.org/abs/2502.16982). For each hidden weight
matrix W of shape (rows, cols), gradient G, learning rate lr, weight decay wd, momentum mu:

  1. B <- mu * B + G                      SGD momentum buffer
  2. U <- G + mu * B                      Nesterov look-ahead (U <- B without Nesterov)
  3. O <- NewtonSchulz5(U)                ~ the orthogonal factor U V^T of U = U S V^T: every singular value -> ~1
  4. W <- W * (1 - lr * wd)               decoupled weight decay (AdamW-style)
  5. W <- W - lr * 0.2 * sqrt(max(rows, cols)) * O
                                          O has RMS 1/sqrt(max(rows, cols)); the factor makes the update RMS 0.2,
                                          about AdamW's, so one lr and one schedule serve both optimizers.

NewtonSchulz5: X <- U / ||U||_F (all singular values now in [0, 1]), then 5 times X <- a X + b (X X^T) X +
c (X X^T)^2 X with (a, b, c) = (3.4445, -4.7750, 2.0315). On each singular value s this applies the polynomial
p(s) = a s + b s^3 + c s^5: the steep slope a at 0 pulls small values up fast, and the iteration settles in the
band [p(1.05), p(0.55)] ~ [0.68, 1.2] instead of converging to exactly 1 (approximately orthogonal is enough,
and five steps in bf16 are cheap). Wide form (rows <= cols) keeps X X^T the small Gram matrix.

AdamW (Loshchilov & Hutter 2019) for the parameters Muon does not own, written out as torch.optim.AdamW computes it.

Contents:
  newton_schulz(G, steps)     quintic Newton-Schulz, batched over leading dims (bf16 on GPUs and bf16 CPUs, else fp32)
  param_groups(model, lr, ..) which parameter goes to Muon and which to AdamW (see the table there)
  MuonAdamW                   .step() for both kinds of groups; 1 process, DDP, or FSDP2 (DTensor parameters)
  python muon.py --bench      Newton-Schulz time per optimizer step for a preset's matrix shapes

Distributed: when torch.distributed is initialised with world > 1, the Muon parameters are sorted by size and
dealt out in rounds of `world`: in each round rank r orthogonalises the r-th matrix, then one all_gather hands
every rank all the round's updates (modded-nanogpt's scheme), so no rank repeats another's Newton-Schulz work.
  DDP:   gradients are already all-reduced, parameters and optimizer state are replicated.
  FSDP2: parameters, gradients and all optimizer state are local shards of DTensors. Newton-Schulz needs the whole
         matrix, so the momentum-updated U is gathered (full_tensor), its owner orthogonalises it, and after the
         all_gather each rank keeps only its own shard of the update.

Footguns:
- Non-finite gradients raise FloatingPointError (naming the parameter) before anything is updated, on every rank
  at once; the caller may skip the batch (zero_grad) and go on. Checking costs one device sync per step.
- A zero gradient matrix gives a zero Muon update (Newton-Schulz of 0 is 0): only weight decay moves the weights.
- Optimizer state tensors are DTensors like their parameters under FSDP2, so torch.distributed.checkpoint saves
  and reshards them (train.save_checkpoint / resume_checkpoint); load_state_dict() refuses state whose shape
  or type differs from its parameter's. DDP state is identical on every rank.
- FSDP2 gathers U once for Newton-Schulz and the updates once more for the all_gather: twice the traffic of one
  all-gather, traded for not repeating Newton-Schulz on every rank. Expert parallelism: expert stacks are dealt
  out among the ranks holding the same experts (their FSDP2 mesh), not among all ranks. No tensor parallelism.
- Muon groups must hold 2-D matrices or 3-D stacks [E, out, in]; anything else is rejected at construction.
"""
import argparse
import math
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

import kernels

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: maximal slope at 0 while staying in ~[0.68, 1.2]


def ns_dtype(device):
    """bf16 wherever its matmul is the fast one (kernels.bf16_matmul_fast: a GPU, a CPU with AMX or AVX512-BF16):
    bf16 is accurate enough for an approximate orthogonalisation; fp32 elsewhere."""
    return torch.bfloat16 if kernels.bf16_matmul_fast(device) else torch.float32


def newton_schulz(G, steps=5, dtype=None):
    """Approximate orthogonal factor of each matrix in G (..., rows, cols), computed in `dtype` (default
    ns_dtype of G's device)."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: expected (..., rows, cols), got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1; 0 stays 0
    X = X.to(dtype or ns_dtype(G.device))
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    shape, X = X.shape, X.reshape(-1, *X.shape[-2:])  # one batch dim: baddbmm folds each scale-and-add into a GEMM
    for _ in range(steps):
        A = X @ X.mT  # (rows, rows) Gram matrix, the small side
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    X = X.view(shape)
    return X.mT if tall else X


# -----------------------------------------------------------------------------
# Parameter groups

def _clean(name):
    while name.startswith(("module.", "_orig_mod.")):  # DDP and torch.compile wrappers, in either nesting order
        name = name.split(".", 1)[1]
    return name


def param_groups(model, lr, weight_decay=0.1, adamw_only=False):
    """
    Muon: every 2-D/3-D hidden matrix: q/k/v/o projections, dense MLP, expert gate_up/down, mtp.eh_proj (it mixes
          two hidden-size vectors into one, a hidden-to-hidden map like o_proj).
          Fused expert gate_up [E, 2F, D] is orthogonalised as 2E separate [F, D] matrices (split=2): gate and up
          are two different linear maps (their outputs meet only in silu(gate) * up), dense layers keep them as
          separate gate_proj/up_proj matrices, and orthogonalising them jointly would couple their update
          directions just because they happen to be stored together.
    AdamW: embed_tokens (a lookup table: each row is updated only by its own tokens, so orthogonalising across rows
           makes no sense), lm_head and the router mlp.gate (both produce logits of a classifier over tokens /
           experts, Muon's author's advice is AdamW for output layers; for the router it also keeps rarely chosen
           experts' rows from moving as much as busy ones'), and all 1-D parameters (norm weights) with no decay.
    adamw_only=True puts every matrix in the AdamW group: the AdamW baseline of the ablation.
    Parameters that do not require grad are left out. Groups list (name, parameter) pairs (torch.optim keeps
    the names as group["param_names"]) so that errors can say which parameter is at fault.
    """
    muon, muon_gate_up, adamw, adamw_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = _clean(name)
        if p.ndim < 2:
            adamw_no_decay.append((name, p))
        elif adamw_only or name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")):
            adamw.append((name, p))
        elif p.ndim > 3:
            raise ValueError(f"param_groups: {name} has shape {tuple(p.shape)}; Muon takes 2-D matrices or 3-D "
                             "stacks [E, out, in]. Add a rule for it in muon.param_groups.")
        elif name.endswith("experts.gate_up_proj"):
            muon_gate_up.append((name, p))
        else:
            muon.append((name, p))
    groups = [dict(kind="muon", params=muon, weight_decay=weight_decay, split=1),
              dict(kind="muon", params=muon_gate_up, weight_decay=weight_decay, split=2),
              dict(kind="adamw", params=adamw, weight_decay=weight_decay),
              dict(kind="adamw", params=adamw_no_decay, weight_decay=0.0)]
    return [dict(g, lr=lr, base_lr=lr) for g in groups if g["params"]]


# -----------------------------------------------------------------------------
# The optimizer

def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _rank_world(group=None):
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """Groups carry kind="muon" or "adamw", lr and weight_decay (param_groups() builds them); Muon groups may carry
    split=k: the rows of each matrix are k stacked matrices, orthogonalised separately."""

    def __init__(self, param_groups, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.95), eps=1e-8,
                 ns_dtype=None):
        defaults = dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=0.0)
        super().__init__(param_groups, defaults)
        self.ns_dtype = ns_dtype  # Newton-Schulz's dtype; None: ns_dtype(device), bf16 where its matmul is fast
        for i, group in enumerate(self.param_groups):
            if group.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"MuonAdamW: param group {i} has kind={group.get('kind')!r}; every group needs "
                                 "kind='muon' or 'adamw' (muon.param_groups(model, lr) builds them)")
            if "lr" not in group:
                raise ValueError(f"MuonAdamW: param group {i} has no 'lr'")
            if group["kind"] == "muon":
                split = group.setdefault("split", 1)
                for name, p in zip(self._names(group), group["params"]):
                    if p.ndim not in (2, 3) or p.shape[-2] % split:
                        raise ValueError(f"MuonAdamW: {name} has shape {tuple(p.shape)}; a Muon group takes 2-D "
                                         f"matrices or 3-D stacks [E, out, in] with out divisible by split={split}. "
                                         "Put it in an 'adamw' group.")

    @staticmethod
    def _names(group):
        return group.get("param_names") or [f"params[{j}] (shape {tuple(p.shape)})"
                                            for j, p in enumerate(group["params"])]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_finite_grads()
        self._muon_step([(p, group) for group in self.param_groups if group["kind"] == "muon"
                         for p in group["params"] if p.grad is not None])
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_step(group)
        return loss

    def _check_finite_grads(self):
        named = [(name, _local(p.grad)) for group in self.param_groups
                 for name, p in zip(self._names(group), group["params"]) if p.grad is not None]
        if not named:
            return
        grads = [g for _, g in named]
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))  # one fused pass over all gradients
        if bad.any():  # a norm also overflows when huge finite values are squared: judge those by their elements
            bad = torch.stack([~torch.isfinite(g).all() for g in grads])
        bad = bad.int()
        if _rank_world()[1] > 1:  # under FSDP2 a NaN may sit in one rank's shard only: all ranks must agree
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.any():
            first = named[int(bad.argmax())][0]
            raise FloatingPointError(f"MuonAdamW.step: non-finite gradient in {first} "
                                     f"({int(bad.sum())} parameter(s) affected); nothing was updated. "
                                     "Skip this batch (optimizer.zero_grad()) or lower the learning rate.")

    def _muon_step(self, work):
        """Steps 1-5 for every (parameter, group) pair of all Muon groups. The work is dealt out among the ranks
        that hold the same full matrix: all ranks for replicated (DDP) and FSDP2-sharded parameters, but only
        the data-parallel ranks for expert-parallel experts (each EP rank holds other experts under the same
        name). A DTensor's mesh is exactly that set of ranks; a plain tensor is replicated on every rank."""
        by_group = {}
        for p, group in work:  # same parameter order on every rank, so the same order of groups
            by_group.setdefault(p.device_mesh.get_group() if isinstance(p, DTensor) else None, []).append((p, group))
        for pg, items in by_group.items():
            self._muon_round_robin(items, pg)

    def _muon_round_robin(self, work, pg):
        rank, world = _rank_world(pg)
        # Largest first, then dealt out in rounds of `world`: each round's matrices have similar sizes, so the
        # ranks' work is balanced and the all_gather pads little. sort() is stable, so every rank agrees.
        work.sort(key=lambda pg: -pg[0].numel())
        for start in range(0, len(work), world):
            chunk = work[start:start + world]
            mine = None
            for i, (p, group) in enumerate(chunk):
                U = self._momentum(p, group)  # every rank: the buffer update is cheap, full_tensor() collective
                if i == rank:
                    mine = newton_schulz(self._as_matrices(U, group["split"]), group["ns_steps"], self.ns_dtype)
            params = [p for p, _ in chunk]
            for (p, group), O in zip(chunk, self._all_gather(mine, params, world, pg, self.ns_dtype)):
                rows, cols = p.shape[-2] // group["split"], p.shape[-1]
                if isinstance(p, DTensor):  # keep this rank's shard; every rank holds O, so no communication
                    O = distribute_tensor(O, p.device_mesh, p.placements, src_data_rank=None).to_local()
                w = _local(p)
                w.mul_(1 - group["lr"] * group["weight_decay"])
                w.add_(O.to(w.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))

    def _momentum(self, p, group):
        """Steps 1-2 on this rank's (shard of the) gradient; returns the full U."""
        g = _local(p.grad)
        state = self.state[p]
        if "momentum_buffer" not in state:  # a DTensor like its parameter, so DCP saves and reshards it
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = _local(state["momentum_buffer"])
        buf.mul_(group["momentum"]).add_(g)
        U = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if isinstance(p, DTensor):
            U = DTensor.from_local(U, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        return U

    @staticmethod
    def _as_matrices(U, split):
        # [..., split * r, c] -> [..., split, r, c]: gate_up [E, 2F, D] becomes E x (gate [F, D], up [F, D]),
        # and a 3-D expert stack is E independent matrices: newton_schulz is batched over the leading dims.
        return U.unflatten(-2, (split, U.size(-2) // split))

    @staticmethod
    def _all_gather(mine, params, world, pg, dtype=None):
        """Every rank's orthogonalised matrix of this round, each reshaped to its parameter's full shape."""
        if world == 1:
            return [mine.reshape(params[0].shape)]
        size = max(p.numel() for p in params)
        device = _local(params[0]).device
        send = torch.zeros(size, dtype=dtype or ns_dtype(device), device=device)
        if mine is not None:  # ranks past the end of a short last round send padding
            send[:mine.numel()] = mine.flatten()
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=pg)
        return [r[:p.numel()].view(p.shape) for r, p in zip(recv, params)]

    def _adamw_step(self, group):
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, w = _local(p.grad), _local(p)
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p.grad)
                state["exp_avg_sq"] = torch.zeros_like(p.grad)
            state["step"] += 1
            m, v, t = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), state["step"]
            w.mul_(1 - lr * group["weight_decay"])
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for name, p in zip(self._names(group), group["params"]):
                for key, value in self.state[p].items():
                    if torch.is_tensor(value) and (value.shape != p.shape
                                                   or isinstance(value, DTensor) != isinstance(p, DTensor)):
                        raise ValueError(f"MuonAdamW.load_state_dict: {key} of {name} is a {type(value).__name__} "
                                         f"of shape {tuple(value.shape)}, the parameter a {type(p).__name__} of "
                                         f"{tuple(p.shape)}: the state was saved with another sharding or model; "
                                         "load sharded state with train.resume_checkpoint (DCP reshards it).")


# -----------------------------------------------------------------------------
# Benchmark: Newton-Schulz time per optimizer step for a preset's Muon matrices

def bench(preset, repeats=5):
    import model  # only the benchmark needs the architecture

    kernels.keep_freed_memory()  # as every stage does: glibc would otherwise page-fault each iteration's MiBs back in
    with torch.device("meta"):  # shapes only, no memory
        net = model.Mellum(model.get_config(preset))
    shapes = Counter()
    for group in param_groups(net, lr=0.0):
        if group["kind"] == "muon":
            shapes.update((tuple(p.shape), group["split"]) for _, p in group["params"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{preset}: quintic Newton-Schulz, 5 steps, {ns_dtype(device)} on {device}")
    total = 0.0
    for (shape, split), count in sorted(shapes.items()):
        U = torch.randn(shape, device=device)
        times = []
        for _ in range(repeats + 1):  # the first run is a warm-up
            sync()
            t0 = time.perf_counter()
            newton_schulz(MuonAdamW._as_matrices(U, split))
            sync()
            times.append(time.perf_counter() - t0)
        ms = sorted(times[1:])[repeats // 2] * 1e3  # median: robust to a busy machine
        total += ms * count
        print(f"  {str(shape):>20} split={split}  x{count:<3d} {ms:9.2f} ms each  {ms * count:9.1f} ms per step")
    print(f"  total {total:.1f} ms per optimizer step on one device (~total / N with N ranks)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Muon + AdamW optimizer; --bench times Newton-Schulz")
    ap.add_argument("--bench", action="store_true", help="time Newton-Schulz for the preset's matrix shapes")
    ap.add_argument("--preset", default="tiny", help="model preset (model.PRESETS) for --bench")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not args.bench:
        ap.error("nothing to do: pass --bench (the optimizer itself is used from pretrain.py)")
    bench(args.preset, args.repeats)
