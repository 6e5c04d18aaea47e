#!/usr/bin/env python3
"""PyTorch eager twin of bench/host_vit_step.cpp on the CPU: one training step (forward and
backward, parameter gradients and the input gradient) through L timm pre-norm ViT blocks,

    h = h + proj(attention(qkv(LayerNorm1(h))));  h = h + fc2(GELU(fc1(LayerNorm2(h))))

with LayerNorm eps 1e-6, qkv with bias, attention scale head_dim^-0.5, exact (erf) GELU, on a
batch of [B, N, D] tokens in fp32, loss = sum(out * dout) (one backward with dout as the output
gradient). Modes: "eager" (standard autograd) and "checkpoint" (torch.utils.checkpoint around
each block: every block's forward runs again in backward, as dr2net's reversible mode does).

Threads come from the environment as in the dr2net benchmark: torch.set_num_threads() takes
OMP_NUM_THREADS when it is set. Inputs are uniform in [-1, 1), weights as timm initialises
them (truncated normal, std 0.02; zero biases; unit LayerNorm gains); values do not change the
work. Step times are wall-clock seconds of zero_grad + forward + backward after one untimed step.

  pytorch_host_step.py [--layers 12] [--batch 8] [--tokens 197] [--dim 192] [--heads 3]
                       [--hidden 768] [--steps 5] [--mode eager|checkpoint] [--json FILE]
  pytorch_host_step.py --check DUMP [--json FILE]

--check DUMP loads a step that dr2net_bench_host_vit_step --dump wrote (standard mode at
(alpha, beta) = (1, 0), where dr2net's stack is exactly timm's blocks): its weights, h0 and dout;
it runs the same step here and compares out, dh0 and every parameter gradient, as relative L2
errors, with dr2net's; exit status 1 if one exceeds --tolerance.
"""
import argparse
import inspect
import json
import os
import struct
import sys
import time

import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        a = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))  # approximate="none": erf GELU


