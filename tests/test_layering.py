"""The package's imports go downward only, and its face costs nothing to import.

    foundation          ◀─  passes      ◀─  scoring          ◀─  pipeline           ◀─  cli
    (ehap_fx/_meta,         (passes/:       (ehap_fx/scoring/:    (the rest of           (ehap_fx/cli/,
    errors, isa,            graph →          Hessian, GGN,         ehap_fx/: compress,    __main__, the
    process_group,          PassResult)      removal, ranking)     train, QAT, data, …)   package face)
    train_options)

The tiers are folders: a module's tier is where it lives (``passes/`` is installed as
``ehap_fx.passes``); only the few foundation and CLI modules of ``ehap_fx/`` are named here.
Read from the source (AST), function-level imports included: a module may import its own tier
and the tiers left of it, never one to its right, and no import cycle may exist at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"passes": ROOT / "passes", "scoring": ROOT / "ehap_fx" / "scoring", "cli": ROOT / "ehap_fx" / "cli"}
FOUNDATION = {"ehap_fx._meta", "ehap_fx.errors", "ehap_fx.isa", "ehap_fx.process_group", "ehap_fx.progress",
              "ehap_fx.train_options"}
CLI = {"ehap_fx.__main__", "ehap_fx"}
ORDER = ["foundation", "passes", "scoring", "pipeline", "cli"]


def modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in ((ROOT / "ehap_fx", ("ehap_fx",)), (ROOT / "passes", ("ehap_fx", "passes"))):
        for path in folder.rglob("*.py"):
            parts = (*prefix, *path.relative_to(folder).with_suffix("").parts)
            out[".".join(parts).removesuffix(".__init__")] = path
    return out


def tier(module: str, path: Path) -> str:
    """The tier of ``module`` at ``path``: its folder's, else foundation / CLI by name, else the
    pipeline (the rest of ``ehap_fx/``)."""
    for name, folder in FOLDERS.items():
        if path.is_relative_to(folder):
            return name
    return "foundation" if module in FOUNDATION else "cli" if module in CLI else "pipeline"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, module- and function-level alike (the lazy
    ``__getattr__`` of the package face excepted: that is what makes it free to import)."""
    tree = ast.parse(path.read_text())
    face = path == ROOT / "ehap_fx" / "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if face and node not in tree.body:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n.startswith("ehap_fx"):
                found.add(n)
                break
    return found


def test_every_module_has_a_tier_and_imports_only_downward():
    known = modules()
    tiers = {m: tier(m, p) for m, p in known.items()}
    assert tiers["ehap_fx.scoring.hessian"] == "scoring" and tiers["ehap_fx.passes.shrink"] == "passes"
    upward = []
    for module, path in known.items():
        mine = ORDER.index(tiers[module])
        for target in imports(path, known) - {module}:
            if ORDER.index(tiers[target]) > mine:
                upward.append(f"{module} ({tiers[module]}) imports {target} ({tiers[target]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_package_face_and_a_pass_load_no_pipeline():
    probe = ("import sys, ehap_fx, ehap_fx.passes.trace; "
             "print(sorted(m for m in sys.modules if m.startswith('ehap_fx.')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    # (torch itself imports tqdm, so that one cannot be asked of us)
    for heavy in ("ehap_fx.scoring.hessian", "ehap_fx.compress", "ehap_fx.distributed", "ehap_fx.train"):
        assert heavy not in loaded, f"{heavy} loaded by `import ehap_fx.passes.trace`: {loaded}"
    import ehap_fx
    import ehap_fx.compress as _  # noqa: F401  (the submodule, imported first, must not hide the function)
    from ehap_fx import compress

    assert callable(compress) and compress.__module__ == "ehap_fx.compress"
    assert ehap_fx.compress is compress and ehap_fx.Target.__name__ == "Target"


def test_every_package_folder_is_installed():
    """``pyproject.toml`` lists the packages by name (``passes/`` is mapped to ``ehap_fx.passes``):
    a new package folder missing there would be left out of a wheel, though an editable install
    still finds it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("ehap_fx", *p.parent.relative_to(ROOT / "ehap_fx").parts))
               for p in (ROOT / "ehap_fx").rglob("__init__.py")} | {"ehap_fx.passes"}
    assert folders == listed
