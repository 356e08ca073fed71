"""Two CPU processes (gloo on 127.0.0.1) against the single-process reference.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every distributed case and saves what
each rank got; the tests compare the ranks with each other and with ``estimate_hessian``
run here, in one process, over the same probes and the same Hessian samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nets import TinyOptionA, randomize_bn

from ehap_fx.data import synthetic_cifar
from ehap_fx.distributed import _BatchShard, shard_loader
from ehap_fx.process_group import is_distributed
from ehap_fx.scoring.distributed import (
    SEED_STRIDE,
    estimate_hessian_distributed,
    estimate_removal_distributed,
)
from ehap_fx.scoring.hessian import estimate_hessian
from ehap_fx.scoring.options import HessianOptions

WORLD = 2
HUTCH = HessianOptions(estimator="hutchinson", dtype="fp32", batch_size=32, n_batches=1,
                       probes=6, progress=False)
CASES = {  # name: (options, shard)
    "probes": (dataclasses.replace(HUTCH, probes=5), "probes"),  # odd: rank 0 draws 3, rank 1 2
    "data_batches": (dataclasses.replace(HUTCH, batch_size=16, n_batches=2, probes=4), "data"),
    "data_split": (dataclasses.replace(HUTCH, probes=1), "data"),  # one probe: no standard error
    "ggn": (dataclasses.replace(HUTCH, estimator="ggn", probes=None), "auto"),
    "ggn_uneven": (dataclasses.replace(HUTCH, estimator="ggn", probes=None, batch_size=31), "auto"),
    "hybrid": (dataclasses.replace(HUTCH, estimator="hybrid", probes=2), "data"),
    "adaptive": (dataclasses.replace(HUTCH, probes=None, min_probes=4, check_every=4,
                                     max_probes=16, tol=0.3, rank_threshold=None), "probes"),
    # a fixed count past max_probes: converged, as in one process (the rule caps adaptive rounds only)
    "mc": (dataclasses.replace(HUTCH, estimator="mc", probes=None, mc_samples=3, min_probes=1, max_probes=2), "auto"),
    "mc_uneven": (dataclasses.replace(HUTCH, estimator="mc", probes=None, batch_size=31), "auto"),
    "mc_adaptive": (dataclasses.replace(HUTCH, estimator="mc", probes=None, mc_samples=None,
                                        min_probes=4, check_every=4, max_probes=12, tol=0.3,
                                        rank_threshold=None), "auto"),
}
REMOVAL = {  # the removal criterion, exact and MC
    "removal": dataclasses.replace(HUTCH, estimator="ggn", probes=None),
    "removal_mc": dataclasses.replace(HUTCH, estimator="mc", probes=None, mc_samples=3),
}
SEEN: list[int] = []  # samples per forward of more than one sample, on this process


def _count(module, args, output):
    if args[0].shape[0] > 1:
        SEEN.append(args[0].shape[0])


def _grouped_model():
    from ehap_fx.passes.group import group_channels, groups_of
    from ehap_fx.passes.trace import trace

    gm = group_channels(trace(_model(), torch.zeros(1, 3, 32, 32))).graph_module
    return gm, groups_of(gm).prunable


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyOptionA(), seed=0)


def _data():
    return synthetic_cifar(64, seed=0)


def _hessian_batch():
    return next(iter(_data().loader(64)))  # (x (64, 3, 32, 32), y (64,))


def _compress(model):
    from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions

    from ehap_fx import Target, compress
    from ehap_fx.train import FinetuneOptions

    loader = _data().loader(16, shuffle=True, augment=True, seed=1)
    target = Target(macs=0.6, round_to=1, steps=2)  # fine-tunes between the two steps
    return compress(model, torch.randn(1, 3, 32, 32), data=loader, target=target, scorer="hessian",
                    hessian=dataclasses.replace(CASES["adaptive"][0], max_probes=8, rank_threshold=0.9),
                    finetune_options=FinetuneOptions(max_steps=3, lr=0.05, progress=False),
                    quantize=QuantizeOptions(mode="qat", backend="fx", finetune=dataclasses.replace(QAT_FINETUNE, max_steps=2)))


def _tiny(seed: int = 0) -> torch.nn.Module:
    """No BatchNorm: a DDP step is then exactly a step on the ranks' batches joined."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10))


def _train_loader():
    return _data().loader(8, shuffle=True, augment=True, seed=2)


FT = dict(max_steps=3, lr=0.1, progress=False)


