"""A small mutation-testing harness: does the fast test suite notice a one-token bug?

Each mutant changes one token of one module (a comparison or arithmetic operator swapped,
``and``/``or``, ``min``/``max``, ``True``/``False``, an integer constant off by one) or drops one
simple statement (``pass`` in its place). Mutants that do not compile are skipped. Every
mutant runs in a copy of the repository (``ehap_fx.passes`` linked to the copy's ``passes/``,
so the working tree is never touched), with the fast test files of its module, ``-x``, and a
timeout; a failing or timed-out run kills it, a passing run is a survivor.

    nice -n 5 python tools/mutation.py --sample 60 --seed 0 --out mutation.json

A mutant that survives its module's fast files is not yet a survivor of the suite: with
``--coverage-map`` (built once per commit by ``--build-map``: the default run, ``-m 'not slow'``,
under coverage.py with one context per test) it runs again against every test of the default
run that executes its line (its statement's first line for a continuation line), as mutmut
and cosmic-ray select tests; only a mutant that passes those too survives.

    nice -n 5 python tools/mutation.py --build-map runs/coverage-map.json     # the default run, under coverage
    nice -n 5 python tools/mutation.py --stratify --sample 90 --seed 4 --coverage-map runs/coverage-map.json

Survivors are printed as ``file:line: original -> mutant``; docs/mutation.md lists the last
run's figures and what each survivor means.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module (its paths, tried in order) -> the fast test files that exercise it, the likeliest to
# fail first: every module of passes/ and ehap_fx/scoring/, and ehap_fx/target.py
TARGETS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("passes/_analysis.py",): ("tests/test_group.py", "tests/test_coupling_rules.py", "tests/test_shrink.py"),
    ("passes/_layer_rules.py",): ("tests/test_coupling_rules.py", "tests/test_group.py",
                                  "tests/test_library_forms.py"),
    ("passes/_layers.py",): ("tests/test_group.py", "tests/test_library_forms.py", "tests/test_properties.py"),
    ("passes/_shape_rules.py",): ("tests/test_coupling_rules.py", "tests/test_group.py",
                                  "tests/test_library_forms.py"),
    ("passes/_onnx_rewrites.py",): ("tests/test_depth.py", "tests/test_export.py"),
    ("passes/_ort_quantizer.py",): ("tests/test_export_capture.py",),
    ("passes/capture.py",): ("tests/test_capture_auto.py", "tests/test_export_scoring.py"),
    ("passes/compensate.py",): ("tests/test_compensate.py",),
    ("passes/cost.py",): ("tests/test_cost.py", "tests/test_depth.py", "tests/test_library_forms.py"),
    ("passes/coupling.py",): ("tests/test_coupling_rules.py", "tests/test_group.py", "tests/test_depth.py"),
    ("passes/depth.py",): ("tests/test_depth.py",),
    ("passes/export.py",): ("tests/test_export.py",),
    ("passes/group.py",): ("tests/test_group.py", "tests/test_shrink.py", "tests/test_coupling_rules.py"),
    ("passes/mask.py",): ("tests/test_shrink.py",),
    ("passes/program.py",): ("tests/test_export_capture.py",),
    ("passes/quantize.py",): ("tests/test_quantize.py", "tests/test_isa.py"),
    ("passes/shrink.py",): ("tests/test_shrink.py", "tests/test_depth.py", "tests/test_coupling_rules.py",
                            "tests/test_library_forms.py", "tests/test_export_capture.py"),
    ("passes/trace.py",): ("tests/test_trace.py", "tests/test_group.py", "tests/test_capture_auto.py",
                         "tests/test_export_capture.py"),
    ("ehap_fx/target.py",): ("tests/test_target.py",),
    ("ehap_fx/scoring/__init__.py",): ("tests/test_hessian.py",),
    ("ehap_fx/scoring/budget.py",): ("tests/test_removal.py", "tests/test_ggn_mc.py"),
    ("ehap_fx/scoring/distributed.py",): ("tests/test_distributed.py",),
    ("ehap_fx/scoring/fold.py",): ("tests/test_hessian.py",),
    ("ehap_fx/scoring/ggn.py",): ("tests/test_hessian.py", "tests/test_removal.py"),
    ("ehap_fx/scoring/ggn_mc.py",): ("tests/test_ggn_mc.py",),
    ("ehap_fx/scoring/hessian.py",): ("tests/test_hessian.py", "tests/test_ggn_mc.py"),
    ("ehap_fx/scoring/options.py",): ("tests/test_hessian.py", "tests/test_removal.py"),
    ("ehap_fx/scoring/plan.py",): ("tests/test_hessian.py", "tests/test_removal.py", "tests/test_ggn_mc.py"),
    ("ehap_fx/scoring/ranking.py",): ("tests/test_removal.py", "tests/test_target.py"),
    ("ehap_fx/scoring/removal.py",): ("tests/test_removal.py",),
    ("ehap_fx/scoring/sampling.py",): ("tests/test_hessian.py",),
    ("ehap_fx/scoring/setup.py",): ("tests/test_hessian.py",),
}

# test files whose work runs in a child process (the ``ehap`` CLI, torchrun, a fresh interpreter):
# the coverage map cannot see what they execute, and they are the slowest of the suite
SUBPROCESS_TESTS = ("tests/test_cli.py", "tests/test_cli_flags.py", "tests/test_distributed.py", "tests/test_imagefolder.py",
                    "tests/test_layering.py", "tests/test_resume.py", "tests/test_sweep.py")

SWAPS = {
    "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
    "+": "-", "-": "+", "*": "/", "/": "*", "//": "/", "%": "//",
    "and": "or", "or": "and", "True": "False", "False": "True", "min": "max", "max": "min",
    "is": "is not", "in": "not in",
}
COMPOUND = ("def ", "class ", "if ", "elif ", "else", "for ", "while ", "with ", "try", "except",
            "finally", "return", "yield", "raise", "@", "import ", "from ", "assert ")


@dataclass
class Mutant:
    path: str
    line: int
    col: int
    original: str
    replacement: str
    kind: str
    status: str = "pending"
    seconds: float = 0.0
    text: str = ""  # the original line, stripped: ``--replay`` finds the line again by it
    covering: list[str] | None = None  # the other tests run on a module-files survivor (``--coverage-map``)

    def describe(self) -> str:
        return f"{self.path}:{self.line}: {self.original!r} -> {self.replacement!r} ({self.kind})"


def mutants_of(path: str, source: str) -> list[Mutant]:
    """Every candidate single-token mutant of ``source`` that compiles."""
    lines = source.splitlines(keepends=True)
    out: list[Mutant] = []
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    prev = ""  # the last significant token: a bare ``*`` after a line break is still a signature's
    for tok in toks:
        (row, col), text = tok.start, tok.string
        if tok.type == tokenize.OP and text in SWAPS:
            if text in ("*", "-") and prev in ("(", ",", "=", "[", ":", "return"):  # *args, unary minus
                continue
            out.append(Mutant(path, row, col, text, SWAPS[text], "operator"))
        elif tok.type == tokenize.NAME and text in SWAPS and text not in ("is", "in"):
            out.append(Mutant(path, row, col, text, SWAPS[text], "name"))
        elif tok.type == tokenize.NUMBER and text.isdigit():
            out.append(Mutant(path, row, col, text, str(int(text) + 1), "constant"))
        if tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            prev = text
    in_string = {row for tok in toks if tok.type == tokenize.STRING  # a docstring's inner lines
                 for row in range(tok.start[0] + 1, tok.end[0] + 1)}
    for row, line in enumerate(lines, 1):
        stripped = line.strip()
        if row in in_string:
            continue
        if stripped in ("", "pass", "...") or stripped.startswith(("#", '"', "'", *COMPOUND)):
            continue
        if line.rstrip().endswith(("(", "[", "{", ",", "\\", ":")) or stripped[0] in ")]}":
            continue
        indent = line[: len(line) - len(line.lstrip())]
        out.append(Mutant(path, row, len(indent), stripped, "pass", "statement"))
    for m in out:
        m.text = lines[m.line - 1].strip()
    return [m for m in out if _compiles(apply(source, m))]


def apply(source: str, m: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    line = lines[m.line - 1]
    if m.kind == "statement":
        lines[m.line - 1] = line[: m.col] + "pass\n"
    else:
        assert line[m.col:].startswith(m.original), (m, line)
        lines[m.line - 1] = line[: m.col] + m.replacement + line[m.col + len(m.original):]
    return "".join(lines)


def _compiles(source: str) -> bool:
    try:
        compile(source, "<mutant>", "exec")
    except SyntaxError:
        return False
    return True


def _in_docstring_or_check(source: str, m: Mutant) -> bool:
    """Mutants on lines that only build error messages or log: not behaviour the tests pin."""
    line = source.splitlines()[m.line - 1].strip()
    return line.startswith(("log.", "warnings.warn", "f\"", "\"")) or "raise " in line


def copy_repo(dest: Path) -> None:
    """The tracked files of the repository into ``dest``, a sibling of the repository (so that
    the tests find ``../shared`` as they do in the repository)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "ehap_fx" / "passes").symlink_to(Path("..") / "passes")  # the installed package's layout


