"""Distillation in fine-tuning and QAT: the teacher's soft targets really drive the loss.

    student ──logits/T──▶ log_softmax ─┐
                                       KL · T² · alpha  +  (1 - alpha) · CE(student, y)
    teacher ──logits/T──▶ log_softmax ─┘   (eval mode, no gradient)
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.errors import TrainError
from ehap_fx.train import DistillOptions, FinetuneOptions, Objective, distillation_loss, finetune


def net(seed: int = 0) -> nn.Module:
    """No BatchNorm: train and eval mode compute the same function, so a copy of the student
    is a teacher whose soft targets the student already matches exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def plain(distill=None, **kw) -> FinetuneOptions:
    return FinetuneOptions(epochs=1, lr=0.5, momentum=0.0, nesterov=False, weight_decay=0.0,
                           progress=False, distill=distill, **kw)


def test_loss_is_the_hinton_blend():
    s, t = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.0, 1.0, 3.0]])
    y = torch.tensor([2])
    ce = F.cross_entropy(s, y)
    opts = DistillOptions(alpha=0.3, temperature=2.0)
    p_t, p_s = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    kl = float((p_t * (p_t.log() - p_s.log())).sum())  # KL(p_teacher ‖ p_student), one sample
    expected = 0.7 * float(ce) + 0.3 * 4.0 * kl
    assert math.isclose(float(distillation_loss(s, t, ce, opts)), expected, rel_tol=1e-6)
    assert float(distillation_loss(s, t, ce, DistillOptions(alpha=0.0))) == pytest.approx(float(ce), rel=1e-7)


def test_a_teacher_equal_to_the_student_gives_no_gradient():
    """alpha=1: the loss is KL to the teacher alone, zero with a zero gradient when the teacher
    is the student; SGD without momentum or decay then leaves every weight where it was.
    With alpha=0 the same steps move them (the labels drive the loss): the teacher is in it."""
    student = net()
    teacher = copy.deepcopy(student)
    before = copy.deepcopy(student.state_dict())
    finetune(student, batches(), plain(DistillOptions(alpha=1.0)), teacher=teacher)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    finetune(student, batches(), plain(DistillOptions(alpha=0.0)), teacher=teacher)
    assert any(not torch.allclose(v, before[k]) for k, v in student.state_dict().items())


def test_distillation_pulls_the_student_toward_the_teacher():
    teacher, student = net(0), net(1)
    x = torch.cat([b[0] for b in batches(4, seed=3)])

    def kl() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1),
                                  reduction="batchmean", log_target=True))

    start = kl()
    finetune(student, batches(4, seed=3) * 5, plain(DistillOptions(alpha=1.0, temperature=1.0), max_steps=20),
             teacher=teacher)
    assert kl() < 0.5 * start


def test_teacher_is_left_as_it_was():
    student, teacher = net(0), net(1).train()
    before = copy.deepcopy(teacher.state_dict())
    finetune(student, batches(), plain(DistillOptions()), teacher=teacher)
    assert teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_teacher_in_eval_mode_during_training():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net(1)

        def forward(self, x):
            seen.append(self.training)
            return self.inner(x)

    finetune(net(0), batches(2), plain(DistillOptions()), teacher=Spy().train())
    assert seen == [False, False]


@pytest.mark.parametrize("distill, teacher, match", [
    (DistillOptions(), None, "distillation needs both"),
    (None, "net", "distillation needs both"),
])
def test_distill_and_teacher_come_together(distill, teacher, match):
    with pytest.raises(TrainError, match=match):
        finetune(net(), batches(), plain(distill), teacher=net(1) if teacher else None)


def test_teacher_with_other_classes_is_refused():
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 7))
    with pytest.raises(TrainError, match=r"teacher's output \(8, 7\) does not match the student's \(8, 5\)"):
        finetune(net(), batches(), plain(DistillOptions()), teacher=other)


