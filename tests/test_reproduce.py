"""tools/reproduce.py: budgets, scorer settings, and a tiny end-to-end run that resumes from its cache."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import reproduce  # noqa: E402

TINY = ["--quick", "--threads", "1", "--train-limit", "128", "--test-limit", "128"]


def test_budget_key_changes_with_any_setting():
    base = reproduce.Budget()
    assert base.key() == reproduce.Budget().key()
    assert base.key() != reproduce.Budget(epochs=1.0).key()
    assert base.rank_key().startswith("cifar10-")


def test_rank_key_ignores_fine_tune_and_int8_settings():
    base = reproduce.Budget()
    longer = reproduce.Budget(epochs=30.0, qat_steps=1000, max_steps=5)
    assert base.rank_key() == longer.rank_key() and base.key() != longer.key()
    assert base.rank_key() != reproduce.Budget(probes=32).rank_key()
    assert base.rank_key() != reproduce.Budget(device="cuda").rank_key()  # bf16 vs fp16


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0), "epochs=0"),
    (dict(probes=0), "probes=0"),
    (dict(qat_steps=-1), "qat_steps=-1"),
    (dict(dataset="imagenet"), "dataset='imagenet'"),
])
def test_budget_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reproduce.Budget(**kwargs)


def test_half_precision_is_bf16_on_cpu_fp16_on_cuda():
    cpu, cuda = reproduce.Budget(device="cpu"), reproduce.Budget(device="cuda")
    assert reproduce.hessian_options("hessian-half", cpu).dtype == "bf16"
    assert reproduce.hessian_options("hessian-half", cuda).dtype == "fp16"
    fp32 = reproduce.hessian_options("hessian-fp32", cpu)
    assert (fp32.estimator, fp32.dtype, fp32.probes, fp32.batch_size) == ("hutchinson", "fp32", 16, 128)
    ggn = reproduce.hessian_options("ggn-half", cpu)
    assert (ggn.estimator, ggn.dtype, ggn.probes) == ("ggn", "bf16", None)
    assert reproduce.hessian_options("l1", cpu) is None
    removal = reproduce.hessian_options("removal-half", cpu)
    assert (removal.dtype, removal.probes, removal.batch_size) == ("bf16", None, 128)


def test_cifar100_without_data_says_so(tmp_path):
    args = reproduce.parse_args(["--dataset", "cifar100", "--data-root", str(tmp_path)])
    with pytest.raises(reproduce.ReproduceError, match="no CIFAR-100"):
        reproduce.budget_from(args)


@pytest.mark.slow  # the whole quick reproduction on CIFAR, twice (73 s of the default run's 615 s on 2 cores)
def test_quick_run_has_every_row_and_resumes_from_cache(tmp_path):
    argv = [*TINY, "--models", "resnet20", "--targets", "0.5", "--scorers", "hessian-half", "l1",
            "--out", str(tmp_path)]
    rows = reproduce.main(argv)
    assert [(r["scorer"], r["target"]) for r in rows] == [("dense", 1.0), ("hessian-half", 0.5), ("l1", 0.5)]
    dense, *pruned = rows
    assert dense["macs_ratio"] == 1.0 and dense["macs"] == 41_120_394  # ResNet-20, option A (cost pass)
    for r in pruned:
        assert abs(r["macs_ratio"] - 0.5) < 0.01  # round_to=1 meets the target closely
        assert r["params"] < dense["params"]
        _assert_rows_are_the_cached_models(tmp_path, argv, r)
        assert r["int8_b1_ms"] > 0 and r["int8_bytes"] < r["params"] * 4
    assert pruned[0]["hessian_dtype"] == "bf16" and pruned[0]["hessian_probes"] == 2
    assert pruned[0]["hessian_peak_memory"] > pruned[0]["hessian_rss_growth"] > 0
    assert pruned[1]["hessian_dtype"] is None  # L1 control: no Hessian
    saved = json.loads(next(tmp_path.glob("cifar10-*/results-*.json")).read_text())
    assert saved["rows"] == rows
    table = next(tmp_path.glob("cifar10-*/results-*.md")).read_text().splitlines()
    assert len(table) == 2 + len(rows) and "| resnet20 | l1 | 0.5 |" in table[-1]
    # every stage cached: a second run recomputes nothing and gives the same numbers
    done = sorted(tmp_path.rglob("metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    assert reproduce.main(argv) == rows
    assert [p.stat().st_mtime_ns for p in done] == stamps


def _assert_rows_are_the_cached_models(out: Path, argv: list[str], row: dict) -> None:
    """A row's top-1 figures are those of the models its stages cached: the pruned graph rebuilt
    from its plan, the same graph with the fine-tuned weights, and the INT8 ONNX file."""
    args = reproduce.parse_args(argv)
    budget = reproduce.budget_from(args)
    data = reproduce.load_data(budget, args.data_root)
    run = reproduce.Run(row["model"], budget, data, args.data_root, args.weights, out, lambda s: None)
    tests = reproduce.test_loader(data, budget, row["model"])
    gm = run._rebuild(row["scorer"], row["target"])
    assert reproduce.evaluate(gm, tests) == row["pruned"]
    ft = run.ft_dir / f"{row['scorer']}-{row['target']}"
    gm.load_state_dict(torch.load(ft / "ft" / "model.pt"))
    assert reproduce.evaluate(gm, tests) == row["finetuned"]
    assert reproduce.onnx_top1(ft / "int8" / "model_int8.onnx", tests) == row["int8_onnx"]


def test_cached_scores_that_do_not_fit_the_model_are_refused(tmp_path):
    argv = [*TINY, "--models", "resnet20", "--targets", "0.5", "--scorers", "l1",
            "--out", str(tmp_path), "--synthetic"]
    args = reproduce.parse_args(argv)
    budget = reproduce.budget_from(args)
    data = reproduce.load_data(budget, args.data_root)
    run = reproduce.Run("resnet20", budget, data, args.data_root, None, tmp_path, lambda s: None)
    run.dense()
    folder = run.dir / "rank-l1"
    folder.mkdir(parents=True)
    torch.save({0: torch.ones(3)}, folder / "scores.pt")
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(reproduce.ReproduceError, match="do not match"):
        run.prune("l1", 0.5)


@pytest.mark.slow
def test_full_quick_mode(tmp_path):
    rows = reproduce.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    assert len(rows) == 2 * (1 + 3)  # 2 models × (dense + 3 scorers at the quick target 0.5)
    assert [r["model"] for r in rows] == ["resnet32"] * 4 + ["resnet56"] * 4
    assert all(abs(r["macs_ratio"] - 0.5) < 0.01 for r in rows if r["scorer"] != "dense")


def test_agreement_with_fp32_from_cached_scores_and_plans(tmp_path):
    run = reproduce.Run.__new__(reproduce.Run)
    run.dir = tmp_path
    fp32 = {0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([5.0, 6.0])}
    half = {0: torch.tensor([1.0, 2.0, 4.0, 3.0]), 1: torch.tensor([5.0, 6.0])}
    plans = {"hessian-fp32": {"0": [2, 3]}, "hessian-half": {"0": [1, 2]}}  # removes {0,1} vs {0,3}
    for scorer, scores in (("hessian-fp32", fp32), ("hessian-half", half)):
        (tmp_path / f"rank-{scorer}").mkdir()
        torch.save(scores, tmp_path / f"rank-{scorer}" / "scores.pt")
        (tmp_path / f"{scorer}-0.5" / "pruned").mkdir(parents=True)
        (tmp_path / f"{scorer}-0.5" / "pruned" / "plan.json").write_text(json.dumps(plans[scorer]))
    got = run.agreement("hessian-half", 0.5)
    assert got["pruned_jaccard_vs_fp32"] == pytest.approx(1 / 3)  # {0} of {0, 1, 3}
    assert got["spearman_vs_fp32"] == pytest.approx(1 - 6 * 2 / (6 * 35))  # one swapped pair of 6
    assert run.agreement("hessian-half", 0.7) == {}  # no fp32 plan at that target


def test_a_subset_run_adds_its_rows_to_the_saved_table(tmp_path):
    def row(scorer, target, top1):
        return {"model": "resnet56", "scorer": scorer, "target": target, "finetuned": top1}

    path = tmp_path / "results.json"
    first = reproduce.merge_rows(path, [row("dense", 1.0, 86.5), row("l1", 0.5, 81.6)])
    path.write_text(json.dumps({"rows": first}))
    merged = reproduce.merge_rows(path, [row("dense", 1.0, 86.5), row("ggn-fp32", 0.5, 72.9),
                                         row("l1", 0.7, 84.0)])
    assert [(r["scorer"], r["target"]) for r in merged] == [
        ("dense", 1.0), ("l1", 0.7), ("ggn-fp32", 0.5), ("l1", 0.5)]


@pytest.mark.slow  # two timed Hessian runs (11 s alone): the default run is at its 10-minute budget
def test_time_hessian_prints_ratios_to_fp32(tmp_path, capsys):
    argv = [*TINY, "--models", "resnet20", "--scorers", "hessian-fp32", "hessian-half", "l1",
            "--time-hessian", "1", "--out", str(tmp_path)]
    assert reproduce.main(argv) == []
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| hessian")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| hessian-fp32", "| hessian-half"]  # no L1
    assert lines[0].split(" | ")[3] == "1.00"  # the reference's own ratio
    assert len(list(tmp_path.rglob("timing/*/summary.json"))) == 2


@pytest.mark.slow  # four prune/fine-tune rounds (80 s on 2 busy cores)
def test_gradual_pruning_spends_the_same_fine_tune_budget_in_four_shares(tmp_path, monkeypatch):
    steps = []
    finetune = reproduce.finetune

    def counted(model, loader, options, *a, **k):
        result = finetune(model, loader, options, *a, **k)
        steps.append(result.steps)
        return result

    monkeypatch.setattr(reproduce, "finetune", counted)
    argv = [*TINY, "--models", "resnet20", "--targets", "0.5", "--scorers", "l1-gradual", "--epochs", "4", "--max-steps", "8",
            "--synthetic", "--out", str(tmp_path)]
    dense, gradual = reproduce.main(argv)
    assert gradual["scorer"] == "l1-gradual" and abs(gradual["macs_ratio"] - 0.5) < 0.01
    assert steps == [2, 2, 2, 2, 8]  # three shares between the four steps, one after; the dense baseline
    assert list(tmp_path.glob("*/resnet20/ft-*/l1-gradual-0.5/pruned/model.pt"))  # keyed by the budget
