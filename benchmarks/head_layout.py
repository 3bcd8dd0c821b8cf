"""The CPU head's variants compared by whole training steps, on this machine: its layouts (pooling.cpu_head_layout)
and, in float32, the bf16 screen of the vocabulary (pooling._screened_float32_max).

The SPLADE head multiplies blocks of tokens by tiles of the vocabulary; the best block and tile sizes (and, in bf16,
how many columns carry the bias) differ between CPUs with AMX and those without. In float32, CPUs whose bf16
products are measurably faster first screen the vocabulary with a bf16 product. This script trains one Trainer per variant in one
process and steps them in turn, round after round, so that a shared machine's drift hits every variant alike;
ratios are medians of per-round ratios.

    python benchmarks/head_layout.py --data ../shared/data/scifact --rounds 20
    python benchmarks/head_layout.py --precisions 32-true --json

Prints each variant's median step time and, per precision, the time of every variant relative to the one this
machine picks, and bf16-mixed's speed-up over 32-true with each kind of layout (float32 as this machine runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from spladectl import pooling
from spladectl.bench.settings import BenchSettings, parse_precisions
from spladectl.bench.step import make_config
from spladectl.data import load_training_data
from spladectl.engine import Trainer
from spladectl.plugin_loading import load_plugins

# The kinds of layout, by what the AMX probe that pooling.cpu_head_layout asks says.
LAYOUTS = {"amx": True, "vector": False}
# float32 with and without the bf16 screen, by what the probe that pooling.SpladeMaxHead asks says.
SCREENS = {"screened": True, "float32 only": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/scifact", help="training data (any `train --data`)")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (each steps every variant once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    precisions = parse_precisions(args.precisions)
    examples = load_training_data(args.data, n_negatives=1, show_progress=False)
    steps = args.rounds + args.warmup
    need = args.batch_size * (steps + 1)
    examples = (examples * -(-need // len(examples)))[:need]
    settings = BenchSettings(batch_size=args.batch_size, data=args.data)
    picked_layout = "amx" if pooling.has_amx_tiles() else "vector"
    picked_screen = "screened" if pooling.bf16_products_pay_off() else "float32 only"
    variants = [(p, kind) for p in precisions for kind in _kinds(p)]
    picked = {p: _kind(p, picked_layout, picked_screen) for p in precisions}
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    pm = load_plugins()
    probes = pooling.has_amx_tiles, pooling.bf16_products_pay_off
    with tempfile.TemporaryDirectory(prefix="spladectl-head-layout-") as workdir:
        trainers = {}
        for i, (precision, kind) in enumerate(variants):
            config = make_config(settings, precision, args.batch_size, steps, f"{workdir}/{i}")
            trainers[(precision, kind)] = Trainer(config, examples, pm=pm, log=lambda _: None, progress=False)
        try:
            for r in range(steps):
                for precision, kind in variants:
                    layout, _, screen = kind.partition(", ")
                    screened = SCREENS.get(screen, False)
                    pooling.has_amx_tiles = lambda amx=LAYOUTS[layout]: amx
                    pooling.bf16_products_pay_off = lambda on=screened: on
                    started = time.perf_counter()
                    trainers[(precision, kind)].step()
                    if r >= args.warmup:
                        times[(precision, kind)].append(time.perf_counter() - started)
                print(f"round {r + 1}/{steps}", file=sys.stderr, flush=True)
        finally:
            pooling.has_amx_tiles, pooling.bf16_products_pay_off = probes

    def per_round(a, b) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result = {"machine_picks": picked, "rounds": args.rounds, "batch_size": args.batch_size,
              "variants": [{"precision": p, "variant": k, "median_step_s": round(statistics.median(times[(p, k)]), 4)}
                           for p, k in variants],
              "relative_to_picked": {f"{p} {k}": round(per_round((p, k), (p, picked[p])), 3) for p, k in variants}}
    if "32-true" in precisions:
        # bf16-mixed against float32 with the same layout, screened or not as this machine picks
        result["speedup_over_32_true"] = {
            f"{p} {k}": round(per_round(("32-true", _kind("32-true", k, picked_screen)), (p, k)), 3)
            for p, k in variants if p != "32-true"}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.rounds} rounds, batch {args.batch_size}, {torch.get_num_threads()} threads; "
          f"this machine picks: " + "; ".join(f"{p} {k}" for p, k in picked.items()))
    print("| precision | variant | median step s | time ÷ the picked variant's (per round) |")
    print("|---|---|---:|---:|")
    for p, k in variants:
        relative = result["relative_to_picked"][f"{p} {k}"]
        print(f"| {p} | {k} | {statistics.median(times[(p, k)]):.3f} | {relative:.3f} |")
    for name, value in result.get("speedup_over_32_true", {}).items():
        print(f"{name} over 32-true with the same kind of layout ({picked_screen}): {value:.2f}×")
    return 0


def _kinds(precision: str) -> list[str]:
    if precision == "32-true":
        return [f"{layout}, {screen}" for layout in LAYOUTS for screen in SCREENS]
    return list(LAYOUTS)


def _kind(precision: str, layout: str, screen: str) -> str:
    layout = layout.partition(", ")[0]
    return f"{layout}, {screen}" if precision == "32-true" else layout


if __name__ == "__main__":
    sys.exit(main())
