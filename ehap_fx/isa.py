"""What this CPU computes natively: the facts INT8 and half-precision choices depend on.

Two choices in ehap-fx depend on the instruction set, not on the model:

* **INT8 weights.** onnxruntime's (MLAS) and fbgemm's u8×s8 kernels on x86 without VNNI
  multiply with ``vpmaddubsw``, which adds two u8·s8 products into a *saturating int16*:
  ``255·127·2 = 64770 > 32767``, so large activations times large weights clip. VNNI
  (``vpdpbusd``) accumulates in int32 and never saturates. With 7-bit weights (−64..63)
  the worst pair is ``255·64·2 = 32640 ≤ 32767``: exact on every x86. That is onnxruntime's
  own advice (``reduce_range``) and what :func:`int8_target` chooses.
* **Half precision.** bf16 runs natively with AVX512-BF16 or AMX, fp16 with AVX512-FP16 or
  AMX-FP16; elsewhere PyTorch emulates it, much slower than fp32 (measured 17× on an AVX2
  CPU for a ResNet-56 Hessian probe). :func:`half_precision_cost` measures it here.

Features come from ``cpuid`` through PyTorch's cpuinfo (right inside VMs and emulators
that mask features), with ``/proc/cpuinfo`` for AVX-VNNI, which PyTorch does not report.

>>> f = cpu_features()
>>> f.describe().startswith(f.arch)
True
>>> int8_target("auto") in INT8_TARGETS
True
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass

import torch

INT8_TARGETS = ("x86-vnni", "x86-avx2", "arm64")
"""Where an INT8 model will run: each fixes the weight range its kernels compute exactly."""

WEIGHT_RANGES = {"x86-vnni": (-128, 127), "x86-avx2": (-64, 63), "arm64": (-128, 127)}


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set facts of one CPU (``arch``: ``x86_64``, ``arm64`` or other)."""

    arch: str
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX512-VNNI (int32 u8·s8 dot products, 512-bit)
    avx_vnni: bool = False  # AVX-VNNI (256-bit); fbgemm does not use it
    bf16: bool = False  # AVX512-BF16 or AMX-BF16
    fp16: bool = False  # AVX512-FP16 or AMX-FP16
    amx: bool = False

    def describe(self) -> str:
        """E.g. ``"x86_64 AVX-512 VNNI BF16"`` or ``"x86_64 AVX2"``: the name benchmark tables use."""
        names = [self.arch]
        if self.arch == "x86_64":
            names.append("AVX-512" if self.avx512 else "AVX2" if self.avx2 else "SSE")
            names += [n for n, on in (("VNNI", self.vnni), ("AVX-VNNI", self.avx_vnni and not self.vnni),
                                      ("BF16", self.bf16), ("FP16", self.fp16), ("AMX", self.amx)) if on]
        return " ".join(names)

    def native(self, dtype: str) -> bool:
        """Whether ``dtype`` ("fp32", "bf16", "fp16") runs natively on this CPU."""
        return {"fp32": True, "bf16": self.bf16, "fp16": self.fp16}[dtype]


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_has(name: str, fallback: bool) -> bool:
    check = getattr(torch.cpu, f"_is_{name}_supported", None)  # cpuid, via pytorch/cpuinfo
    return bool(check()) if check is not None else fallback


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (read once)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return CpuFeatures("arm64", bf16=_torch_has("arm_bf16", False))
    if machine not in ("x86_64", "amd64"):
        return CpuFeatures(machine or "unknown")
    flags = _proc_flags()
    amx = _torch_has("amx_tile", "amx_tile" in flags)
    return CpuFeatures(
        "x86_64",
        avx2=_torch_has("avx2", "avx2" in flags),
        avx512=_torch_has("avx512", "avx512f" in flags),
        vnni=_torch_has("vnni", "avx512_vnni" in flags),
        avx_vnni="avx_vnni" in flags,
        bf16=_torch_has("avx512_bf16", "avx512_bf16" in flags) or (amx and "amx_bf16" in flags),
        fp16=_torch_has("amx_fp16", "amx_fp16" in flags) or "avx512_fp16" in flags,
        amx=amx,
    )


def int8_target(target: str = "auto", features: CpuFeatures | None = None) -> str:
    """The INT8 target ``"auto"`` means on this CPU (others pass through, checked).

    x86 with AVX512-VNNI → ``"x86-vnni"`` (8-bit weights exact); any other x86 →
    ``"x86-avx2"`` (7-bit weights: fbgemm saturates without AVX512-VNNI even where
    onnxruntime has AVX-VNNI); ARM → ``"arm64"``.

    >>> int8_target("auto", CpuFeatures("x86_64", avx2=True))
    'x86-avx2'
    >>> int8_target("auto", CpuFeatures("x86_64", avx2=True, avx512=True, vnni=True))
    'x86-vnni'
    """
    if target != "auto":
        if target not in INT8_TARGETS:
            raise ValueError(f"target={target!r} must be 'auto' or one of {INT8_TARGETS}")
        return target
    f = features or cpu_features()
    if f.arch == "arm64":
        return "arm64"
    return "x86-vnni" if f.vnni else "x86-avx2"


@functools.cache
def half_precision_cost(dtype: str) -> float:
    """How many times slower than fp32 a small conv forward+backward runs in ``dtype`` here
    (best of 3; about a second where the dtype is emulated)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(0)

    def best(dt: torch.dtype) -> float:
        conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(dt)
        x = torch.randn(8, 32, 16, 16, generator=gen).to(dt)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            conv(x).square().sum().backward()
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch_dtype) / best(torch.float32)


class EmulatedPrecisionWarning(UserWarning):
    """A half-precision dtype was asked for on a CPU that only emulates it."""


def emulated_precision(dtype: str, device: torch.device | str = "cpu") -> str | None:
    """One line saying that ``dtype`` is emulated on this CPU, with its measured cost and what
    ``dtype="auto"`` would choose; None where it is native (or ``device`` is not a CPU)."""
    if torch.device(device).type != "cpu" or dtype not in ("bf16", "fp16"):
        return None
    f = cpu_features()
    if f.native(dtype):
        return None
    needs = "AVX512-BF16 or AMX" if dtype == "bf16" else "AVX512-FP16 or AMX-FP16"
    auto = "bf16" if f.bf16 else "fp32"
    return (f"dtype={dtype!r} is emulated on this CPU ({f.describe()}; native {dtype} needs {needs}): "
            f"a conv forward+backward measured {half_precision_cost(dtype):.1f}x slower than fp32 here; "
            f"dtype='auto' would choose {auto}")
