"""tools/bench_hessian.py --part scale: the Hessian ranking's cost at ImageNet scale (one forward+backward
as the yardstick), each configuration in its own subprocess so that its peak memory is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ehap_fx.scoring.hessian import estimate_hessian, group_sensitivity
from ehap_fx.scoring.options import HessianOptions

sys.path.insert(0, str(Path(__file__).parent))
from bench_hessian import Decision, load_data, load_model, overlap, rss, spearman  # noqa: E402

IMAGENET = ("resnet50", "mobilenet_v3_large", "efficientnet_b0")
SCALE_CONFIGS = {  # name: (kind, options); "fb" is the fp32 forward+backward yardstick
    "fwd+bwd-fp32": ("fb", {}),
    "mc2-bf16": ("hessian", dict(estimator="mc", dtype="bf16", mc_samples=2)),
    "mc1-bf16": ("hessian", dict(estimator="mc", dtype="bf16", mc_samples=1)),
    "mc2-fp32": ("hessian", dict(estimator="mc", dtype="fp32", mc_samples=2)),
    "auto": ("hessian", {}),
    "auto-im2col": ("hessian", {}),  # the default with depthwise convs through im2col (before 2026-12-01)
    "ggn-bf16": ("hessian", dict(estimator="ggn", dtype="bf16")),
    "ggn-fp32": ("hessian", dict(estimator="ggn", dtype="fp32")),
    "removal-auto": ("removal", {}),
    "removal-mc2-bf16": ("removal", dict(estimator="mc", dtype="bf16", mc_samples=2)),
    "vmap-mc1-fp32": ("vmap", {}),  # torch.func per-sample gradients, one label per image
    "backpack-mc1-fp32": ("backpack", {}),  # BackPACK DiagGGNMC(mc_samples=1), if installed
}


REPEATED = {"fwd+bwd-fp32", "mc2-bf16", "mc1-bf16", "ggn-bf16", "auto", "auto-im2col"}
FB_PER_SAMPLE = 1.6  # fp32 forward+backward peak growth per sample / autograd's saved bytes (resnet50 @224: measured 1.55)


def fit_batch(name: str, fraction: float, cap: int = 256) -> tuple[int, str]:
    """The largest Hessian batch (a multiple of 8, at most ``cap``) whose fp32
    forward+backward is predicted to fit ``fraction`` of the memory available now: the
    process's RSS after setup + ``FB_PER_SAMPLE`` × the bytes autograd saves per sample
    (measured on one sample) × batch + weights and their gradients."""
    from ehap_fx.scoring.budget import available_memory, fmt_bytes, saved_bytes_per_sample

    gm, _, size = scale_model(name)
    per, _ = saved_bytes_per_sample(gm, torch.zeros(1, 3, size, size))
    weights = 2 * sum(p.numel() * p.element_size() for p in gm.parameters())
    room = fraction * available_memory(torch.device("cpu")) - rss() - weights
    batch = max(8, min(cap, int(room / (FB_PER_SAMPLE * per)) // 8 * 8))
    why = (f"batch {batch}: fp32 forward+backward predicted {fmt_bytes(rss() + weights + FB_PER_SAMPLE * per * batch)} "
           f"({fmt_bytes(per)} saved per sample) <= {fraction:g} of {fmt_bytes(available_memory(torch.device('cpu')))} available"
           + ("" if batch < cap else f" (capped at {cap})"))
    return batch, why


def vmap_mc(gm, x, chunk: int = 8) -> None:
    """The alternative to hooks: ``vmap(grad)`` per-sample gradients of every conv/linear
    weight, one label per image drawn from the softmax, squared and summed per channel."""
    from torch.func import functional_call, grad, vmap

    from ehap_fx.scoring.setup import prunable_modules

    names = [f"{n}.weight" for n in prunable_modules(gm)]
    params = {k: v.detach() for k, v in gm.named_parameters() if k in names}
    rest = {k: v.detach() for k, v in gm.named_parameters() if k not in names}
    rest.update(dict(gm.named_buffers()))
    with torch.no_grad():
        y = torch.multinomial(gm(x).softmax(-1), 1)[:, 0]

    def loss(p, x1, y1):
        return F.cross_entropy(functional_call(gm, (p, rest), (x1[None],)), y1[None])

    total = None
    for i in range(0, len(x), chunk):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[i:i + chunk], y[i:i + chunk])
        part = torch.cat([g[k].pow(2).flatten(2).sum((0, 2)) for k in names])
        total = part if total is None else total + part


def backpack_mc(model, x, path: str) -> None:
    """BackPACK's ``DiagGGNMC`` (its fx converter for residual graphs): raises where it does
    not cover the graph."""
    sys.path.insert(0, path)
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNMC

    net = extend(model, use_converter=True)
    with torch.no_grad():
        y = torch.multinomial(net(x).softmax(-1), 1)[:, 0]
    loss = extend(torch.nn.CrossEntropyLoss())(net(x), y)
    with backpack(DiagGGNMC(mc_samples=1)):
        loss.backward()


def scale_model(name: str):
    """A torchvision model (random init: no ImageNet weights here) or a CIFAR one, its traced
    and grouped graph, and its input size."""
    from ehap_fx.passes.group import group_channels
    from ehap_fx.passes.trace import trace

    if name in IMAGENET:
        import torchvision

        torch.manual_seed(0)
        model, weights, size = torchvision.models.get_model(name, weights=None).eval(), "random init", 224
    else:
        (model, weights), size = load_model(name), 32
    gm = group_channels(trace(model, torch.zeros(1, 3, size, size))).graph_module
    return gm, weights, size


@torch.no_grad()
def calibrate(gm, x, logit_std: float = 3.0) -> None:
    """Give a random-init network the statistics of a trained one: BN running statistics
    re-estimated on ``x`` (eval-mode random init is degenerate: resnet50's softmax is one-hot,
    mobilenet_v3's and efficientnet's the same for every image), then the last linear layer
    scaled so the logits' standard deviation is ``logit_std``."""
    bns = [m for m in gm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls
    gm.train()
    for i in range(0, len(x), 8):
        gm(x[i:i + 8])
    gm.eval()
    last = [m for m in gm.modules() if isinstance(m, torch.nn.Linear)][-1]
    k = logit_std / gm(x[:8]).std()
    last.weight.mul_(k)
    last.bias.mul_(k)


def scale_data(name: str, size: int, n: int):
    if size == 32:
        return load_data(name, n)[0]
    g = torch.Generator().manual_seed(0)  # no ImageNet here: N(0, 1) images, random labels
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)


