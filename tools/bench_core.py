"""Benchmark the core compiler against Torch-Pruning, side by side in one run.

Times, on torchvision ResNet-50 (1x3x224x224), ehap-fx's trace + group_channels and shrink
(50% of every group) against Torch-Pruning's DependencyGraph build (+ its get_all_groups), with
the rounds interleaved so machine noise hits both alike; prints medians and ratios. Then checks
the three cases where Torch-Pruning 1.6.1 is known to break (option-A ResNet-56, constant-size
split and chunk) and reports what each tool does with them.

    python tools/bench_core.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision.models as tvm
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.mask import random_plan
from ehap_fx.passes.shrink import shrink
from ehap_fx.passes.trace import trace
from torch import nn

from ehap_fx.isa import cpu_features
from ehap_fx.models import get_model


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_resnet50(rounds: int) -> None:
    import torch_pruning as tp

    model = tvm.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    times = {"ehap trace+group": [], "ehap shrink 50%": [], "TP build_dependency+groups": []}
    for _ in range(rounds):
        t, gm = _timed(lambda: group_channels(trace(model, x)).graph_module)
        times["ehap trace+group"].append(t)
        plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
        times["ehap shrink 50%"].append(_timed(lambda gm=gm, plan=plan: shrink(gm, plan))[0])

        def tp_build():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
            return list(graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)))

        times["TP build_dependency+groups"].append(_timed(tp_build)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    tp_time = med["TP build_dependency+groups"]
    print(f"\nResNet-50, 1x3x224x224, median of {rounds} interleaved rounds")
    print("| step | seconds | ratio to TP dependency build |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / tp_time:.2f}x |")
    both = med["ehap trace+group"] + med["ehap shrink 50%"]
    print(f"| ehap trace+group+shrink | {both:.3f} | {both / tp_time:.2f}x |")


def _torch_pruning_outcome(model: nn.Module, x: torch.Tensor, ignored: list[nn.Module]) -> str:
    import torch_pruning as tp

    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=ignored,
        )
        pruner.step()
        model(x)
        return "ok"
    except Exception as e:  # the point is to report how it fails
        return f"fails: {type(e).__name__}: {str(e)[:70]}"


def _ehap_outcome(model: nn.Module, x: torch.Tensor) -> str:
    from ehap_fx.passes.mask import mask_channels

    gm = group_channels(trace(model.eval(), x)).graph_module
    plan = random_plan(gm, 0.5, torch.Generator().manual_seed(0))
    small, ref = shrink(gm, plan).graph_module, mask_channels(gm, plan).graph_module
    with torch.no_grad():
        err = (small(x) - ref(x)).abs().max().item()
    params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in gm.parameters())
    return f"ok: params x{params:.2f}, max |shrunk - masked| = {err:.1e}"


class SplitNet(nn.Module):
    def __init__(self, chunk: bool):
        super().__init__()
        self.chunk = chunk
        self.a, self.b, self.c = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.a(x)
        p, q = torch.chunk(x, 2, 1) if self.chunk else torch.split(x, 16, 1)
        return self.b(p) + self.c(q)


def anchor_failures() -> None:
    x = torch.randn(1, 3, 32, 32)
    print("\nCases Torch-Pruning 1.6.1 is known to break (50% magnitude pruning)")
    print("| model | Torch-Pruning | ehap-fx |")
    print("|---|---|---|")
    cases = [
        ("ResNet-56 option A", lambda: get_model("resnet56").eval(), lambda m: [m.fc]),
        ("split(x, 16, 1)", lambda: SplitNet(chunk=False), lambda m: []),
        ("chunk(x, 2, 1)", lambda: SplitNet(chunk=True), lambda m: []),
    ]
    for name, make, ignored in cases:
        m = make()
        print(f"| {name} | {_torch_pruning_outcome(m, x, ignored(m))} | {_ehap_outcome(make(), x)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {cpu_features().describe()}, threads={torch.get_num_threads()}"
    )
    bench_resnet50(args.rounds)
    anchor_failures()


if __name__ == "__main__":
    main()
