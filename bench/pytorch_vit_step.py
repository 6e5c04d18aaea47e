#!/usr/bin/env python3
"""PyTorch reference for bench/gpu_vit_step.cu: a ViT-B/16-sized stack of pre-norm transformer
blocks (D 768, 12 heads, MLP 3072, 12 layers; timm's conventions: LayerNorm eps 1e-6, erf GELU,
scale head_dim^-0.5) in plain torch modules with standard autograd, bf16 autocast over fp32
weights. Reports step time (forward + backward) and peak CUDA memory (all of the caching
allocator's live bytes: weights, gradients, activations; and the part above what was live
before the step) at 197 and 1568 tokens,
so gpu-check can set dr2net's figures beside PyTorch's. Usage: pytorch_vit_step.py [--json FILE]
"""
import argparse
import json
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def attn(self, h):
        b, t, d = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.fc2(nn.functional.gelu(self.fc1(self.norm2(h))))


def step_figures(model, batch, tokens, d, repeats):
    x = torch.randn(batch, tokens, d, device="cuda")
    g = torch.randn_like(x)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().backward(g)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / repeats
    peak = torch.cuda.max_memory_allocated()
    return {"tokens": tokens, "batch": batch, "step_ms": ms, "peak_bytes": peak,
            "peak_bytes_above_base": peak - base}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    d, heads, hidden = 768, 12, 3072
    model = nn.Sequential(*[Block(d, heads, hidden) for _ in range(args.layers)]).cuda()
    runs = [step_figures(model, b, t, d, args.repeats) for t, b in ((197, 64), (1568, 8))]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
           "mode": "standard autograd, bf16 autocast", "runs": runs,
           "summary": {f"{r['tokens']} tok x {r['batch']}": f"{r['step_ms']:.1f} ms, "
                       f"{r['peak_bytes_above_base'] / 2**30:.2f} GiB" for r in runs}}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
