"""Latency tables for latency-targeted pruning, measured in onnxruntime on this machine.

MACs do not buy speed by themselves: onnxruntime's CPU conv kernels run some channel widths
far faster than others. Following HALP (Shen et al., "Hardware-Aware Latency Pruning", NVIDIA
2022), the latency of a pruned graph is estimated as the sum of its convolutions' latencies,
each looked up in a table of single-conv timings at the exact kept widths. Each entry is
measured once (a one-node ONNX model: ``QLinearConv`` for INT8, ``Conv`` for fp32, at the
deployment batch size; the profiler's kernel time, :func:`kernel_seconds`, without the layout
changes a lone conv pays) and cached on disk, keyed by machine, onnxruntime version and shape.
What the table leaves out (adds, pads, Q/DQ) the loop fits and measures (``latency_graph``,
``latency_loop``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from torch import fx, nn

from ehap_fx.errors import EhapError
from ehap_fx.passes._layers import _arg, functional_conv
from ehap_fx.passes.cost import removed_nodes
from ehap_fx.passes.export import session
from ehap_fx.passes.group import KeptChannels

PRECISIONS = ("int8", "fp32")
#: onnxruntime's layout changes (channels-last for INT8, NCHWc blocks for fp32): a one-conv
#: model pays them at its input and output, a conv inside a network does not
LAYOUT_OPS = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ehap-fx" / "latency.json"


@dataclass(frozen=True)
class LatencyOptions:
    """How to time convolutions: batch, threads, precision, repeats, and the cache file.

    ``max_busy``: the most cores other processes may keep busy, on average over the entries a
    run times (``OtherLoad``, summed over every entry: one entry takes milliseconds, less than
    ``/proc/stat``'s 10 ms tick can judge), for those entries to be cached. A loaded run still
    plans with them, and says so, but does not fix the plans of every later run: for ResNet-56
    at 0.5 of the latency, tables timed under load planned 0.31 and 0.74 of the MACs where a
    quiet one plans 0.54 (docs/results.md, 2026-12-08)."""

    batch_size: int = 128
    threads: int | None = None
    precision: str = "int8"
    repeats: int = 5
    cache: Path | None = field(default_factory=default_cache)
    max_busy: float = 0.5

    def __post_init__(self):
        if self.batch_size < 1 or self.repeats < 1:
            raise ValueError(f"batch_size={self.batch_size} and repeats={self.repeats} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 or None")
        if not self.max_busy >= 0:
            raise ValueError(f"max_busy={self.max_busy} must be >= 0")


@dataclass(frozen=True)
class ConvShape:
    """A convolution as onnxruntime sees it; ``depthwise`` keeps groups == channels."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    depthwise: bool
    height: int
    width: int
    out_size: tuple[int, int]  # output (H, W), as ShapeProp recorded it

    @classmethod
    def of(cls, conv: nn.Conv2d | SimpleNamespace, height: int, width: int,
           out_size: tuple[int, int]) -> ConvShape:
        padding = conv.padding
        if padding == "valid":
            padding = (0,) * len(conv.kernel_size)
        elif padding == "same" and all(k % 2 for k in conv.kernel_size):  # symmetric: (d·(k−1))/2 a side
            padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
        if isinstance(padding, str):
            raise EhapError(f"conv padding={padding!r} with kernel {tuple(conv.kernel_size)}: latency tables "
                            "need numeric, symmetric padding")
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        return cls(
            tuple(conv.kernel_size),
            tuple(conv.stride),
            tuple(padding),
            tuple(conv.dilation),
            1 if depthwise else conv.groups,
            depthwise,
            height,
            width,
            out_size,
        )


def _conv_model(shape: ConvShape, cin: int, cout: int, batch: int, precision: str):
    """A one-node ONNX model of the conv; its single input is named ``x``."""
    from onnx import TensorProto, helper, numpy_helper

    groups = cin if shape.depthwise else shape.groups
    rng = np.random.default_rng(0)
    w_shape = (cout, cin // groups, *shape.kernel)
    attrs = dict(
        kernel_shape=list(shape.kernel),
        strides=list(shape.stride),
        pads=list(shape.padding) * 2,
        dilations=list(shape.dilation),
        group=groups,
    )
    if precision == "int8":
        elem = TensorProto.UINT8
        inits = [
            numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
            numpy_helper.from_array(np.array(128, np.uint8), "xz"),
            numpy_helper.from_array(rng.integers(-127, 128, w_shape).astype(np.int8), "w"),
            numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
            numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
            numpy_helper.from_array(np.array(128, np.uint8), "yz"),
            numpy_helper.from_array(np.zeros(cout, np.int32), "b"),
        ]
        node = helper.make_node(
            "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], **attrs
        )
    else:
        elem = TensorProto.FLOAT
        inits = [
            numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        ]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", elem, [batch, cin, shape.height, shape.width])],
        [helper.make_tensor_value_info("y", elem, [batch, cout, *shape.out_size])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class LatencyTable:
    """Seconds per conv at given widths, measured on demand and cached on disk."""

    def __init__(self, options: LatencyOptions = LatencyOptions()):
        import onnxruntime as ort

        self.options = options
        self.machine = (
            f"{platform.machine()}/{platform.processor()}/ort-{ort.__version__}/threads={options.threads}"
            "/kernel-time"  # entries timed by the wall (before 2026-12-07) are not reused
        )
        self.entries: dict[str, float] = {}
        self._keys: dict[tuple[ConvShape, int, int], str] = {}
        self.measured = 0
        #: other processes' busy core-seconds and the wall seconds over this run's new entries
        #: (None: the machine's CPU time cannot be read)
        self.other: float | None = 0.0
        self.wall = 0.0
        if options.cache is not None and options.cache.exists():
            try:
                self.entries = json.loads(options.cache.read_text()).get(self.machine, {})
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a corrupt cache is re-measured, not trusted

    def _key(self, shape: ConvShape, cin: int, cout: int) -> str:
        o = self.options
        return json.dumps([asdict(shape), cin, cout, o.batch_size, o.precision, o.repeats])

    def seconds(self, shape: ConvShape, cin: int, cout: int) -> float:
        key = self._keys.get((shape, cin, cout))
        if key is None:  # the JSON key is slow to build, and select_plan asks for it thousands of times
            key = self._keys[shape, cin, cout] = self._key(shape, cin, cout)
        if key not in self.entries:
            with OtherLoad() as load:
                self.entries[key] = self._measure(shape, cin, cout)
            self.measured += 1
            self.wall += load.wall
            # summed unclipped: one entry's window is a tick or two, its own estimate ±0.5 cores
            self.other = None if load.other is None or self.other is None else self.other + load.other
        return self.entries[key]

    @property
    def busy(self) -> float | None:
        """Cores other processes kept busy, on average, while this run timed its new entries."""
        return None if self.other is None or not self.wall else max(0.0, self.other / self.wall)

    def load_summary(self) -> str | None:
        """What the load did to this run's new entries (None: timed on a quiet enough machine, or
        a machine whose load cannot be read)."""
        if self.busy is None or self.busy <= self.options.max_busy:
            return None
        return (f"the latency table's {self.measured} new entries were timed while other processes kept "
                f"{self.busy:.1f} cores busy on average (LatencyOptions.max_busy="
                f"{self.options.max_busy:g}): used for this plan, not cached; a plan from a loaded "
                "table can differ from a quiet machine's (the latency loop measures what it delivers)")

    def _measure(self, shape: ConvShape, cin: int, cout: int) -> float:
        o = self.options
        model = _conv_model(shape, cin, cout, o.batch_size, o.precision)
        dtype = np.uint8 if o.precision == "int8" else np.float32
        x = (
            np.random.default_rng(0)
            .integers(0, 255, (o.batch_size, cin, shape.height, shape.width))
            .astype(dtype)
        )
        return kernel_seconds(model, {"x": x}, repeats=o.repeats, threads=o.threads)

    def save(self) -> None:
        """Merge this machine's entries into the cache file (atomically)."""
        path = self.options.cache
        if path is None or not self.measured or self.load_summary() is not None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            data = {}
        data[self.machine] = {**data.get(self.machine, {}), **self.entries}
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


def kernel_seconds(model, feeds: dict, *, repeats: int, threads: int | None = None) -> float:
    """Seconds per run that onnxruntime's profiler puts in ``model``'s compute kernels, layout
    changes left out: the least over ``repeats`` runs, as ``timeit`` advises (noise only adds
    time, and the table compares widths, not loads: the measurement in the loop judges the
    whole file under the load of the day, ``latency_loop``).

    Why not the wall time of a one-conv model: onnxruntime runs INT8 convs channels-last, and
    alone in a model a conv pays two layout transposes and its input and output copies, each
    proportional to its activations, which a conv inside a network does not (there the layout
    is changed once at the input). On ResNet-56/32's block plans both tables predict within
    0.02 of each other; ``tools/latency_table_check.py`` prints them next to measured ratios
    (docs/results.md)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ehap-latency-") as folder:
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(folder) / "conv")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(repeats + 1):  # the first is the warm-up
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    kernels = [(e["ts"], e["dur"]) for e in events
               if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e.get("args", {}).get("op_name") not in LAYOUT_OPS]
    if len(runs) != repeats or not kernels:
        raise EhapError(f"onnxruntime's profile has {len(runs)} runs and {len(kernels)} kernel events, "
                        f"expected {repeats} runs")
    return min(sum(d for t, d in kernels if start <= t <= end) for start, end in runs) / 1e6


def conv2d_of(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | SimpleNamespace | None:
    """The 2-D conv a node computes: an ``nn.Conv2d`` call, or (a torch.export graph) an ATen
    conv on one module's weight (``aten.conv2d`` any overload, ``aten.convolution``), as the
    attributes ``ConvShape.of`` reads; None for anything else."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return mod if isinstance(mod, nn.Conv2d) else None
    spec = functional_conv(gm, node)
    if spec is None or len(spec.kernel_size) != 2:
        return None
    # aten.conv2d (x, w, b, stride, padding, dilation, groups); aten.convolution the same first six
    stride, padding, dilation = (_arg(node, i, name, default) for i, name, default in
                                 ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
    pair = (lambda v: tuple(v) * (2 if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else (v, v))
    padding = padding if isinstance(padding, str) else pair(padding)
    return SimpleNamespace(kernel_size=spec.kernel_size, stride=pair(stride), padding=padding,
                           dilation=pair(dilation), groups=spec.groups, in_channels=spec.in_channels,
                           out_channels=spec.out_channels)


class LatencyModel:
    """Estimated latency of ``gm`` under a plan: Σ over its convs of the table's timings."""

    def __init__(self, gm: fx.GraphModule, table: LatencyTable):
        self.gm = gm
        self.table = table
        self.convs: list[tuple[fx.Node, ConvShape]] = []
        for node in gm.graph.nodes:
            conv = conv2d_of(gm, node)
            if conv is not None:
                h, w = node.args[0].meta["tensor_meta"].shape[2:]
                out_hw = tuple(int(d) for d in node.meta["tensor_meta"].shape[2:])
                self.convs.append((node, ConvShape.of(conv, int(h), int(w), out_hw)))

    def __call__(self, kept: KeptChannels) -> float:
        def width(node: fx.Node) -> int:
            count = kept.count(node)
            return int(node.meta["tensor_meta"].shape[1] if count is None else count)

        gone = removed_nodes(self.gm, width)  # the convs of dropped blocks
        return sum(self.table.seconds(shape, width(node.args[0]), width(node))
                   for node, shape in self.convs if node not in gone)


# ---------------------------------------------------------------------------------------------
# Whole models: what the deployer measures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """How to time whole ONNX models in onnxruntime: the batch sizes, the rounds (every model
    runs once per round, the models interleaved so that machine noise hits all alike), and
    intra-op threads (``None``: onnxruntime's default, every core)."""

    batches: tuple[int, ...] = (1, 128)
    rounds: int = 10
    threads: int | None = None

    def __post_init__(self):
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches={self.batches} must be one or more sizes >= 1")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 or None")


def time_onnx(
    paths: dict[str, str | Path], options: BenchOptions = BenchOptions()
) -> dict[str, dict[int, float]]:
    """Median seconds per run of each ONNX file at each batch size, ``{name: {batch: s}}``
    (the medians of :func:`time_rounds`)."""
    rounds = time_rounds(paths, options)
    return {n: {b: statistics.median(v) for b, v in per.items()} for n, per in rounds.items()}


def _busy_seconds() -> float | None:
    """CPU seconds every process on this machine has run since boot (``/proc/stat``: user,
    nice, system, irq, softirq, steal, summed over the CPUs); None where there is no
    ``/proc/stat`` (not Linux) or it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """``with OtherLoad() as load: ...`` — ``load.cores``: how many cores other processes kept
    busy, on average, while the block ran (the machine's CPU time less this process's, over the
    wall time); None where the machine's CPU time cannot be read. A ratio of two timings taken
    while other processes compete can be biased however narrow its interval: under load 2–3
    on 2 cores a plan measured 0.52 of dense INT8 that measures 0.57 idle (docs/results.md)."""

    cores: float | None = None
    #: the wall seconds of the block, and other processes' CPU seconds in it (unclipped)
    wall: float = 0.0
    other: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _busy_seconds(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        busy = _busy_seconds()
        wall = self.wall = time.perf_counter() - wall0
        if busy is not None and busy0 is not None and wall > 0:
            self.other = busy - busy0 - (time.process_time() - own0)
            self.cores = max(0.0, self.other / wall)


def time_rounds(
    paths: dict[str, str | Path], options: BenchOptions = BenchOptions()
) -> dict[str, dict[int, list[float]]]:
    """Seconds per run of each ONNX file at each batch size, one value per round,
    ``{name: {batch: [s, ...]}}``: round ``i`` of every file ran back to back, so per-round
    ratios pair measurements taken under the same load.

    Sessions run without thread spinning (idle spinning threads of one session would steal
    the cores from the next one's run); after 3 warm-up runs each, the models take turns round
    by round; a round at batch 1 is 20 runs (one run is too short to time alone). Inputs are
    Gaussian, shaped like each file's first input with its batch axis set.
    """
    sessions = {name: session(p, threads=options.threads, spinning=False) for name, p in paths.items()}
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in options.batches} for n in sessions}
    rng = np.random.default_rng(0)
    for b in options.batches:
        feeds = {}
        for name, s in sessions.items():
            spec = s.get_inputs()[0]
            feeds[name] = {spec.name: rng.standard_normal((b, *spec.shape[1:]), dtype=np.float32)}
            for _ in range(3):
                s.run(None, feeds[name])
        reps = 20 if b == 1 else 1
        for _ in range(options.rounds):
            for name, s in sessions.items():
                t = time.perf_counter()
                for _ in range(reps):
                    s.run(None, feeds[name])
                times[name][b].append((time.perf_counter() - t) / reps)
    return times