class Block(nn.Module):
    """timm's vision_transformer.Block without LayerScale, dropout or drop-path."""

    def __init__(self, d, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """L blocks under timm's parameter names (blocks.{i}.norm1.weight, ...)."""

    def __init__(self, layers, d, heads, hidden, use_checkpoint=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.use_checkpoint = use_checkpoint
        kw = {}
        if "use_reentrant" in inspect.signature(torch_checkpoint.checkpoint).parameters:
            kw["use_reentrant"] = False
        self._checkpoint_kw = kw

    def forward(self, x):
        for blk in self.blocks:
            x = torch_checkpoint.checkpoint(blk, x, **self._checkpoint_kw) if self.use_checkpoint else blk(x)
        return x


def timm_init(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def forward_gemm_flops(model, x):
    """GEMM flops of one forward as torch's profiler counts them (matrix products only)."""
    from torch.autograd import profiler

    gemm_ops = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
    with torch.no_grad(), profiler.profile(with_flops=True) as prof:
        model(x)
    total = 0
    for e in prof.function_events:
        if e.name in gemm_ops and e.flops:
            total += e.flops
    return int(total)


def threads_from_env():
    v = os.environ.get("OMP_NUM_THREADS")
    if v:
        torch.set_num_threads(int(v))
    return torch.get_num_threads()


def median(v):
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def run(args):
    threads = threads_from_env()
    torch.manual_seed(2024)
    model = Stack(args.layers, args.dim, args.heads, args.hidden, use_checkpoint=args.mode == "checkpoint")
    timm_init(model)
    shape = (args.batch, args.tokens, args.dim)
    h0 = (torch.rand(shape) * 2 - 1).requires_grad_(True)
    dout = torch.rand(shape) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        h0.grad = None
        t0 = time.perf_counter()
        out = model(h0)
        t1 = time.perf_counter()
        out.backward(dout)  # loss = sum(out * dout)
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0, t2 - t1

    step()  # untimed: first touch of every buffer, the allocator's caches, BLAS's workspace
    times = [step() for _ in range(args.steps)]
    total = [t[0] for t in times]
    return {
        "benchmark": "pytorch_host_step",
        "torch": torch.__version__,
        "mode": args.mode,
        "checkpoint": "torch.utils.checkpoint per block" + (
            " (use_reentrant=False)" if model._checkpoint_kw else "") if args.mode == "checkpoint" else None,
        "precision": "fp32",
        "threads": threads,
        "layers": args.layers, "batch": args.batch, "tokens": args.tokens, "dim": args.dim,
        "heads": args.heads, "hidden": args.hidden, "timed_steps": args.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_gemm_flops": forward_gemm_flops(model, h0.detach()),
        "environment": {k: os.environ.get(k) for k in
                        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "seconds_per_step": median(total),
        "min_seconds": min(total),
        "forward_seconds": median([t[1] for t in times]),
        "backward_seconds": median([t[2] for t in times]),
        "step_seconds": total,
    }


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, e in header.items():
        if e["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} has dtype {e['dtype']}, expected F32")
        b, end = e["data_offsets"]
        t = torch.frombuffer(bytearray(raw[base + b:base + end]), dtype=torch.float32)
        tensors[name] = t.reshape(e["shape"])
    return meta, tensors


def rel_l2(a, ref):
    a, ref = a.double(), ref.double()
    den = ref.norm().item()
    return (a - ref).norm().item() / (den if den > 0 else 1.0)


def check(args):
    meta, t = read_safetensors(args.check)
    if meta.get("mode") != "standard" or float(meta.get("alpha", "nan")) != 1.0 or float(meta.get("beta", "nan")) != 0.0:
        raise SystemExit(f"{args.check}: --check needs a standard-mode step at (alpha, beta) = (1, 0), got {meta}")
    layers, d, heads, hidden = (int(meta[k]) for k in ("layers", "dim", "heads", "hidden"))
    model = Stack(layers, d, heads, hidden).double()  # fp64: the reference for dr2net's fp32 step
    names = dict(model.named_parameters())
    dumped = sorted(k for k in t if k.startswith("blocks."))
    if sorted(names) != dumped:
        raise SystemExit(f"{args.check}: parameter names differ: only here {sorted(set(names) - set(dumped))}, "
                         f"only in the dump {sorted(set(dumped) - set(names))}")
    with torch.no_grad():
        for k, p in names.items():
            if tuple(p.shape) != tuple(t[k].shape):
                raise SystemExit(f"{args.check}: {k} has shape {tuple(t[k].shape)} there, {tuple(p.shape)} here")
            p.copy_(t[k].double())
    h0 = t["input.h0"].double().requires_grad_(True)
    out = model(h0)
    out.backward(t["input.dout"].double())
    errors = {"out": rel_l2(t["output.out"], out.detach()), "dh0": rel_l2(t["output.dh0"], h0.grad)}
    for k, p in names.items():
        errors["grad." + k] = rel_l2(t["grad." + k], p.grad)
    worst = max(errors, key=errors.get)
    result = {
        "benchmark": "pytorch_host_step --check", "torch": torch.__version__, "dump": args.check,
        "layers": layers, "dim": d, "heads": heads, "hidden": hidden,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors_compared": len(errors), "tolerance": args.tolerance,
        "worst": worst, "worst_rel_l2": errors[worst],
        "out_rel_l2": errors["out"], "dh0_rel_l2": errors["dh0"],
        "worst_grad_rel_l2": max(v for k, v in errors.items() if k.startswith("grad.")),
        "passed": errors[worst] <= args.tolerance,
    }
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--mode", choices=("eager", "checkpoint"), default="eager")
    ap.add_argument("--check", metavar="DUMP", help="compare with a dr2net step (see above)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="--check: largest relative L2 error of fp32 results against fp64 (default 1e-4)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    for k in ("layers", "batch", "tokens", "dim", "heads", "hidden", "steps"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be positive, got {getattr(args, k)}")
    if args.dim % args.heads:
        ap.error(f"--heads {args.heads} must divide --dim {args.dim}")
    result = check(args) if args.check else run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.check:
        print(f"pytorch_host_step --check: {result['tensors_compared']} tensors, worst relative L2 error "
              f"{result['worst_rel_l2']:.3g} ({result['worst']}), tolerance {args.tolerance:g}: "
              f"{'passed' if result['passed'] else 'FAILED'}", file=sys.stderr)
        return 0 if result["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