@pytest.mark.parametrize("kw, match", [({"alpha": -0.1}, "alpha=-0.1"), ({"temperature": 0.0}, "temperature=0.0")])
def test_options_name_the_bad_value(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillOptions(**kw)


def test_objective_without_distill_is_cross_entropy():
    logits, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with Objective(plain(label_smoothing=0.1)) as objective:
        torch.testing.assert_close(objective(logits, None, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_compress_distils_from_the_dense_model_finetuned_with_the_same_budget():
    """``DistillOptions.teacher="finetuned"`` (the default): the teacher is the dense model
    fine-tuned first with the student's budget from the labels alone, and its top-1 is reported
    as the baseline; ``"given"`` distils from the model as given and fine-tunes no teacher."""
    from ehap_fx import Target, compress
    from ehap_fx.train import evaluate

    g = torch.Generator().manual_seed(2)
    proj = torch.randn(3, 5, generator=g)
    xs = [torch.randn(16, 3, 6, 6, generator=g) for _ in range(4)]
    data = [(x, (x.mean((2, 3)) @ proj).argmax(1)) for x in xs]  # learnable labels
    model, x = net(), torch.randn(1, 3, 6, 6)
    ft = FinetuneOptions(epochs=5, lr=0.2, progress=False)
    kw = dict(data=data, eval_data=data, scorer="l1", target=Target(macs=0.8, round_to=1))
    res = compress(model, x, finetune_options=replace(ft, distill=DistillOptions()), **kw)
    want = copy.deepcopy(model)
    finetune(want, data, ft)
    acc = res.report.accuracy
    assert acc["dense_finetuned"] == evaluate(want, data) > acc["dense"]  # the teacher trained first
    assert "teacher_finetune" in res.report.seconds
    given = compress(model, x, finetune_options=replace(ft, distill=DistillOptions(teacher="given")), **kw)
    assert "dense_finetuned" not in given.report.accuracy and "teacher_finetune" not in given.report.seconds


@pytest.mark.parametrize("start", ["teacher", "given"])
def test_compress_prunes_the_finetuned_teacher_unless_told_otherwise(monkeypatch, start):
    """``DistillOptions.start="teacher"`` (the default): the graph ranked, shrunk and repaired
    toward is the fine-tuned teacher; the pruned model before its own fine-tune is exactly the
    teacher shrunk by the plan. ``"given"``: the dense model as given, as before."""
    from ehap_fx.passes.capture import capture_groups
    from ehap_fx.passes.shrink import shrink

    from ehap_fx import Target, compress, steps

    seen = {}
    prune_to_target, repair = steps.prune_to_target, steps.repair

    def watched_prune(gm, *args, **kw):
        seen["source"] = {k: v.clone() for k, v in gm.state_dict().items()}
        shrunk = prune_to_target(gm, *args, **kw)
        seen["plans"] = [s.plan for s in shrunk.pruned.steps]
        seen["pruned"] = {k: v.clone() for k, v in shrunk.graph_module.state_dict().items()}
        return shrunk

    def watched_repair(gm, dense, *args, **kw):
        seen["reference"] = None if dense is None else {k: v.clone() for k, v in dense.state_dict().items()}
        return repair(gm, dense, *args, **kw)

    monkeypatch.setattr(steps, "prune_to_target", watched_prune)
    monkeypatch.setattr(steps, "repair", watched_repair)
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(3, 5, generator=g)
    xs = [torch.randn(16, 3, 6, 6, generator=g) for _ in range(4)]
    data = [(x, (x.mean((2, 3)) @ proj).argmax(1)) for x in xs]
    model, x = net(), torch.randn(1, 3, 6, 6)
    ft = FinetuneOptions(epochs=3, lr=0.2, progress=False, distill=DistillOptions(start=start))
    res = compress(model, x, data=data, scorer="l1", target=Target(macs=0.6, round_to=1), finetune_options=ft)
    teacher = res.teacher.state_dict()
    origin = teacher if start == "teacher" else model.state_dict()
    assert not all(torch.equal(teacher[k], v) for k, v in model.state_dict().items())  # the teacher moved
    for state in (seen["source"], seen["reference"]):
        assert state.keys() == origin.keys() and all(torch.equal(state[k], origin[k]) for k in origin)
    expected = res.teacher if start == "teacher" else model
    gm = capture_groups(copy.deepcopy(expected).eval(), x)
    for plan in seen["plans"]:
        gm = shrink(gm, plan).graph_module
    assert all(torch.equal(seen["pruned"][k], v) for k, v in gm.state_dict().items())
    assert res.report.target["pruned_from"] == ("dense_finetuned" if start == "teacher" else "dense")


def test_distill_options_refuse_an_unknown_start():
    with pytest.raises(ValueError, match="start='dense'"):
        DistillOptions(start="dense")
