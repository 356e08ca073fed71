"""A small mutation-testing harness: does the fast test suite notice a one-token bug?

Each mutant changes one token of one module (a comparison or arithmetic operator swapped,
``and``/``or``, ``min``/``max``, ``True``/``False``, an integer constant off by one) or drops one
simple statement (``pass`` in its place). Mutants that do not compile are skipped. Every
mutant runs in a copy of the repository (``ehap_fx.passes`` linked to the copy's ``passes/``,
so the working tree is never touched), with the fast test files of its module, ``-x``, and a
timeout; a failing or timed-out run kills it, a passing run is a survivor.

    nice -n 5 python tools/mutation.py --sample 60 --seed 0 --out mutation.json

Survivors are printed as ``file:line: original -> mutant``; docs/mutation.md lists the last
run's figures and what each survivor means.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> the fast test files that exercise it (paths tried in order)
TARGETS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("passes/cost.py",): ("tests/test_cost.py", "tests/test_depth.py"),
    ("passes/depth.py",): ("tests/test_depth.py",),
    ("passes/shrink.py",): ("tests/test_shrink.py", "tests/test_depth.py"),
    ("passes/mask.py",): ("tests/test_shrink.py",),
    ("passes/group.py",): ("tests/test_group.py", "tests/test_shrink.py"),
    ("ehap_fx/target.py",): ("tests/test_target.py",),
    ("ehap_fx/scoring/removal.py",): ("tests/test_removal.py",),
    ("ehap_fx/scoring/ranking.py",): ("tests/test_removal.py", "tests/test_target.py"),
    ("ehap_fx/scoring/budget.py",): ("tests/test_hessian.py",),
    ("ehap_fx/scoring/fold.py",): ("tests/test_hessian.py",),
}

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
        if not stripped or stripped.startswith(("#", '"', "'")) or stripped.startswith(COMPOUND):
            continue
        if line.rstrip().endswith(("(", "[", "{", ",", "\\", ":")) or stripped[0] in ")]}":
            continue
        indent = line[: len(line) - len(line.lstrip())]
        out.append(Mutant(path, row, len(indent), stripped, "pass", "statement"))
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
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "ehap_fx" / "passes").symlink_to(Path("..") / "passes")  # the installed package's layout


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-o", "addopts=-m 'not slow'", *tests], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - start
    status = "survived" if proc.returncode == 0 else "killed"
    return status, time.perf_counter() - start


def resolve(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if (ROOT / p).is_file()), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=int, default=60, help="mutants to run (a seeded sample of all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="limit to these module paths")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor x the clean run")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    plan = {m: t for paths, t in TARGETS.items() if (m := resolve(paths)) and (not args.only or m in args.only)}
    pool = []
    for module in plan:
        source = (ROOT / module).read_text()
        pool += [m for m in mutants_of(module, source) if not _in_docstring_or_check(source, m)]
    chosen = random.Random(args.seed).sample(pool, min(args.sample, len(pool)))
    chosen.sort(key=lambda m: (m.path, m.line, m.col))
    print(f"{len(pool)} candidate mutants in {len(plan)} modules; running {len(chosen)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ehap-mutation-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        baseline = {}
        for module in sorted({m.path for m in chosen}):
            status, seconds = run_tests(copy, plan[module], timeout=1800)
            if status != "survived":
                raise SystemExit(f"the clean tests of {module} fail: fix them first")
            baseline[module] = seconds
            print(f"clean {module}: {seconds:.0f} s", flush=True)
        for i, m in enumerate(chosen, 1):
            target = copy / m.path
            original = target.read_text()
            target.write_text(apply(original, m))
            try:
                m.status, m.seconds = run_tests(copy, plan[m.path], args.timeout_factor * baseline[m.path] + 30)
            finally:
                target.write_text(original)
            print(f"[{i}/{len(chosen)}] {m.status:>16}  {m.describe()}", flush=True)
    killed = sum(m.status.startswith("killed") for m in chosen)
    print(f"killed {killed}/{len(chosen)} = {100 * killed / max(1, len(chosen)):.1f} %")
    for m in chosen:
        if m.status == "survived":
            print("SURVIVED", m.describe())
    if args.out is not None:
        args.out.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "candidates": len(pool), "killed": killed, "run": len(chosen),
            "baseline_seconds": baseline, "mutants": [asdict(m) for m in chosen]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