def _distill_ft():
    from ehap_fx.train import DistillOptions, FinetuneOptions

    return FinetuneOptions(**FT, distill=DistillOptions(alpha=0.5, temperature=2.0))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        got = {}
        for name, (opts, shard) in CASES.items():
            model = _model()
            model.conv1.register_forward_hook(_count)  # the copies the estimate runs share it
            SEEN.clear()
            wall = time.perf_counter()
            r = estimate_hessian_distributed(model, _hessian_batch(), opts, shard=shard)
            wall = time.perf_counter() - wall
            got[name] = {"seconds": r.seconds, "wall": wall, "peak": r.peak_memory, "rows": r.probe_traces, "traces": r.traces, "stderr": r.stderr, "probes": r.probes,
                         "converged": r.converged, "history": r.history, "ggn": r.ggn, "seen": list(SEEN), "choice": r.choice}
        for name, opts in REMOVAL.items():
            gm, groups = _grouped_model()
            gm.conv1.register_forward_hook(_count)
            SEEN.clear()
            wall = time.perf_counter()
            r = estimate_removal_distributed(gm, _hessian_batch(), groups, opts)
            wall = time.perf_counter() - wall
            got[name] = {"seconds": r.seconds, "wall": wall, "peak": r.peak_memory, "joint": r.joint, "method": r.method, "seen": list(SEEN)}
        model = _model()
        result = _compress(model)
        got["pruned"] = {k: v.clone() for k, v in result.pruned.state_dict().items()}
        got["int8"] = {k: v for k, v in result.quantized.state_dict().items()
                       if torch.is_tensor(v)}
        got["widths"] = result.report.channels_after
        got["check"] = result.report.quantize["check"]
        got["ranking_probes"] = [step["probes"] for step in result.report.ranking]
        got["finetune_losses"] = result.report.finetune["losses"]
        got["dense"] = {k: v.clone() for k, v in model.state_dict().items()}
        ids = torch.utils.data.TensorDataset(torch.arange(20), torch.zeros(20))
        sharded = shard_loader(torch.utils.data.DataLoader(ids, batch_size=4, shuffle=True))
        got["sampler"] = [torch.cat([i for i, _ in sharded]) for _ in range(2)]  # 2 epochs
        tiny = _tiny()
        from ehap_fx.train import FinetuneOptions, finetune

        got["ddp_losses"] = finetune(tiny, shard_loader(_train_loader()), FinetuneOptions(**FT)).losses
        got["ddp"] = {k: v.clone() for k, v in tiny.state_dict().items()}
        tiny = _tiny()
        got["ddp_distill_losses"] = finetune(tiny, shard_loader(_train_loader()), _distill_ft(),
                                             teacher=_tiny(seed=1)).losses
        got["ddp_distill"] = {k: v.clone() for k, v in tiny.state_dict().items()}
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _flat(traces: dict) -> torch.Tensor:
    return torch.cat(list(traces.values()))


def _close(a, b):  # fp32 rounding: sums over the batch in another order
    torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5 * float(b.abs().max()))


def test_ranks_return_the_same_estimate_bit_for_bit(ranks):
    for name in CASES:
        assert torch.equal(ranks[0][name]["rows"], ranks[1][name]["rows"]), name
        assert repr(ranks[0][name]["history"]) == repr(ranks[1][name]["history"]), name  # nan


def test_ranks_report_the_highest_peak_of_any_rank_and_time_their_own_call(ranks):
    """Every rank reports the same peak memory (the maximum over the ranks: their own peaks
    differ), and seconds between 0 and the call's wall time on that rank."""
    for name in [*CASES, *REMOVAL]:
        assert ranks[0][name]["peak"] == ranks[1][name]["peak"] > 0, name
        for r in ranks:
            assert 0 < r[name]["seconds"] <= r[name]["wall"], name


def test_probe_shards_equal_one_process_over_the_same_probes(ranks):
    opts, _ = CASES["probes"]
    x, y = _hessian_batch()
    parts = [estimate_hessian(_model(), (x, y), dataclasses.replace(opts, probes=n, seed=s))
             for n, s in ((3, 0), (2, SEED_STRIDE))]  # rank 0: chunk 0, rank 1: chunk 1
    rows = torch.cat([p.probe_traces for p in parts])
    assert ranks[0]["probes"]["probes"] == 5
    _close(ranks[0]["probes"]["rows"], rows)
    _close(_flat(ranks[0]["probes"]["traces"]), rows.mean(0))


@pytest.mark.parametrize("name", ["data_batches", "data_split", "ggn", "ggn_uneven", "hybrid",
                                  "mc", "mc_uneven", "mc_adaptive"])
