"""The latency loop on fake timers whose true cost is known: how many targets end within ±10 %
and ±5 %, with the loop's bracketing step (regula falsi with the Illinois step), with plain
regula falsi, and without bracketing, when the whole-graph refit is made
to overshoot ``k``-fold (its goal's log-distance from the target times ``k``).

Timers (``tests/test_latency_loop.py``'s fake timer and variants): convs cost their MACs plus an
overhead the table cannot see (``fake``), or each conv ``(C_in·C_out/g)^p`` (``pow``), which a
table proportional to MACs misjudges. The model is ResNet-8 at 16×16, L1 ranking, round_to 1;
nothing is timed, so the tally is the same on every machine.

    python tools/latency_loop_fake.py            # ~40 s per row (an overshoot, an arm) on one core: 15 rows
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ehap_fx.passes.group import group_channels  # noqa: E402
from ehap_fx.passes.trace import trace  # noqa: E402

import ehap_fx.latency_loop as loop  # noqa: E402
from ehap_fx.latency import BenchOptions, LatencyModel  # noqa: E402
from ehap_fx.models import get_model  # noqa: E402
from ehap_fx.scoring import magnitude_scores  # noqa: E402
from ehap_fx.target import Target  # noqa: E402
from tests.test_latency_loop import ROUNDS, FakeTimer, MacsTable, PowTimer, overshooting  # noqa: E402

TIMERS = {"fake overhead 0.3": lambda: FakeTimer(0.3), "fake overhead 1.0": lambda: FakeTimer(1.0),
          "pow 0.7": lambda: PowTimer(0.7), "pow 1.5": lambda: PowTimer(1.5), "pow 2, overhead 0.3": lambda: PowTimer(2.0, 0.3)}
TARGETS = (0.8, 0.7, 0.6, 0.5, 0.4, 0.35)
ARMS = ("illinois", "regula-falsi", "off")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overshoot", nargs="+", type=float, default=[1, 2, 3, 4, 5])
    p.add_argument("--max-rounds", type=int, default=loop.LoopOptions().max_rounds)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS,
                   help="illinois: the loop's step; regula-falsi: without the Illinois halving; off: no bracketing")
    args = p.parse_args()
    torch.manual_seed(0)
    gm = group_channels(trace(get_model("resnet8", num_classes=10).eval(), torch.randn(1, 3, 16, 16))).graph_module
    scores = magnitude_scores(gm)
    options = loop.LoopOptions(tolerance=0.1, max_rounds=args.max_rounds, bench=BenchOptions(rounds=ROUNDS))
    refit, bracketed, kept = loop._refit, loop._bracketed, loop._times_kept
    print("| refit overshoot | bracketing | within ±10 % | within ±5 % |\n|---:|---|---:|---:|")
    for k in args.overshoot:
        loop._refit = overshooting(refit, k)
        for arm in args.arms:
            loop._bracketed = bracketed if arm != "off" else (lambda goal, *a: (goal, False))
            loop._times_kept = kept if arm == "illinois" else (lambda *a: 0)
            errors = []
            for make in TIMERS.values():
                for fraction in TARGETS:
                    rep = loop.deliver(gm, scores, Target(latency=fraction, granularity="both", round_to=1),
                                       latency=LatencyModel(gm, MacsTable()), timer=make(), options=options).report
                    errors.append(abs(rep.delivered.at(128).ratio / fraction - 1))
            e = np.array(errors)
            print(f"| {k:g} | {arm} | {(e <= 0.1).sum()} of {len(e)} | {(e <= 0.05).sum()} of {len(e)} |", flush=True)


if __name__ == "__main__":
    main()
