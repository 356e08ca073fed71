"""Allocation or selection: which part of a ranking decides the fine-tuned accuracy?

A pruning plan is two choices: how many channels each group keeps (the allocation) and which
ones (the selection). This tool crosses two cached rankings of ``tools/reproduce.py``: it keeps
the per-group widths of ranking A's plan, picks the channels by ranking B's scores, and gives
the result the same fine-tune as every reproduce row (same budget, same cache). Run
``reproduce.py`` with both scorers at the target first.

    python tools/swap_allocation.py --model resnet56 --target 0.5 --epochs 0.5 --hessian-batch 256 \\
        --pairs l1:removal-half removal-half:l1
"""

from __future__ import annotations

import argparse
import json

import reproduce
import torch
from ehap_fx.passes.shrink import PrunePlan, shrink
from reproduce import Run, budget_from, grouped, load_data, stage, test_loader

from ehap_fx.target import top_channels
from ehap_fx.train import evaluate


def crossed_plan(run: Run, allocation: str, selection: str, target: float) -> PrunePlan:
    """The widths of ``allocation``'s cached plan, the channels ``selection`` scores highest."""
    kept = json.loads((run.dir / f"{allocation}-{target}" / "pruned" / "plan.json").read_text())
    return top_channels(torch.load(run.dir / f"rank-{selection}" / "scores.pt"),
                        {int(g): len(k) for g, k in kept.items()})


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--pairs", nargs="+", default=["l1:removal-half", "removal-half:l1"],
                   help="ALLOCATION:SELECTION scorer pairs")
    args, rest = p.parse_known_args(argv)
    rargs = reproduce.parse_args(["--models", args.model, *rest])
    if rargs.threads:
        torch.set_num_threads(rargs.threads)
    budget = budget_from(rargs)
    data = load_data(budget, rargs.data_root)
    run = Run(args.model, budget, data, rargs.data_root, rargs.weights, rargs.out, print)
    rows = []
    for pair in args.pairs:
        allocation, selection = pair.split(":")
        plan = crossed_plan(run, allocation, selection, args.target)

        def pruned(folder, plan=plan):
            gm = shrink(grouped(run.model, budget), plan).graph_module
            torch.save(gm, folder / "model.pt")
            return {"top1": evaluate(gm, test_loader(data, budget, args.model)), **run._cost(gm)}

        name = f"swap-{allocation}-widths-{selection}-channels-{args.target}"
        before = stage(run.dir / name / "pruned", pruned, f"{name} pruned", print)
        after = stage(run.ft_dir / name / "ft", lambda f, n=name: run._finetune(
            torch.load(run.dir / n / "pruned" / "model.pt", weights_only=False), f), f"{name} fine-tune", print)
        rows.append({"widths": allocation, "channels": selection, "params": before["params"],
                     "macs_ratio": before["macs_ratio"], "pruned": before["top1"], "finetuned": after["top1"]})
    print("| widths from | channels chosen by | MACs kept | params (K) | pruned top-1 | fine-tuned top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['widths']} | {r['channels']} | {r['macs_ratio']:.3f} | {r['params'] / 1e3:.1f} | "
              f"{r['pruned']:.2f} | {r['finetuned']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