def test_data_shards_equal_one_process_over_the_whole_batch(ranks, name):
    opts, _ = CASES[name]
    ref = estimate_hessian(_model(), _hessian_batch(), opts)
    assert (ranks[0][name]["probes"], ranks[0][name]["converged"]) == (ref.probes, ref.converged)
    _close(ranks[0][name]["rows"], ref.probe_traces)
    _close(_flat(ranks[0][name]["traces"]), _flat(ref.traces))
    _close(_flat(ranks[0][name]["stderr"]), _flat(ref.stderr))  # zeros for one probe, not NaN
    if ref.ggn is not None:  # the exact GGN part (ggn, hybrid): the whole batch's, not one shard's
        _close(_flat(ranks[0][name]["ggn"]), _flat(ref.ggn))


def test_mc_ranks_draw_only_their_share_of_the_samples(ranks):
    # batch 32 (31): rank 0 forwards 16 samples, rank 1 16 (15), once per round of draws
    for r, (even, uneven) in enumerate([(16, 16), (16, 15)]):
        assert ranks[r]["mc"]["seen"] == [even]
        assert ranks[r]["mc_uneven"]["seen"] == [uneven]
        assert ranks[r]["removal_mc"]["seen"] == [even]
        assert ranks[r]["mc_adaptive"]["seen"] == [even] * len(ranks[0]["mc_adaptive"]["history"])
    assert ranks[0]["mc"]["choice"].endswith("(rank 0 of 2)")


@pytest.mark.parametrize("name", list(REMOVAL))
def test_removal_splits_over_the_ranks_and_equals_one_process(ranks, name):
    from ehap_fx.scoring.removal import estimate_removal

    gm, groups = _grouped_model()
    ref = estimate_removal(gm, _hessian_batch(), groups, REMOVAL[name])
    a, b = ranks[0][name], ranks[1][name]
    assert a["method"] == ref.method == ("mc" if name == "removal_mc" else "exact")
    for g in groups:
        assert torch.equal(a["joint"][g.id], b["joint"][g.id])
        _close(a["joint"][g.id], ref.joint[g.id])


def test_adaptive_rounds_stop_together_on_the_combined_estimate(ranks):
    got = ranks[0]["adaptive"]
    n = [h[0] for h in got["history"]]
    assert n == list(range(4, got["probes"] + 1, 4)) and 8 <= got["probes"] <= 16
    assert got["rows"].shape[0] == got["probes"]
    x, y = _hessian_batch()
    opts = CASES["adaptive"][0]
    first = [estimate_hessian(_model(), (x, y), dataclasses.replace(opts, probes=2, seed=s))
             for s in (0, SEED_STRIDE)]  # round 0 of 2 ranks
    _close(got["rows"][:4], torch.cat([f.probe_traces for f in first]))
    second = [estimate_hessian(_model(), (x, y), dataclasses.replace(opts, probes=2, seed=s * SEED_STRIDE))
              for s in (2, 3)]  # round 1: chunks round * world + rank = 2, 3
    _close(got["rows"][4:8], torch.cat([f.probe_traces for f in second]))


def test_ranks_end_with_the_same_pruned_and_int8_models(ranks):
    a, b = ranks
    assert a["widths"] == b["widths"]
    assert a["ranking_probes"] == b["ranking_probes"]  # adaptive, stopped on group scores
    assert len(a["ranking_probes"]) == 2 and all(4 <= n <= 8 for n in a["ranking_probes"])
    assert sum(a["widths"].values()) < sum(conv for conv in _dense_widths().values())
    # QAT vs PTQ: the same held-out images on both ranks (a tenth of 64: 6), the same choice
    assert a["check"] == b["check"] and a["check"]["images"] == 6
    assert a["pruned"].keys() == b["pruned"].keys()
    for k in a["pruned"]:
        assert torch.equal(a["pruned"][k], b["pruned"][k]), k
    for k in a["int8"]:
        assert torch.equal(a["int8"][k], b["int8"][k]), k
    assert a["finetune_losses"] == b["finetune_losses"]  # averaged over the ranks
    assert len(a["finetune_losses"]) == 2  # ceil(64 / 2 ranks / 16): one epoch of a shard


