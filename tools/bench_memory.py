"""Peak memory of ``compress(model, x)`` against Torch-Pruning's, side by side (issue #29).

Each (model, tool) runs in its own process: the model is built (random init, seeded), the
process's peak-RSS mark is reset (``/proc/self/clear_refs``), then the call runs and the new peak
(``VmHWM``) is read. So each figure is the peak while pruning, with the user's model already in
memory, and the ratio compares the two tools on the same model in the same run.

    python tools/bench_memory.py [--models vit_h_14 regnet_y_128gf vit_l_16] [--json runs/memory.json]

``ehap``: ``compress(model, x)`` exactly as the design card writes it (nothing else timed or
checked). ``tp``: Torch-Pruning 1.6.1 configured as ``tools/prunability.py`` does (its own
examples: L1 magnitude, 3 iterative steps, the classifier ignored, whole heads on a ViT).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

#: The three largest torchvision classifiers by parameter count (torchvision 0.29).
LARGEST = ("regnet_y_128gf", "vit_h_14", "vit_l_32")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(name: str, tool: str) -> dict:
    import torch
    from prunability import build, input_side

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("classification", name).eval()
    side = input_side(name)
    x = torch.randn(1, 3, *side)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark starts again from here
    t = time.perf_counter()
    if tool == "ehap":
        from ehap_fx.compress import compress

        result = compress(model, x)
        done = {"macs_ratio": round(result.report.cost_after["macs_ratio"], 4)}
    else:
        from prunability import _run_tp

        row = _run_tp("classification", name, model, x, round_to=8)
        done = {"macs_ratio": row.get("macs_ratio"), "status": row["status"]}
    return {"model": name, "tool": tool, "input": list(side), "weights_gib": weights / 2**30,
            "rss_before_gib": before / 2**30, "peak_gib": _status("VmHWM") / 2**30,
            "seconds": round(time.perf_counter() - t, 1), **done}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(LARGEST))
    p.add_argument("--tools", nargs="+", default=["ehap", "tp"], choices=("ehap", "tp"))
    p.add_argument("--child", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(f"{platform.processor() or platform.machine()}; one torch thread; peak RSS while pruning, "
          "the model already built", flush=True)
    print("| model | input | weights | ehap-fx peak | Torch-Pruning peak | ratio | ehap-fx − before | TP − before |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        got = {}
        for tool in args.tools:
            run = subprocess.run([sys.executable, __file__, "--child", name, tool], capture_output=True, text=True)
            if run.returncode != 0:
                got[tool] = {"error": run.stderr.strip().splitlines()[-1:] or [f"rc {run.returncode}"]}
                print(f"{name} {tool}: {got[tool]['error']}", flush=True)
                continue
            got[tool] = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append({"model": name, **got})
        e, t = got.get("ehap", {}), got.get("tp", {})
        if "peak_gib" in e and "peak_gib" in t:
            print(f"| {name} | {e['input'][0]}×{e['input'][1]} | {e['weights_gib']:.2f} GiB | {e['peak_gib']:.2f} GiB | "
                  f"{t['peak_gib']:.2f} GiB | {e['peak_gib'] / t['peak_gib']:.2f}× | "
                  f"{e['peak_gib'] - e['rss_before_gib']:.2f} GiB | {t['peak_gib'] - t['rss_before_gib']:.2f} GiB |",
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
