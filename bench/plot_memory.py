#!/usr/bin/env python3
"""Charts of dr2net_bench_memory_sweep's JSON: peak memory vs depth and vs tokens, per mode.

usage: plot_memory.py RESULTS.json OUT_PREFIX   (writes OUT_PREFIX-depth.png, OUT_PREFIX-tokens.png)
Needs matplotlib (Debian: python3-matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path, prefix):
    data = json.load(open(path))
    cfg, points = data["config"], data["points"]
    modes = ["standard", "reversible", "error-bounded"]
    styles = {"standard": "o-", "reversible": "s-", "error-bounded": "^-"}
    # The depth sweep shares one token count, the token sweep one depth: tell them apart by
    # which axis varies among the points.
    depth_tokens = max(set(p["tokens"] for p in points), key=lambda t: sum(q["tokens"] == t for q in points))
    tokens_depth = max(set(p["layers"] for p in points), key=lambda l: sum(q["layers"] == l for q in points))
    for axis, fixed_key, fixed, x_key, label in [
        ("depth", "tokens", depth_tokens, "layers", "layers L"),
        ("tokens", "layers", tokens_depth, "tokens", "tokens N"),
    ]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for mode in modes:
            pts = sorted((p for p in points if p["mode"] == mode and p[fixed_key] == fixed), key=lambda p: p[x_key])
            xs = [p[x_key] for p in pts]
            a1.plot(xs, [p["peak_activation_bytes"] / 2**20 for p in pts], styles[mode], label=mode)
            a2.plot(xs, [p["peak_total_bytes"] / 2**20 for p in pts], styles[mode], label=mode)
            if mode == "reversible":
                a2.plot(xs, [p["analytic_min_total_bytes"] / 2**20 for p in pts], "k:", label="analytic minimum")
        for ax, title in [(a1, "peak activation memory"), (a2, "peak total memory (training)")]:
            ax.set_xlabel(label)
            ax.set_ylabel("MiB")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"ViT D={cfg['dim']}, {cfg['heads']} heads, MLP {cfg['hidden']}, batch {cfg['batch']}, "
                     f"{fixed_key} = {fixed}, {cfg['precision']}, {cfg['backend']}")
        fig.tight_layout()
        fig.savefig(f"{prefix}-{axis}.png", dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