def run_group(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own, output captured; on ``timeout`` its whole process group
    is killed (a mutant that hangs a test's ``mp.spawn`` ranks or ONNX workers leaves no
    orphans loading the machine) and ``TimeoutExpired`` raised."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """``pytest -x`` on ``tests`` (files or node ids; doctests' ids too) in the copy: "killed" when
    a test fails or the run times out, "survived" when all pass, "error" when it collects
    nothing or names a test that does not exist (exit 4 or 5): the harness's error, not a kill."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = run_group([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                          "-o", "addopts=-m 'not slow'", "--doctest-modules", *tests], copy, env, timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - start
    if proc.returncode in (4, 5):
        return "error", time.perf_counter() - start
    status = "survived" if proc.returncode == 0 else "killed"
    return status, time.perf_counter() - start


def statement_starts(source: str) -> dict[int, int]:
    """Each line of ``source`` -> the first line of the innermost statement (or compound
    statement's header) that contains it: coverage.py records a multi-line statement on its
    first line only."""
    starts: dict[int, int] = {}
    for node in ast.walk(ast.parse(source)):  # outer statements first: inner ones overwrite
        if isinstance(node, ast.stmt):
            body = getattr(node, "body", None)
            last = body[0].lineno - 1 if isinstance(body, list) and body else node.end_lineno
            for row in range(node.lineno, max(node.lineno, last) + 1):
                starts[row] = node.lineno
    return starts


@dataclass
class CoverageMap:
    """Which tests of the default run execute each line: ``lines[module][line] = [test ids]``,
    ``texts[module][line]`` the line's text when the map was built (a mutant's line is found
    again by its text, as ``replayed`` does), ``seconds[test id]`` each test's time."""

    lines: dict[str, dict[int, list[str]]]
    texts: dict[str, dict[int, str]]
    seconds: dict[str, float]

    @classmethod
    def load(cls, path: Path) -> CoverageMap:
        d = json.loads(path.read_text())
        return cls({m: {int(k): v for k, v in ls.items()} for m, ls in d["lines"].items()},
                   {m: {int(k): v for k, v in ts.items()} for m, ts in d["texts"].items()}, d["seconds"])

    def tests_of(self, m: Mutant, source: str) -> list[str]:
        """The tests that execute ``m``'s line or its statement's first line, each line of
        today's ``source`` found in the map by its text (the nearest such line: tests or fixes
        may have moved it since the map was built)."""
        texts, lines = self.texts.get(m.path, {}), self.lines.get(m.path, {})
        rows = source.splitlines()
        found: set[str] = set()
        for now in {m.line, statement_starts(source).get(m.line, m.line)}:
            then = [r for r, t in texts.items() if t == rows[now - 1].strip()]
            if then:
                found.update(lines[min(then, key=lambda r: abs(r - now))])
        return sorted(found)


def build_map(out: Path, tests: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> None:
    """Run the default suite (``-m 'not slow'``; only ``tests`` if given, less the files of
    ``ignore``) in a copy under coverage.py, one context per test (pytest-cov's
    ``--cov-context=test``), and write the map of ``TARGETS``' modules. Tests that fail
    unmutated are left out of the map (a mutant would "fail" them too)."""
    import xml.etree.ElementTree as ET

    import coverage  # a tool dependency only: pip install pytest-cov

    with tempfile.TemporaryDirectory(prefix=".ehap-covmap-", dir=ROOT.parent) as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-o", "addopts=-m 'not slow' --doctest-modules", "--cov=passes", "--cov=ehap_fx",
                               "--cov-context=test", "--cov-report=", f"--junitxml={copy / 'times.xml'}",
                               *(f"--ignore={f}" for f in ignore), *tests],
                              cwd=copy, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, text=True)
        if not (copy / "times.xml").is_file():
            raise SystemExit(f"the suite did not run (exit {proc.returncode})")
        seconds, failed = {}, set()
        for case in ET.parse(copy / "times.xml").iter("testcase"):
            node = _node_id(copy, case.get("classname", ""), case.get("name", ""))
            seconds[node] = float(case.get("time", 0))
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(node)  # it fails unmutated (a timeout under load): it cannot judge a mutant
        data = coverage.CoverageData(basename=str(copy / ".coverage"))
        data.read()
        lines: dict[str, dict[int, list[str]]] = {}
        texts: dict[str, dict[int, str]] = {}
        for paths in TARGETS:
            module = resolve(paths)
            if module is None:
                continue
            measured = str((copy / module).resolve())
            by_line = data.contexts_by_lineno(measured) if measured in data.measured_files() else {}
            lines[module] = {row: ids for row, ctx in by_line.items()  # "": at import
                             if (ids := sorted({c.rsplit("|", 1)[0] for c in ctx if c} - failed))}
            source = (copy / module).read_text().splitlines()
            texts[module] = {row: source[row - 1].strip() for row in lines[module]}
    out.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit(),
                               "suite_seconds": time.perf_counter() - start,
                               "tests": list(tests) or "the default run", "ignored": list(ignore),
                               "failed": sorted(failed), "lines": lines, "texts": texts, "seconds": seconds}))
    print(f"coverage map of {len(lines)} modules, {len(seconds)} tests ({len(failed)} failed unmutated, "
          f"left out: {sorted(failed)[:5]}{'…' if len(failed) > 5 else ''}) -> {out}")