def test_ddp_steps_equal_one_process_on_the_joined_batches(ranks):
    from ehap_fx.train import FinetuneOptions, finetune

    shards = [_train_loader().sharded(r, WORLD) for r in range(WORLD)]
    joined = [(torch.cat([x for x, _ in bs]), torch.cat([y for _, y in bs])) for bs in zip(*shards)]
    tiny = _tiny()
    result = finetune(tiny, joined, FinetuneOptions(**FT))  # 16 images a step, as 2 ranks x 8
    assert len(joined) == 4 and result.steps == 3
    for k, v in tiny.state_dict().items():
        _close(ranks[0]["ddp"][k], v)
        assert torch.equal(ranks[0]["ddp"][k], ranks[1]["ddp"][k])
    torch.testing.assert_close(torch.tensor(ranks[0]["ddp_losses"]), torch.tensor(result.losses))
    assert (tiny[0].weight - _tiny()[0].weight).abs().max() > 1e-3  # it trained


def test_ddp_distillation_equals_one_process_on_the_joined_batches(ranks):
    """Each rank's teacher sees its own shard; the per-rank losses average, as the joined batch's."""
    from ehap_fx.train import finetune

    shards = [_train_loader().sharded(r, WORLD) for r in range(WORLD)]
    joined = [(torch.cat([x for x, _ in bs]), torch.cat([y for _, y in bs])) for bs in zip(*shards)]
    tiny = _tiny()
    result = finetune(tiny, joined, _distill_ft(), teacher=_tiny(seed=1))
    for k, v in tiny.state_dict().items():
        _close(ranks[0]["ddp_distill"][k], v)
        assert torch.equal(ranks[0]["ddp_distill"][k], ranks[1]["ddp_distill"][k])
    torch.testing.assert_close(torch.tensor(ranks[0]["ddp_distill_losses"]), torch.tensor(result.losses))
    plain = _tiny()
    finetune(plain, joined, __import__("ehap_fx.train", fromlist=["FinetuneOptions"]).FinetuneOptions(**FT))
    assert (plain[0].weight - tiny[0].weight).abs().max() > 1e-4  # the teacher changed the steps


def _dense_widths():
    from ehap_fx.passes.cost import conv_widths

    return conv_widths(_model())


def test_cifar_shards_partition_an_epoch():
    loader = _data().loader(10, shuffle=True, seed=3)
    shards = [loader.sharded(r, 3) for r in range(3)]
    seen = [torch.cat([x for x, _ in s]) for s in shards]
    assert [len(s) for s in shards] == [3, 3, 3]  # ceil(ceil(64 / 3) / 10)
    assert [t.shape[0] for t in seen] == [22, 22, 22]  # 66 = 64 + 2 wrapped around
    whole = torch.cat(seen)
    full = torch.cat([x for x, _ in _data().loader(64)])
    assert torch.unique(whole, dim=0).shape[0] == 64 == torch.unique(full, dim=0).shape[0]


def test_dataloader_shards_partition_every_epoch(ranks):
    epochs = [torch.cat([r["sampler"][e] for r in ranks]) for e in range(2)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(20))  # 10 per rank, disjoint
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled: set_epoch at every iter()


def test_batch_shards_have_equal_lengths():
    batches = [(torch.full((1,), float(i)), torch.zeros(1)) for i in range(5)]
    got = [[int(x) for x, _ in _BatchShard(batches, r, 2)] for r in range(2)]
    assert got == [[0, 2, 4], [1, 3, 1]]


def test_round_statistics_sum_the_retries_and_keep_the_lowest_scale_and_highest_peak():
    """Over rounds and ranks: retries add up, the loss scale is the lowest any of them ended at
    (kept negated, so that one MAX reduces both), the peak memory the highest."""
    from types import SimpleNamespace as Result

    from ehap_fx.scoring.distributed import _accumulate, _stats

    first = _stats(Result(retries=2, loss_scale=8.0, peak_memory=100))
    assert first.tolist() == [2.0, -8.0, 100.0] and first.dtype == torch.float64
    second = _stats(Result(retries=3, loss_scale=4.0, peak_memory=50))
    assert _accumulate(first, second).tolist() == [5.0, -4.0, 100.0]
    assert _accumulate(second, first).tolist() == [5.0, -4.0, 100.0]


def test_rank_0_chooses_with_the_budget_fraction_shared_by_the_machines_ranks(monkeypatch):
    """``LOCAL_WORLD_SIZE`` ranks on one machine share its memory: a fraction of it (at most 1)
    is divided among them, a byte count is each rank's; the plan's estimator replaces ``"auto"``
    and its reason says it was rank 0's. An estimate error is raised, not broadcast as a plan."""
    from ehap_fx.errors import MemoryBudgetError
    from ehap_fx.scoring.distributed import _agreed
    from ehap_fx.scoring.plan import Plan

    seen = []

    def choose(o):
        seen.append(o.memory_budget)
        return Plan("mc", 8, 4, 10, 20, "why")

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    opts, reason = _agreed(HessianOptions(memory_budget=1.0), choose)
    assert (opts.estimator, opts.memory_budget, reason) == ("mc", 0.25, "why (rank 0 of 1)")
    _agreed(HessianOptions(memory_budget=0.5), choose)
    _agreed(HessianOptions(memory_budget=2.0**30), choose)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")  # nonsense: taken as one rank
    _agreed(HessianOptions(memory_budget=0.5), choose)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # the world size then: 1 here
    _agreed(HessianOptions(memory_budget=0.5), choose)
    assert seen == [0.25, 0.125, 2.0**30, 0.5, 0.5]

    def refuse(o):
        raise MemoryBudgetError("too small")

    with pytest.raises(MemoryBudgetError, match="too small"):
        _agreed(HessianOptions(), refuse)