def scale_child(spec: dict) -> dict:
    """One measurement in this (fresh) process: seconds, peak RSS, and the group scores."""
    from ehap_fx.passes.group import groups_of

    from ehap_fx.scoring.removal import estimate_removal

    torch.set_num_threads(spec["threads"])
    gm, weights, size = scale_model(spec["model"])
    x, y = scale_data(spec["model"], size, spec["batch"])
    if spec["model"] in IMAGENET:
        calibrate(gm, x)
    kind, cfg = SCALE_CONFIGS[spec["config"]]
    if spec["config"].endswith("-im2col"):
        import ehap_fx.scoring.ggn_mc as mc

        mc.channel_sq_norms = mc.im2col_sq_norms
    cfg = dict(cfg, **spec.get("override", {}))
    prunable = groups_of(gm).prunable
    base = rss()
    out = dict(spec, weights=weights)
    if kind in ("vmap", "backpack"):
        t0 = time.perf_counter()
        if kind == "vmap":
            vmap_mc(gm, x)
        else:
            import torchvision

            torch.manual_seed(0)
            net = torchvision.models.get_model(spec["model"], weights=None).eval()
            net.load_state_dict(gm.state_dict())  # the calibrated weights
            backpack_mc(net, x, spec["backpack"])
        out["seconds"], scores = time.perf_counter() - t0, None
    elif kind == "fb":
        times = []
        for _ in range(2):
            gm.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(gm(x), y).backward()
            times.append(time.perf_counter() - t0)
        out["seconds"], scores = min(times), None
    else:
        opts = HessianOptions(batch_size=spec["batch"], progress=False, **cfg)
        t0 = time.perf_counter()
        if kind == "removal":
            r = estimate_removal(gm, (x, y), prunable, opts)
            scores = torch.cat([r.scores[g.id] for g in prunable])
        else:
            r = estimate_hessian(gm, (x, y), opts, groups=prunable)
            s = group_sensitivity(prunable, r)
            scores = torch.cat([s[g.id] for g in prunable])
        out["seconds"] = time.perf_counter() - t0
        out["summary"] = r.summary()
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["base_rss"] = base
    out["load"] = round(os.getloadavg()[0], 1)
    if scores is not None:
        torch.save(scores, spec["scores"])
    return out