def _node_id(root: Path, classname: str, name: str) -> str:
    """junit's ``classname`` (``tests.test_x`` or ``tests.test_x.TestY``) and ``name`` -> pytest's
    node id, the form of the coverage contexts."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (root / path).is_file():
            return "::".join([path, *parts[cut:], name])
    return f"{classname}::{name}"


def _collected(copy: Path) -> set[str]:
    """The node ids of the default run in ``copy`` (a map built on an older commit may name
    tests renamed or removed since)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=-m 'not slow' --doctest-modules"], cwd=copy, capture_output=True,
                          text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def resolve(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if (ROOT / p).is_file()), None)


def stratified(pools: dict[str, list[Mutant]], n: int, seed: int) -> list[Mutant]:
    """A seeded sample of about ``n`` mutants, each module's share proportional to its candidates
    (largest remainders), at least 2 per module (so that each has a variance) where it has them."""
    total = sum(len(p) for p in pools.values())
    quota = {k: n * len(p) / total for k, p in pools.items()}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: take[k] - quota[k])[: n - sum(take.values())]:
        take[k] += 1
    rng = random.Random(seed)
    return [m for k in sorted(pools) for m in rng.sample(pools[k], min(len(pools[k]), max(2, take[k])))]


def estimate(pools: dict[str, int], chosen: list[Mutant]) -> tuple[float, float]:
    """The kill rate over all candidates and its standard error, from a sample stratified by
    module: sum_h W_h p_h, Var = sum_h W_h^2 (1 - n_h/N_h) p_h (1 - p_h) / (n_h - 1), W_h = N_h / N
    (a stratum of one mutant counts the worst case, p (1 - p) / (n - 1) -> 1/4)."""
    total = sum(pools.values())
    rate = var = 0.0
    for module, size in pools.items():
        runs = [m for m in chosen if m.path == module]
        if not runs:
            continue
        n, w = len(runs), size / total
        p = sum(m.status.startswith("killed") for m in runs) / n
        rate += w * p
        var += w * w * (1 - n / size) * (p * (1 - p) / (n - 1) if n > 1 else 0.25)
    return rate, var ** 0.5


