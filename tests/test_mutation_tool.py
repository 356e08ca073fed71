"""tools/mutation.py's sampling, estimate and replay (not the mutant runs themselves)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import mutation as mu  # noqa: E402


def _pool(path: str, n: int) -> list[mu.Mutant]:
    return [mu.Mutant(path, i + 1, 0, "+", "-", "operator") for i in range(n)]


def test_a_stratified_sample_is_proportional_seeded_and_at_least_two_per_module():
    pools = {"a.py": _pool("a.py", 300), "b.py": _pool("b.py", 100), "c.py": _pool("c.py", 3)}
    got = mu.stratified(pools, 40, seed=1)
    counts = {k: sum(m.path == k for m in got) for k in pools}
    assert counts == {"a.py": 30, "b.py": 10, "c.py": 2}
    assert [(m.path, m.line) for m in got] == [(m.path, m.line) for m in mu.stratified(pools, 40, seed=1)]
    assert got != mu.stratified(pools, 40, seed=2)


def test_the_estimate_weighs_each_module_by_its_candidates():
    """Module a: 100 candidates, 4 drawn, 2 killed; b: 300, 4 drawn, all killed. The rate is
    0.25 · 0.5 + 0.75 · 1 and only a's draws vary: SE² = 0.25² (1 − 4/100) · 0.25 / 3."""
    runs = _pool("a.py", 4) + _pool("b.py", 4)
    for m, status in zip(runs, ["killed", "survived", "killed", "survived"] + ["killed"] * 4, strict=True):
        m.status = status
    rate, se = mu.estimate({"a.py": 100, "b.py": 300}, runs)
    assert rate == pytest.approx(0.875)
    assert se == pytest.approx((0.25**2 * 0.96 * 0.25 / 3) ** 0.5)


def test_replay_finds_a_mutant_by_its_lines_text_and_drops_what_is_gone(tmp_path):
    source = (mu.ROOT / "passes/mask.py").read_text().splitlines()
    row = next(i for i, line in enumerate(source, 1) if line.strip().startswith("out = copy.deepcopy(gm)"))
    moved = mu.Mutant("passes/mask.py", row + 3, 4, source[row - 1].strip(), "pass", "statement",
                      status="survived", text=source[row - 1].strip())
    gone = mu.Mutant("passes/mask.py", row, 4, "x = 1", "pass", "statement", text="x = 1  # no such line")
    (tmp_path / "run.json").write_text(json.dumps({"mutants": [vars(moved), vars(gone)]}))
    found, lost = mu.replayed(tmp_path / "run.json")
    assert (found.line, found.status) == (row, "pending")
    assert lost.status == "gone"


def test_a_continuation_line_belongs_to_its_statements_first_line():
    source = "x = f(1,\n      2)\nif (x and\n        y):\n    z = [1,\n         2]\nw = 3\n"
    starts = mu.statement_starts(source)
    assert starts == {1: 1, 2: 1, 3: 3, 4: 3, 5: 5, 6: 5, 7: 7}


def test_junit_names_become_the_node_ids_of_the_coverage_contexts(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "cost.py").write_text("")
    assert mu._node_id(tmp_path, "tests.test_x", "test_a[1-b]") == "tests/test_x.py::test_a[1-b]"
    assert mu._node_id(tmp_path, "tests.test_x.TestY", "test_b") == "tests/test_x.py::TestY::test_b"
    assert mu._node_id(tmp_path, "passes.cost", "passes.cost.f") == "passes/cost.py::passes.cost.f"


def test_a_mutant_is_run_against_the_tests_of_its_line_found_again_by_its_text():
    """The map was built when ``y = 2`` was line 2; two lines were inserted above it since.
    The mutant on its continuation line (now 5) gets the tests of the statement's first line;
    one on a line no test executed gets none."""
    source = "a = 0\nb = 0\nx = 1\ny = (2 +\n     3)\nz = 4\n"
    cmap = mu.CoverageMap(lines={"m.py": {1: ["t::one"], 2: ["t::two", "t::three"]}},
                          texts={"m.py": {1: "x = 1", 2: "y = (2 +"}}, seconds={})
    on_first = mu.Mutant("m.py", 4, 7, "+", "-", "operator", text="y = (2 +")
    on_cont = mu.Mutant("m.py", 5, 7, "3", "4", "constant", text="3)")
    unrun = mu.Mutant("m.py", 6, 0, "z = 4", "pass", "statement", text="z = 4")
    assert cmap.tests_of(on_first, source) == ["t::three", "t::two"]
    assert cmap.tests_of(on_cont, source) == ["t::three", "t::two"]
    assert cmap.tests_of(unrun, source) == []


def test_a_test_run_reads_pass_as_survived_fail_as_killed_and_a_missing_test_as_an_error(tmp_path):
    """An unknown node id (pytest exit 4) must not count as a kill: a stale coverage map would
    inflate the rate."""
    (tmp_path / "test_t.py").write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert False\n")
    assert mu.run_tests(tmp_path, ("test_t.py::test_ok",), timeout=120)[0] == "survived"
    assert mu.run_tests(tmp_path, ("test_t.py::test_bad",), timeout=120)[0] == "killed"
    assert mu.run_tests(tmp_path, ("test_t.py::test_gone",), timeout=120)[0] == "error"


def _alive(pid: int) -> bool:
    """A process that runs (a zombie, killed and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to see the grandchild")
def test_a_timed_out_run_leaves_no_child_processes_behind(tmp_path):
    """A mutant that hangs a test which spawns workers (mp.spawn ranks): the timeout kills the
    whole group, not only pytest, so no orphan keeps loading the machine."""
    pidfile = tmp_path / "child.pid"
    parent = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    with pytest.raises(mu.subprocess.TimeoutExpired):
        mu.run_group([sys.executable, "-c", parent], tmp_path, dict(mu.os.environ), timeout=3)
    child = int(pidfile.read_text())
    import time

    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