def run_scale(args) -> list[dict]:
    rows = []
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for model in args.scale_models:
        cifar = model not in IMAGENET
        configs = (args.cifar_configs if cifar else args.scale_configs) or (
            ["fwd+bwd-fp32", "ggn-bf16", "mc2-bf16", "mc1-bf16", "removal-auto",
             "removal-mc2-bf16", "ggn-fp32"] if cifar
            else ["fwd+bwd-fp32", "mc2-bf16", "mc1-bf16", "mc2-fp32", "auto", "vmap-mc1-fp32",
                  "backpack-mc1-fp32", "removal-mc2-bf16", "ref"])
        if cifar:
            batch = args.cifar_batch
        elif args.scale_batch == "auto":
            batch, why = fit_batch(model, args.fit_fraction)
            print(f"  {model}: {why}", flush=True)
        else:
            batch = int(args.scale_batch)
        again = [c for c in configs if c in REPEATED]  # the timings the ratios rest on
        for config in configs + again * (args.repeat - 1):  # interleaved: the machine is shared
            name, override = config, {}
            if config == "ref":  # a many-draw MC run: the reference without an exact GGN
                name, override = "mc2-bf16", dict(mc_samples=args.ref_draws, seed=99)
            spec = dict(model=model, config=name, override=override, batch=batch,
                        threads=args.threads, label=config, backpack=args.backpack,
                        scores=str(cache / f"scale-{model}-{config}-b{batch}.pt"))
            out = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_hessian.py")), "--scale-child", json.dumps(spec)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{model} {config}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
                rows.append(dict(spec, failed=out.stderr.strip().splitlines()[-1]))
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            if args.json:
                Path(args.json + ".partial").write_text(json.dumps({"scale": rows}, indent=1))
            print(f"  {model:18s} {config:14s} {row['seconds']:8.2f} s  peak "
                  f"{row['peak'] / 2**20:7.0f} MiB  load {row['load']}  "
                  f"{row.get('summary', {}).get('choice', '')}", flush=True)
        _agreement(rows, model, "ref" if not cifar else "ggn-fp32", batch)
    return _fastest(rows)


def _fastest(rows: list[dict]) -> list[dict]:
    """One row per (model, label): the fastest repeat's seconds, the largest peak RSS."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["label"])
        if key not in out or "failed" in out[key]:
            out[key] = dict(r, all_seconds=[r["seconds"]] if "seconds" in r else [])
        elif "seconds" in r:
            best = out[key]
            best["all_seconds"].append(r["seconds"])
            best["seconds"] = min(best["seconds"], r["seconds"])
            best["peak"] = max(best["peak"], r["peak"])
    return list(out.values())


def _agreement(rows: list[dict], model: str, ref_label: str, batch: int) -> None:
    """Spearman of group scores and overlap of the channels pruned at 0.5 MACs, vs the
    reference (trace scores vs ``ref_label``; removal scores vs the exact removal criterion,
    ``removal-auto``, where it is exact)."""
    mine = [r for r in rows if r["model"] == model and "failed" not in r]
    gm, _, size = scale_model(model)
    dec = Decision(gm, size=size)
    refs = {}
    for label in (ref_label, "removal-auto"):
        ref = next((r for r in mine if r["label"] == label), None)
        if ref is not None and (label == ref_label or ref["summary"]["method"] == "exact"):
            scores = torch.load(ref["scores"])
            refs[label] = (scores, dec.pruned(scores))
    for r in mine:
        kind = SCALE_CONFIGS[r["config"]][0]
        against = "removal-auto" if kind == "removal" else ref_label
        if r["label"] in refs or kind in ("fb", "vmap", "backpack") or against not in refs:
            continue
        sc, (ref_scores, ref_set) = torch.load(r["scores"]), refs[against]
        r["spearman"], r["overlap"] = spearman(sc, ref_scores), overlap(dec.pruned(sc), ref_set)
        r["reference"] = against


def render_scale(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fb = next((r for r in mine if r["config"] == "fwd+bwd-fp32" and "failed" not in r), None)
        lines += [f"\n{model} ({mine[0].get('weights', '?')}), Hessian batch {mine[0]['batch']}, "
                  f"{mine[0]['threads']} thread(s)\n",
                  "| ranking | seconds | × fp32 fwd+bwd | peak RSS MiB | × fwd+bwd peak | "
                  "Spearman vs ref | overlap @0.5 MACs | ref | choice | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if "failed" in r:
                lines.append(f"| {r['label']} | failed: {r['failed'][:80]} | | | | | | | | |")
                continue
            t = f"{r['seconds'] / fb['seconds']:.2f}" if fb else "-"
            m = f"{r['peak'] / fb['peak']:.2f}" if fb else "-"
            sp = f"{r['spearman']:.3f}" if "spearman" in r else "-"
            ov = f"{r['overlap']:.3f}" if "overlap" in r else "-"
            choice = r.get("summary", {}).get("choice", "").split(";")[0].split(":")[0]
            secs = "/".join(f"{v:.1f}" for v in r.get("all_seconds", [])) if len(r.get("all_seconds", [])) > 1 \
                else f"{r['seconds']:.2f}"
            lines.append(f"| {r['label']} | {secs} | {t} | {r['peak'] / 2**20:.0f} | "
                         f"{m} | {sp} | {ov} | {r.get('reference', '')} | {choice} | {r.get('load', '')} |")
    return "\n".join(lines)