def replayed(path: Path) -> list[Mutant]:
    """The mutants of an earlier run's JSON, found again in today's sources: same file, a line with
    the same text (the nearest one to the recorded line number, as tests or fixes may move it)."""
    out = []
    for d in json.loads(path.read_text())["mutants"]:
        m = Mutant(**{**d, "status": "pending", "seconds": 0.0})
        lines = (ROOT / m.path).read_text().splitlines()
        rows = [i for i, line in enumerate(lines, 1) if line.strip() == m.text] if m.text else [m.line]
        if not rows:
            m.status = "gone"  # its line was rewritten or removed since
        else:
            m.line = min(rows, key=lambda r: abs(r - m.line))
            source = (ROOT / m.path).read_text()
            if apply(source, m) == source:
                m.status = "gone"  # a no-op (``pass`` for ``pass``): no longer a candidate
        out.append(m)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=int, default=60, help="mutants to run (a seeded sample of all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stratify", action="store_true",
                   help="sample each module in proportion to its candidates (at least 2 each)")
    p.add_argument("--only", nargs="*", help="limit to these module paths")
    p.add_argument("--replay", type=Path, help="re-run exactly the mutants of an earlier run's JSON")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor x the clean run")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at a time, each in its own copy")
    p.add_argument("--coverage-map", type=Path,
                   help="run a module-files survivor again against every default-run test that executes its line")
    p.add_argument("--build-map", type=Path, metavar="OUT",
                   help="build the coverage map of this commit (runs the default suite under coverage) and stop")
    p.add_argument("--map-tests", nargs="*", default=[], help="with --build-map: only these tests (a partial map)")
    p.add_argument("--map-ignore", nargs="*", default=list(SUBPROCESS_TESTS),
                   help="with --build-map: leave out these test files (default: those whose work runs in a "
                        "subprocess, which coverage.py does not follow here)")
    args = p.parse_args(argv)
    if args.build_map is not None:
        build_map(args.build_map, tuple(args.map_tests), tuple(args.map_ignore))
        return 0
    cmap = CoverageMap.load(args.coverage_map) if args.coverage_map is not None else None
    # each module's fast test files, and the module itself: its doctests are part of the default run
    plan = {m: (*t, m) for paths, t in TARGETS.items() if (m := resolve(paths)) and (not args.only or m in args.only)}
    pools: dict[str, list[Mutant]] = {}
    for module in plan:
        source = (ROOT / module).read_text()
        pools[module] = [m for m in mutants_of(module, source) if not _in_docstring_or_check(source, m)]
    pool = [m for ms in pools.values() for m in ms]
    if args.replay is not None:
        chosen = [m for m in replayed(args.replay) if m.path in plan]
    elif args.stratify:
        chosen = stratified({k: v for k, v in pools.items() if v}, args.sample, args.seed)
    else:
        chosen = random.Random(args.seed).sample(pool, min(args.sample, len(pool)))
    chosen.sort(key=lambda m: (m.path, m.line, m.col))
    print(f"{len(pool)} candidate mutants in {len(plan)} modules; running {len(chosen)}", flush=True)
    baseline = run_all(chosen, plan, args.timeout_factor, cmap, max(1, args.jobs))
    ran = [m for m in chosen if m.status != "gone"]
    killed = sum(m.status.startswith("killed") for m in ran)
    sizes = {k: len(v) for k, v in pools.items()}
    rate, se = estimate(sizes, ran) if args.stratify else (killed / max(1, len(ran)), 0.0)
    if not args.stratify and ran:
        se = (rate * (1 - rate) / max(1, len(ran) - 1) * (1 - len(ran) / max(len(pool), len(ran)))) ** 0.5
    print(f"killed {killed}/{len(ran)} = {100 * killed / max(1, len(ran)):.1f} % of the sample; "
          f"estimated over the {len(pool)} candidates: {100 * rate:.1f} % +- {100 * se:.1f} % (1 SE)")
    for m in chosen:
        if m.status.startswith(("survived", "gone")):
            print(m.status.upper(), m.describe())
    if args.out is not None:
        args.out.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "candidates": len(pool), "candidates_per_module": sizes, "killed": killed, "run": len(ran),
            "estimate": rate, "standard_error": se, "stratified": args.stratify,
            "coverage_map": str(args.coverage_map) if cmap is not None else None, "jobs": args.jobs,
            "baseline_seconds": baseline, "mutants": [asdict(m) for m in chosen]}, indent=1))
    return 0


