"""Train torchvision models on the shared CIFAR-10 at 32x32, briefly, on the CPU, for the INT8 comparisons.

No pretrained weights can be downloaded here, and an untrained model (chance accuracy, often a
constant output) makes an INT8 comparison meaningless: agreement and accuracy say nothing. This
gives ``torchvision:NAME`` models with ``num_classes=10``, architecture unchanged (the ImageNet
stem on 32x32 images, as ``tools/int8_backends.py`` builds them), trained from scratch for
``--steps`` SGD steps (Nesterov momentum, cosine decay, random crop + flip, CIFAR-10
normalisation) on the training images, then scored on the test images. A fixed seed sets the
initial weights and the batch order: the same command gives the same checkpoint.

The checkpoint (``{"state_dict", "meta"}``; ``resolve_model(spec, 10, weights=file)`` and
``ehap compress --weights`` read it) goes to ``--out`` (default ``runs/cifar10-torchvision/``,
ignored by git). Weights are never committed.

    OMP_NUM_THREADS=1 python tools/train_cifar_torchvision.py --models torchvision:resnet18 \\
        [--steps 2000] [--lr 0.05] [--seed 0] [--out runs/cifar10-torchvision]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from int8_agreement import SHARED  # tools/ beside this script

from ehap_fx.data import CIFAR10_NORM, load_cifar
from ehap_fx.models.resolve import resolve_model
from ehap_fx.train import FinetuneOptions, evaluate, finetune

OUT = Path(__file__).resolve().parents[1] / "runs" / "cifar10-torchvision"


def checkpoint_path(out: Path, spec: str) -> Path:
    """Where the checkpoint of ``spec`` goes: ``torchvision:resnet18`` -> ``OUT/torchvision_resnet18.pt``."""
    return out / f"{spec.replace(':', '_')}.pt"


def train_one(spec: str, args, train, test) -> tuple[torch.nn.Module, dict]:
    """Train ``spec`` from a seeded initialisation; returns it (eval mode) and the checkpoint's ``meta``."""
    torch.manual_seed(args.seed)  # the initial weights and dropout
    model = resolve_model(spec, 10).model
    options = FinetuneOptions(epochs=args.steps / len(train.loader(args.batch_size)), max_steps=args.steps,
                              lr=args.lr, weight_decay=args.weight_decay, progress=False)
    loader = train.loader(args.batch_size, shuffle=True, augment=True, seed=args.seed, normalization=CIFAR10_NORM)
    cpu = time.process_time()
    result = finetune(model, loader, options)
    cpu = time.process_time() - cpu  # this process's CPU seconds: wall time counts other jobs' load
    t = time.perf_counter()
    top1 = evaluate(model, test.loader(500, normalization=CIFAR10_NORM))
    return model, {"spec": spec, "num_classes": 10, "input_size": 32, "normalization": "cifar10",
            "steps": result.steps, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "seed": args.seed, "train_images": len(train),
            "train_s": round(result.seconds, 1), "train_cpu_s": round(cpu, 1), "eval_s": round(time.perf_counter() - t, 1),
            "test_images": len(test), "test_top1": round(top1, 2), "threads": torch.get_num_threads(),
            "final_loss": round(sum(result.losses[-50:]) / len(result.losses[-50:]), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["torchvision:resnet18", "torchvision:mobilenet_v3_large"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, help="train on the first N training images only")
    p.add_argument("--limit-test", type=int, default=10000)
    p.add_argument("--data", type=Path, default=SHARED / "data")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not (args.data / "cifar-10-batches-py").is_dir():
        print(f"skipped: needs CIFAR-10 under {args.data}")
        return 0
    train = load_cifar(args.data, split="train")
    if args.limit_train:
        train = train.head(args.limit_train)
    test = load_cifar(args.data, split="test").head(args.limit_test)
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        if not spec.startswith("torchvision:"):
            p.error(f"--models {spec!r}: this tool trains torchvision:NAME models")
        model, meta = train_one(spec, args, train, test)
        path = checkpoint_path(args.out, spec)
        torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
        print(f"{path}: {meta}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
