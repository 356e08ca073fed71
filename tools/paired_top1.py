"""Two ``ehap compress`` output folders scored image by image on the same test set: the paired
difference of their top-1 with its standard error, for the fp32 pruned model
(``pruned_model.pt``) and the INT8 file (``model_int8.onnx``, in onnxruntime).

A difference of two top-1 figures measured on the same images is far less noisy than either
figure alone: its standard error is that of the per-image differences (-1, 0 or +1), which
only the images the two models disagree on move.

    python tools/paired_top1.py /tmp/ft/rep /tmp/ft/norep --data ../shared/data
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from ehap_fx.passes.export import session

from ehap_fx.cli import _onnx_normalization
from ehap_fx.data import load_cifar
from ehap_fx.models import normalization


def correct(folder: Path, data: Path, model_name: str) -> dict[str, np.ndarray]:
    """Per-image correctness (bool, test order) of the folder's fp32 model and INT8 file."""
    onnx_path = folder / "model_int8.onnx"
    norm = _onnx_normalization(onnx_path) or normalization(model_name)
    test = load_cifar(data, split="test")
    out = {"fp32": [], "int8": []}
    model = torch.load(folder / "pruned_model.pt", weights_only=False).eval()
    sess = session(onnx_path)
    name = sess.get_inputs()[0].name
    with torch.no_grad():
        for x, y in test.loader(500, normalization=norm):
            out["fp32"].append((model(x).argmax(1) == y).numpy())
            out["int8"].append(sess.run(None, {name: x.numpy()})[0].argmax(1) == y.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--model", default="resnet56", help="whose normalization the fp32 model takes")
    args = p.parse_args()
    a, b = correct(args.a, args.data, args.model), correct(args.b, args.data, args.model)
    print(f"| model | {args.a} | {args.b} | a − b, paired | images that disagree |\n|---|---:|---:|---:|---:|")
    for kind in ("fp32", "int8"):
        d = a[kind].astype(float) - b[kind].astype(float)
        se = d.std(ddof=1) / math.sqrt(len(d))
        print(f"| {kind} | {100 * a[kind].mean():.2f} | {100 * b[kind].mean():.2f} | "
              f"{100 * d.mean():+.2f} ± {100 * se:.2f} pt | {int((d != 0).sum())} |")


if __name__ == "__main__":
    main()
