"""The output folder of ``ehap compress``: staged next to ``--out`` and renamed at the end, so a
failed or interrupted run leaves nothing half-written; report.json/md, the ONNX tags, the summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from torch import nn

from ehap_fx import report as rep
from ehap_fx.cli.flags import UsageError
from ehap_fx.cli.inputs import num_classes
from ehap_fx.errors import EhapError, ResumeError
from ehap_fx.models.resolve import library_of
from ehap_fx.report import ZERO_SCORES, all_scores_zero

log = logging.getLogger("ehap_fx")


# ---------------------------------------------------------------------------------------------
# Output folder: written to a temporary sibling, renamed at the end
# ---------------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier ehap output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())):
        raise UsageError(f"--out {str(out)!r} exists and is not an ehap output folder; "
                         "choose another --out")


CHECKPOINTS = "checkpoints"  # the subfolder of the partial folder where compress() saves its steps
OWNER = "owner.pid"  # the process writing the partial folder


def partial_folder(out: Path) -> Path:
    """Where a run of ``--out out`` is staged: one stable name, so that ``--resume`` finds it."""
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def staging(out: Path, *, resume: bool = False) -> Iterator[Path]:
    """A temporary folder next to ``out`` (:func:`partial_folder`), renamed to ``out`` on success.

    A run stopped (Ctrl-C, SIGTERM) or crashed after compress() saved a step keeps the folder and
    says how to continue it (``--resume``); one that saved nothing, or stopped on a user error,
    leaves nothing behind. A SIGKILLed run leaves it as it was. ``resume``: continue the folder's
    run (refused without one); else a folder of an earlier, dead run is replaced. A live run's
    folder is never taken.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_folder(out)
    _claim(tmp, resume)
    try:
        yield tmp
    except BaseException as e:
        with _uninterruptible():  # a second Ctrl-C must not stop the cleanup halfway
            _stopped(tmp, e)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    with _uninterruptible():
        shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)
        (tmp / OWNER).unlink(missing_ok=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def _claim(tmp: Path, resume: bool) -> None:
    owner = _owner(tmp)
    if owner is not None:
        raise UsageError(f"another ehap (pid {owner}) is writing {str(tmp)!r}; wait for it to finish or "
                         "choose another --out")
    if resume and not (tmp / CHECKPOINTS).is_dir():
        raise UsageError(f"--resume: no interrupted run to continue in {str(tmp)!r} (a run keeps it when "
                         "stopped after its first step); drop --resume to start one")
    if not resume and tmp.exists():
        log.info("replacing the interrupted run in %s (--resume would continue it)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    (tmp / OWNER).write_text(str(os.getpid()))


def _owner(tmp: Path) -> int | None:
    """The pid of a live process other than this one that writes ``tmp``, else None."""
    try:
        pid = int((tmp / OWNER).read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _stopped(tmp: Path, error: BaseException) -> None:
    """Keep the folder when compress() saved a step and the run was stopped (Ctrl-C, SIGTERM) or
    crashed (say how to continue), or when it was refused for another run's (ResumeError); remove
    it otherwise: after a user error the same flags would fail again."""
    saved = (tmp / CHECKPOINTS).is_dir() and any(p.suffix == ".pt" for p in (tmp / CHECKPOINTS).iterdir())
    refused = isinstance(error, ResumeError)
    if not saved or (isinstance(error, EhapError) and not refused):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    (tmp / OWNER).unlink(missing_ok=True)
    if not refused:  # a refused folder's message says why
        argv = [a for a in sys.argv[1:] if a != "--resume"]
        command = "ehap " + " ".join(shlex.quote(a) for a in [*(argv or ["compress"]), "--resume"])
        print(f"ehap: the finished steps are kept in {tmp}; continue with: {command}", file=sys.stderr)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """SIGINT ignored inside (the CLI's main thread), restored after."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """Where a rank other than 0 writes: a temporary folder, removed at the end."""
    with tempfile.TemporaryDirectory(prefix="ehap-rank-") as folder:
        yield Path(folder)


def _image_shape(data) -> tuple[int, ...]:
    """(3, H, W) of a dataset's images: CIFAR-shaped tensors in memory or an image folder's."""
    return tuple(data.image_shape) if hasattr(data, "image_shape") else tuple(data.images.shape[1:])


def _announce(args, opts, train, test, out) -> None:
    log.info("compress %s: target %s=%s (round_to %d), scorer %s, data %s / %s -> %s",
             args.model, opts.target.kind, opts.target.fraction, opts.target.round_to,
             opts.scorer, train.describe(), test.describe(), out)


def _full_report(args, result, train, test, norm, seconds: float, weights: str | None) -> dict:
    report = result.report.to_dict()
    report["run"] = {
        "command": "ehap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "ehap",
        "model": args.model, "dataset": args.dataset,
        "weights": weights,
        "synthetic": bool(train.synthetic),
        "data_detail": f"train: {train.describe()}; test: {test.describe()}",
        "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
        "seconds": round(seconds, 2),
        "onnx": "model_int8.onnx" if result.onnx_path else None,
        "input_shape": list(_image_shape(train)),
        "num_classes": num_classes(args, train),
        "model_library": library_of(args.model),
        "head": getattr(getattr(args, "resolved", None), "head", None),
    }
    return report


def _write_outputs(folder: Path, args, result, report: dict, dense: nn.Module) -> None:
    saved = report["run"]["pruned_state_dict"] = rep.save_pruned(
        result.pruned, folder, model=args.model, num_classes=report["run"]["num_classes"],
        groups=report["groups"], dense=dense, input_shape=tuple(report["run"]["input_shape"]))
    report["run"]["pruned_checkpoint"] = "pruned_model.pt (torch.save(gm))" + (
        "; pruned_state_dict.pt (weights, widths; ehap_fx.report.load_pruned)" if saved else "")
    if result.onnx_path is not None:
        _tag_onnx(result.onnx_path, report["run"])
    rep.write_json(report, folder / "report.json")
    (folder / "report.md").write_text(rep.render_markdown(report))
    rep.plot_channels(report, folder / "channels.png")
    rep.plot_sensitivity(report, folder / "sensitivity.png")


def _tag_onnx(path: Path, run: dict) -> None:
    """Record model, dataset, normalisation and the synthetic flag in the ONNX metadata."""
    model = onnx.load(str(path))
    for key, value in (("ehap.model", run["model"]), ("ehap.dataset", run["dataset"]),
                       ("ehap.normalization", json.dumps(run["normalization"])),
                       ("ehap.synthetic_data", str(run["synthetic"]))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _summary(out: Path, report: dict, args) -> None:
    b, a = report["cost_before"], report["cost_after"]
    acc = ", ".join(f"{k} {v:.2f}%" for k, v in report.get("accuracy", {}).items())
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    lines = [f"ehap: outputs in {out}/ ({files})",
             f"  MACs {b['macs']:,} -> {a['macs']:,} ({a['macs_ratio']:.3f}), params "
             f"{b['params']:,} -> {a['params']:,} ({a['params_ratio']:.3f})",
             f"  top-1: {acc or 'not evaluated'}  [{report['data']}]"]
    if "latency_ratio" in report["target"]:
        lines.insert(2, f"  estimated onnxruntime latency: {report['target']['latency_ratio']:.3f} of dense")
    if report.get("latency_loop"):
        loop = report["latency_loop"]
        lines.insert(3, "  measured INT8 latency / dense INT8: " + ", ".join(
            f"batch {b}: {r:.3f} ±{100 * loop['noise'][b]:.1f}%" for b, r in loop["measured_ratio"].items())
            + f" (asked {loop['target']:g}; {loop['status']}, {len(loop['rounds'])} round(s))")
        if loop["status"] != "met":
            lines.insert(4, f"  WARNING: latency loop: {loop['message']}")
    if report.get("export"):
        e, q = report["export"], report["quantize"]
        lines.append(f"  INT8 ({q['scheme']['target']}, {q['scheme']['weight_bits']}-bit weights): "
                     f"{100 * e['quantized_conv_fraction']:.0f}% of convs QLinearConv, onnxruntime on "
                     f"{e['isa']} agrees with PyTorch INT8 on {100 * e['argmax_agreement']:.2f}% of argmaxes")
    if report.get("latency"):
        lat = report["latency"]
        lines.append("  onnxruntime on this CPU, dense fp32 -> INT8: " + ", ".join(
            f"batch {b}: {lat['ms']['dense_fp32'][b]:.2f} -> {lat['ms']['int8'][b]:.2f} ms "
            f"({lat['speedup'][b]:.2f}x)" for b in lat["speedup"]))
    if all_scores_zero(report):
        lines.append(f"  WARNING: {ZERO_SCORES}")
    if report["run"]["dataset"] == "digits":
        lines += ["  NOTE: the embedded default (scikit-learn's real 8x8 handwritten digits, a model trained",
                  "  here). The real job, CIFAR-10 and its pretrained ResNet-56 (downloaded once), to half",
                  "  the INT8 latency (the paper's setting: --target-macs 0.5):",
                  "    ehap compress --model resnet56 --download --pretrained --target-latency 0.5",
                  "  offline: --data DIR (holding cifar-10-batches-py/) --pretrained-dir DIR"]
    if report["run"]["synthetic"]:
        lines += ["  NOTE: this ran on SYNTHETIC data (random images): the numbers above mean nothing.",
                  "  To run on real CIFAR-10 (folder holding cifar-10-batches-py/; --download fetches it):",
                  f"    ehap compress --model {args.model} --data PATH/TO/CIFAR --pretrained-dir "
                  "PATH/TO/WEIGHTS --target-macs 0.5 --out runs/real"]
    print("\n".join(lines))


def _slug(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")
