"""Benchmark the per-channel Hessian estimators: speed, memory and decision agreement.

Two parts, side by side in one run (timings on a shared machine are only comparable within
one run):

* ``speed``: for each model and configuration, a fresh subprocess builds the model and the
  Hessian batch, then times probes through the estimator's own code path and keeps the
  fastest after a warm-up one (the machine is shared: the minimum is the stable statistic).
  Reports seconds per probe (GGN: seconds for its single exact pass, best of two), peak
  memory (CUDA ``max_memory_allocated``; CPU: the subprocess's peak RSS and its growth over
  the RSS after setup) and the ratio to a PyHessian-style fp32 baseline (double backward
  w.r.t. all parameters, BN included).
* ``agree``: against a long fp32 Hutchinson reference (cached under ``--cache``, with its
  split-half reliability and its Spearman with the exact GGN), curves over probes and
  seconds of: Spearman of the channel-group scores and overlap of the channel set pruned at
  a 50% MACs target, for every estimator and precision.

* ``scale`` (issue 15): torchvision models at 224×224 with 1,000 classes (random init) and
  a CIFAR ResNet: ranking wall time and peak RSS of each estimator against one fp32
  forward+backward over the same batch, and agreement with a reference (group-score
  Spearman, overlap of the channels pruned at 0.5 MACs). Each measurement in a fresh
  subprocess (its own peak RSS), all in one run.

    python tools/bench_hessian.py --quick            # minutes on 2 CPU cores
    python tools/bench_hessian.py                    # fuller settings
    python tools/bench_hessian.py --part scale --scale-batch 32 --json .cache/hessian/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from ehap_fx.isa import cpu_features
from ehap_fx.models import get_model, normalization, pretrained_model
from ehap_fx.scoring.hessian import estimate_hessian, group_sensitivity
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.sampling import draw_batches

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar-10-batches-py" / "test_batch"

SPEED_CONFIGS = {
    "pyhessian-fp32": None,
    "hutch-fp32": dict(estimator="hutchinson", dtype="fp32"),
    "hutch-bf16": dict(estimator="hutchinson", dtype="bf16"),
    "hutch-fp32-nofold": dict(estimator="hutchinson", dtype="fp32", fold_bn=False),
    "hutch-bf16-nofold": dict(estimator="hutchinson", dtype="bf16", fold_bn=False),
    "hutch-bf16-autocast": dict(estimator="hutchinson", dtype="bf16", amp="autocast"),
    "hutch-bf16-batch4": dict(estimator="hutchinson", dtype="bf16", probe_batch=4),
    "hutch-bf16-fwd-rev": dict(estimator="hutchinson", dtype="bf16", hvp="forward_over_reverse"),
    "hutch-bf16-chlast": dict(estimator="hutchinson", dtype="bf16", channels_last=True),
    "hutch-fp16": dict(estimator="hutchinson", dtype="fp16"),  # CUDA; emulated on most CPUs
    "hybrid-bf16": dict(estimator="hybrid", dtype="bf16"),
    "ggn-fp32": dict(estimator="ggn", dtype="fp32"),
    "ggn-bf16": dict(estimator="ggn", dtype="bf16"),
    "ggn-bf16-chunk8": dict(estimator="ggn", dtype="bf16", ggn_chunk=8),
}
CURVES = {
    "hutch-fp32": dict(estimator="hutchinson", dtype="fp32"),
    "hutch-bf16": dict(estimator="hutchinson", dtype="bf16"),
    "hybrid-bf16": dict(estimator="hybrid", dtype="bf16"),
    "ggn-fp32": dict(estimator="ggn", dtype="fp32"),
    "ggn-bf16": dict(estimator="ggn", dtype="bf16"),
}


def load_model(name: str) -> tuple[torch.nn.Module, str]:
    """Pretrained weights from ../shared/weights when they exist, else random init (labelled)."""
    try:
        return pretrained_model(name, SHARED / "weights"), "pretrained"
    except Exception:  # noqa: BLE001 - any missing/unknown checkpoint falls back, labelled
        return get_model(name).eval(), "random init"


def load_data(name: str, n: int = 10000) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    if CIFAR.exists():
        with open(CIFAR, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        x = torch.from_numpy(d["data"][:n]).view(-1, 3, 32, 32)
        y = torch.tensor(d["labels"][:n])
        return (normalization(name)(x), y), "CIFAR-10 test (JPEG q75)"
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)), \
        "synthetic"


# ---------------------------------------------------------------- speed (one subprocess each)

def pyhessian_probe_seconds(model, x, y, probes: int) -> float:
    """PyHessian's recipe: fp32, all parameters, g once with create_graph, Hv per probe.

    Returns the fastest probe after a warm-up one (robust to a shared machine's spikes).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    times = []
    for _ in range(probes + 1):
        t0 = time.perf_counter()
        v = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hv = torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True)
        pairs = zip(v, hv, strict=True)
        torch.cat([(a * b).flatten(1).sum(1) for a, b in pairs if a.dim() > 1]).sum().item()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def ehap_probe_seconds(model, data, opts: HessianOptions, device, probes: int) -> float:
    """The estimator's own probe path (``hessian._Hvp``), fastest probe after a warm-up."""
    from ehap_fx.scoring import hessian as h

    names = h.prunable_modules(model)
    s = h.prepare(model, data, opts, names, F.cross_entropy, device)
    if opts.estimator == "ggn":
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            h._ggn_part(s, opts.ggn_chunk).sum().item()
            times.append(time.perf_counter() - t0)
        return min(times)
    hvp, gen = h._Hvp(s, opts), torch.Generator(device=device).manual_seed(0)
    pnames = [f"{n}.weight" for n in names]
    times = []
    for _ in range(probes + 1):
        t0 = time.perf_counter()
        vs = h._rademacher(s.params, opts.probe_batch, gen)
        row = h._contrib(vs, hvp(vs, 1.0), 1.0)
        if opts.estimator == "hybrid":
            row = row - h._gv_contrib(s, vs, pnames)
        row.sum().item()
        times.append((time.perf_counter() - t0) / opts.probe_batch)
    return min(times[1:])


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    model, weights = load_model(spec["model"])
    (x, y), _ = load_data(spec["model"], n=spec["batch"] * 2)
    device = torch.device(spec["device"])
    model = model.to(device)
    cfg = SPEED_CONFIGS[spec["config"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss()
    if cfg is None:
        xb, yb = draw_batches((x, y), spec["batch"], 1, 0)[0]
        sec = pyhessian_probe_seconds(model, xb.to(device), yb.to(device), spec["probes"])
    else:
        opts = HessianOptions(batch_size=spec["batch"], progress=False, **cfg)
        sec = ehap_probe_seconds(model, (x, y), opts, device, spec["probes"])
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(spec, seconds=sec, peak=peak, base_rss=base, weights=weights)


def run_speed(args) -> list[dict]:
    rows = []
    for model in args.models:
        for config in args.configs:
            spec = dict(model=model, config=config, batch=args.batch, probes=args.speed_probes,
                        threads=args.threads, device=args.device)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{model} {config}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            if args.json:  # partial results survive an interrupted run
                Path(args.json + ".partial").write_text(json.dumps({"speed": rows}, indent=1))
            print(f"  {model:10s} {config:22s} {row['seconds']:8.3f} s  "
                  f"peak {row['peak'] / 2**20:7.0f} MiB  growth "
                  f"{(row['peak'] - row['base_rss']) / 2**20:7.0f} MiB", flush=True)
    return rows


# ---------------------------------------------------------------- agreement

def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


class Decision:
    """Channel groups of the model and the set pruned at a MACs target by global ranking."""

    def __init__(self, model, target: float = 0.5, size: int = 32):
        from ehap_fx.passes.cost import plan_cost, total_cost
        from ehap_fx.passes.group import group_channels
        from ehap_fx.passes.trace import trace

        gm = trace(model, torch.zeros(1, 3, size, size))
        gm = group_channels(gm).graph_module
        self.gm, self.plan_cost = gm, plan_cost
        self.groups = list(gm.meta["ehap.groups"])
        self.prunable = [g for g in self.groups if g.prunable]
        self.budget = target * total_cost(gm).macs
        self.model = model

    def scores(self, result) -> torch.Tensor:
        s = group_sensitivity(self.prunable, result)
        return torch.cat([s[g.id] for g in self.prunable])

    def pruned(self, scores: torch.Tensor) -> set[int]:
        """Lowest-score channels removed (keeping each group's best) until MACs <= budget."""
        sizes = [g.size for g in self.prunable]
        offsets = torch.tensor([0, *sizes]).cumsum(0)[:-1]
        best = {int(offsets[i] + scores[o:o + n].argmax()) for i, (o, n) in
                enumerate(zip(offsets.tolist(), sizes, strict=True))}
        order = [int(i) for i in scores.argsort() if int(i) not in best]
        lo, hi = 0, len(order)
        while lo < hi:  # smallest k whose plan meets the budget
            k = (lo + hi) // 2
            if self._macs(set(order[:k])) <= self.budget:
                hi = k
            else:
                lo = k + 1
        return set(order[:lo])

    def _macs(self, removed: set[int]) -> int:
        masks, start = [], 0
        for g in self.groups:
            m = torch.ones(g.size, dtype=torch.bool)
            if g.prunable:
                for i in range(g.size):
                    if start + i in removed:
                        m[i] = False
                start += g.size
            masks.append(m)
        return self.plan_cost(self.gm, masks).macs


def overlap(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(len(b), 1)


def reference(args, model, data) -> object:
    """fp32 Hutchinson with ``--ref-probes`` probes, computed in cached chunks of 100."""
    from dataclasses import replace

    parts, chunk = [], 100
    for i in range(0, args.ref_probes, chunk):
        path = Path(args.cache) / f"ref-{args.agree_model}-b{args.agree_batch}-c{i // chunk}.pt"
        if not path.exists():
            print(f"reference chunk {i // chunk}: {chunk} fp32 probes -> {path}", flush=True)
            r = estimate_hessian(model, data, HessianOptions(
                estimator="hutchinson", dtype="fp32", batch_size=args.agree_batch,
                probes=chunk, seed=12345 + i, progress=False))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(r, path)
        parts.append(torch.load(path, weights_only=False))
    rows = torch.cat([r.probe_traces for r in parts])
    return replace(with_rows(parts[0], rows), probe_traces=rows, probes=rows.shape[0],
                   seconds=sum(r.seconds for r in parts))


def with_rows(result, rows: torch.Tensor):
    """The same result with traces replaced by the mean of ``rows`` (first k probes)."""
    from dataclasses import replace

    mean = rows.mean(0).split([result.traces[n].shape[0] for n in result.names])
    return replace(result, traces=dict(zip(result.names, mean, strict=True)))


def run_agree(args) -> dict:
    torch.set_num_threads(args.threads)
    model, weights = load_model(args.agree_model)
    data, source = load_data(args.agree_model)
    dec = Decision(model)
    exact = estimate_hessian(model, data, HessianOptions(
        estimator="ggn", dtype="fp32", batch_size=args.agree_batch, progress=False))
    exact_scores = dec.scores(exact)
    exact_set = dec.pruned(exact_scores)
    ref = reference(args, model, data)
    ref_scores = dec.scores(ref)
    ref_set = dec.pruned(ref_scores)
    half = ref.probe_traces.shape[0] // 2
    h1, h2 = (dec.scores(with_rows(ref, ref.probe_traces[:half])),
              dec.scores(with_rows(ref, ref.probe_traces[half:])))
    out = dict(model=args.agree_model, weights=weights, data=source, batch=args.agree_batch,
               ref_probes=ref.probes, ref_seconds=ref.seconds,
               ref_split_half_spearman=spearman(h1, h2),
               ref_split_half_overlap=overlap(dec.pruned(h1), dec.pruned(h2)),
               ref_vs_ggn_spearman=spearman(ref_scores, exact_scores),
               ref_vs_ggn_overlap=overlap(ref_set, exact_set),
               ggn_vs_ref_halves=[spearman(exact_scores, h1), spearman(exact_scores, h2)],
               curves={})
    for name in args.curves:
        cfg = CURVES[name]
        probes = None if cfg["estimator"] == "ggn" else args.curve_probes
        r = estimate_hessian(model, data, HessianOptions(
            batch_size=args.agree_batch, probes=probes, seed=1, progress=False, **cfg))
        if probes is None:
            ks, per = [0], r.seconds
        else:
            ks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= r.probes]
            per = r.seconds / r.probes
        pts = []
        for k in ks:
            sc = dec.scores(r if k == 0 else with_rows(r, r.probe_traces[:k]))
            chosen = dec.pruned(sc)
            pts.append(dict(probes=k, seconds=r.seconds if k == 0 else per * k,
                            spearman=spearman(sc, ref_scores), overlap=overlap(chosen, ref_set),
                            spearman_exact=spearman(sc, exact_scores),
                            overlap_exact=overlap(chosen, exact_set)))
        out["curves"][name] = dict(seconds_per_probe=per, points=pts)
        last = pts[-1]
        print(f"  {name:12s} {last['probes']:5d} probes {last['seconds']:8.1f} s  "
              f"vs ref: spearman {last['spearman']:.3f} overlap {last['overlap']:.3f}  "
              f"vs exact: {last['spearman_exact']:.3f} / {last['overlap_exact']:.3f}",
              flush=True)
    return out


def _hybrid_time(name: str, curve: dict, curves: dict) -> None:
    """Hybrid time at k probes = its exact GGN pass + k probes (not k · total / probes)."""
    ggn = curves.get(name.replace("hybrid", "ggn"))
    if not name.startswith("hybrid") or not ggn:
        return
    t_ggn = ggn["points"][0]["seconds"]
    last = curve["points"][-1]
    total = curve["seconds_per_probe"] * last["probes"]
    per = max(total - t_ggn, 0.0) / last["probes"]
    for pt in curve["points"]:
        pt["seconds"] = t_ggn + per * pt["probes"]


# ---------------------------------------------------------------- scale (issue 15)

def render(results: dict) -> str:
    from bench_hessian_scale import render_scale  # (it imports this module's helpers)

    """Markdown tables of a results JSON (``--render``)."""
    lines = []
    speed = results.get("speed", [])
    for model in dict.fromkeys(r["model"] for r in speed):
        rows = [r for r in speed if r["model"] == model]
        base = next((r for r in rows if r["config"] == "pyhessian-fp32"), rows[0])
        lines += [f"\n{model} ({rows[0]['weights']}), Hessian batch {rows[0]['batch']}, "
                  f"{rows[0]['device']}, {rows[0]['threads']} thread(s)\n",
                  "| config | s/probe (GGN: s/pass) | speed-up vs PyHessian fp32 | peak MiB | "
                  "growth MiB | growth vs baseline |", "|---|---|---|---|---|---|"]
        for r in rows:
            g, g0 = r["peak"] - r["base_rss"], base["peak"] - base["base_rss"]
            lines.append(f"| {r['config']} | {r['seconds']:.3f} | "
                         f"{base['seconds'] / r['seconds']:.2f}x | {r['peak'] / 2**20:.0f} | "
                         f"{g / 2**20:.0f} | {g / g0 - 1:+.0%} |")
    agree = results.get("agree")
    if agree:
        lines += [f"\nagreement: {agree['model']} ({agree['weights']}), {agree['data']}, "
                  f"Hessian batch {agree['batch']}; reference {agree['ref_probes']} fp32 "
                  f"Hutchinson probes ({agree['ref_seconds']:.0f} s), split-half Spearman "
                  f"{agree['ref_split_half_spearman']:.3f}, overlap "
                  f"{agree['ref_split_half_overlap']:.3f}\n",
                  f"reference vs exact GGN: Spearman {agree['ref_vs_ggn_spearman']:.3f}, "
                  f"overlap {agree['ref_vs_ggn_overlap']:.3f}\n",
                  "| estimator | probes | seconds | Spearman vs ref | overlap vs ref "
                  "| Spearman vs exact | overlap vs exact |", "|---|---|---|---|---|---|---|"]
        for name, c in agree["curves"].items():
            _hybrid_time(name, c, agree["curves"])
            for pt in c["points"]:
                lines.append(f"| {name} | {pt['probes']} | {pt['seconds']:.1f} | "
                             f"{pt['spearman']:.3f} | {pt['overlap']:.3f} | "
                             f"{pt['spearman_exact']:.3f} | {pt['overlap_exact']:.3f} |")
        if "ggn_vs_ref_halves" in agree:
            a, b = agree["ggn_vs_ref_halves"]
            lines.append(f"\nGGN vs each reference half: Spearman {a:.3f} / {b:.3f}")
    if results.get("scale"):
        lines.append(render_scale(results["scale"]))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings: a few minutes on CPU")
    p.add_argument("--part", choices=["speed", "agree", "scale", "all"], default="all")
    p.add_argument("--scale-models", nargs="+", default=["resnet50", "mobilenet_v3_large", "efficientnet_b0", "resnet56"],
                   help="bench_hessian_scale.IMAGENET and one CIFAR net")
    p.add_argument("--scale-configs", nargs="+", help="ImageNet models' configs (default: see run_scale)")
    p.add_argument("--cifar-configs", nargs="+", help="CIFAR models' configs (default: see run_scale)")
    p.add_argument("--scale-batch", default="auto",
                   help="Hessian batch at 224x224: a number, or auto (the largest <= 256 predicted to fit)")
    p.add_argument("--fit-fraction", type=float, default=0.35,
                   help="--scale-batch auto: the share of the available memory the forward+backward may take")
    p.add_argument("--cifar-batch", type=int, default=256)
    p.add_argument("--ref-draws", type=int, default=32, help="label draws of the MC reference")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the main scale configs (REPEATED) this many times, keep the fastest")
    p.add_argument("--backpack", default="/tmp/bp_pkgs",
                   help="where backpack-for-pytorch is installed (pip install --target)")
    p.add_argument("--scale-child", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+")
    p.add_argument("--configs", nargs="+", help="default: all (hutch-fp16 only on CUDA)")
    p.add_argument("--curves", nargs="+", default=list(CURVES))
    p.add_argument("--batch", type=int, help="Hessian batch for the speed part")
    p.add_argument("--speed-probes", type=int)
    p.add_argument("--agree-model")
    p.add_argument("--agree-batch", type=int)
    p.add_argument("--ref-probes", type=int, default=1000)
    p.add_argument("--curve-probes", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "hessian"))
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--render", help="print the markdown tables of a --json file and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from bench_hessian_scale import run_scale, scale_child  # (it imports this module's helpers)

    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.scale_child:
        print(json.dumps(scale_child(json.loads(args.scale_child))))
        return
    q = args.quick
    args.configs = args.configs or [c for c in SPEED_CONFIGS
                                    if c != "hutch-fp16" or args.device.startswith("cuda")]
    args.models = args.models or (["resnet32", "resnet56"] if q else
                                  ["resnet32", "resnet56", "wrn-16-4"])
    args.batch = args.batch or (64 if q else 256)
    args.speed_probes = args.speed_probes or (3 if q else 10)
    args.agree_model = args.agree_model or "resnet20"
    args.agree_batch = args.agree_batch or (32 if q else 128)
    args.curve_probes = args.curve_probes or (100 if q else 400)
    print(f"# bench_hessian {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{cpu_features().describe()}, torch {torch.__version__}, "
          f"device {args.device}, threads {args.threads}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results = {"argv": sys.argv[1:], "device": args.device}
    if args.part in ("speed", "all"):
        results["speed"] = run_speed(args)
    if args.part in ("agree", "all"):
        results["agree"] = run_agree(args)
    if args.part == "scale":
        results["scale"] = run_scale(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(render(results))


if __name__ == "__main__":
    main()