@pytest.mark.parametrize(("n_batches", "batch_size", "rank", "want", "local", "weight"), [
    (4, 3, 1, [3, 4, 5, 9, 10, 11], (3, 2), 0.5),  # whole batches 1 and 3 of 4: n_batches divides by 2
    (1, 5, 0, [0, 1, 2], (3, 1), 0.6),  # a slice of the one batch: 3 of 5 to rank 0 ...
    (1, 5, 1, [3, 4], (2, 1), 0.4),  # ... 2 of 5 to rank 1
    (3, 2, 1, [1, 3, 5], (1, 3), 0.5),  # 3 batches of 2 over 2 ranks: one sample of each batch
])
def test_a_data_shard_is_whole_batches_or_a_slice_of_each(monkeypatch, n_batches, batch_size, rank, want, local,
                                                          weight):
    from ehap_fx.scoring import distributed

    monkeypatch.setattr(distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    x = torch.arange(n_batches * batch_size)
    opts = HessianOptions(batch_size=batch_size, n_batches=n_batches, data_seed=0)
    batches = distributed.draw_batches((x, x), batch_size, n_batches, 0)
    order = torch.cat([b for b, _ in batches]).tolist()  # drawn order: sample i of batch j
    (lx, ly), opts_here, w = distributed._local_data((x, x), opts, "data")
    assert lx.tolist() == [order[i] for i in want] and torch.equal(lx, ly) and w == weight
    assert (opts_here.batch_size, opts_here.n_batches) == local
    (px, _), same, one = distributed._local_data((x, x), opts, "probes")
    assert px.tolist() == order and same == opts and one == 1.0


def test_a_data_shard_needs_a_sample_per_rank(monkeypatch):
    from ehap_fx.errors import HessianError
    from ehap_fx.scoring import distributed

    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    x = torch.arange(3)
    with pytest.raises(HessianError, match="batch_size=1 < 2 ranks"):
        distributed._local_data((x, x), HessianOptions(batch_size=1, n_batches=3), "data")


def test_single_process_is_the_plain_estimate():
    assert not is_distributed()
    x, y = _hessian_batch()
    a = estimate_hessian_distributed(_model(), (x, y), CASES["probes"][0])
    b = estimate_hessian(_model(), (x, y), CASES["probes"][0])
    assert torch.equal(a.probe_traces, b.probe_traces)
    loader = _data().loader(16)
    assert shard_loader(loader) is loader


@pytest.mark.slow
def test_ehap_compress_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m ehap_fx compress`: one output folder, from rank 0."""
    out = tmp_path / "out"
    flags = ["--synthetic", "--model", "resnet20", "--hessian-batch", "16", "--probes", "2", "--limit-train", "64",
             "--limit-test", "64", "--batch-size", "16", "--finetune-epochs", "1", "--finetune-steps", "100",
             "--qat-steps", "1",
             "--quiet", "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ehap_fx", "compress", *flags]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps"] == 2  # one epoch of 64 images / 2 ranks / batch 16
    assert report["ranking"][0]["probes"] == 2  # one probe per rank, combined
    assert (out / "model_int8.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no second folder, no leftovers
    assert proc.stdout.count("outputs in") == 1


@pytest.mark.parametrize("name", ["probes", "mc"])
def test_a_round_asks_each_estimator_for_its_own_count(name):
    """A round's ``run(k, seed)`` draws ``k`` probes of Hutchinson (``probes``) and ``k`` label
    samples of MC (``mc_samples``), whatever the options held: the other field would leave the
    round at the options' count (Hutchinson's 6 probes, MC's 3 samples)."""
    from ehap_fx.scoring.distributed import _runner

    opts = CASES[name][0]
    res = _runner(_model(), _hessian_batch(), opts, {})(2, opts.seed)
    assert res.probes == 2 and res.probe_traces.shape[0] == 2