def run_all(chosen: list[Mutant], plan: dict[str, tuple[str, ...]], factor: float,
            cmap: CoverageMap | None = None, jobs: int = 1) -> dict[str, float]:
    """Run every mutant of ``chosen`` (status and seconds set in place), ``jobs`` at a time, each
    in its own copy of the repository; the clean runs' seconds. With ``cmap``, a survivor of its
    module's files runs again against the other tests of the default run that execute its line
    (timeout: ``factor`` x their mapped seconds + 60)."""
    with tempfile.TemporaryDirectory(prefix=".ehap-mutation-", dir=ROOT.parent) as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for j in range(jobs):
            copy_repo(Path(tmp) / str(j))
            copies.put(Path(tmp) / str(j))

        def clean_run(tests: tuple[str, ...]) -> float:
            copy = copies.get()
            try:
                status, seconds = run_tests(copy, tests, timeout=1800)
            finally:
                copies.put(copy)
            if status != "survived":
                raise SystemExit(f"the clean tests {tests} fail: fix them first")
            return seconds

        known = _collected(Path(tmp) / "0") if cmap is not None else set()  # the map may be older
        modules = sorted({m.path for m in chosen if m.status != "gone"})
        sets = sorted({plan[m] for m in modules})
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            clean = dict(zip(sets, pool.map(clean_run, sets), strict=True))  # seconds per set of files
        baseline = {m: clean[plan[m]] for m in modules}
        for module in modules:
            print(f"clean {module}: {baseline[module]:.0f} s", flush=True)

        def one(m: Mutant) -> Mutant:
            copy = copies.get()
            target = copy / m.path
            original = target.read_text()
            target.write_text(apply(original, m))
            try:
                m.status, m.seconds = run_tests(copy, plan[m.path], factor * baseline[m.path] + 30)
                if m.status == "survived" and cmap is not None:
                    m.covering = [t for t in cmap.tests_of(m, original)
                                  if t in known and t.split("::")[0] not in plan[m.path]]
                    if m.covering:
                        status, seconds = run_tests(copy, tuple(m.covering),
                                                    factor * sum(cmap.seconds.get(t, 5.0) for t in m.covering) + 60)
                        m.seconds += seconds
                        m.status = {"survived": "survived", "error": "survived (stale coverage map: a test is gone)"
                                    }.get(status, f"{status} (covering tests)")
            finally:
                target.write_text(original)
                copies.put(copy)
            return m

        todo = [m for m in chosen if m.status != "gone"]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for i, m in enumerate(pool.map(one, todo), 1):  # in order: the log reads as before
                print(f"[{i}/{len(todo)}] {m.status:>16}  {m.describe()}", flush=True)
    return baseline

if __name__ == "__main__":
    sys.exit(main())
