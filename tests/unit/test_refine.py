"""Refinement (prunecomp.method.refine): the distillation loss against its formula, exact folding of the fitted gains on
every family, reproducibility, and the loop / error wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, gemma2_model, tiny_model, tokens
from torch.testing import assert_close

from prunecomp.config import PruneConfig
from prunecomp.engine.compress import compress
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.errors import PrunecompError
from prunecomp.method.refine import (
    TeacherTargets,
    audit_rows,
    distill_loss,
    fold_gains,
    gains,
    gains_applied,
    refine,
    teacher_targets,
)
from prunecomp.models.pruning import remove_layer


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_distill_loss_matches_cross_entropy_formula() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    top = torch.log_softmax(t, -1).topk(11, -1)  # full support: the plain soft-label cross-entropy
    expected = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    assert_close(distill_loss(s, top.values, top.indices), expected)
    # the teacher itself is the minimiser: KL = loss - entropy >= 0 with equality at the teacher
    entropy = -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1).mean()
    assert_close(distill_loss(t, top.values, top.indices), entropy)
    assert distill_loss(s, top.values, top.indices) > entropy
    assert_close(distill_loss(s, top.values, top.indices, loss="topk"), expected)  # full support: the same
    # topk (the older loss): renormalised over the k most likely tokens
    k3 = torch.log_softmax(t, -1).topk(3, -1)
    p = torch.softmax(k3.values, -1)
    manual = -(p * torch.log_softmax(s, -1).gather(-1, k3.indices)).sum(-1).mean()
    assert_close(distill_loss(s, k3.values, k3.indices, loss="topk"), manual)


def test_tail_loss_is_the_kl_over_top_k_and_one_bucket() -> None:
    torch.manual_seed(1)
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3
    k3 = torch.log_softmax(t, -1).topk(3, -1)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    p_top, q_top = p.gather(-1, k3.indices), q.gather(-1, k3.indices)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    manual = -((p_top * q_top.log()).sum(-1) + p_tail * q_tail.log()).mean()
    assert_close(distill_loss(s, k3.values, k3.indices), manual)
    # the teacher minimises it; topk's minimiser (all mass on the k tokens) does not: it is overconfident
    entropy = -((p_top * p_top.log()).sum(-1) + p_tail * p_tail.log()).mean()
    assert_close(distill_loss(t, k3.values, k3.indices), entropy)
    assert distill_loss(s, k3.values, k3.indices) > entropy
    overconfident = torch.full_like(t, -30.0).scatter(-1, k3.indices, k3.values)
    assert distill_loss(overconfident, k3.values, k3.indices, loss="topk") < distill_loss(t, k3.values, k3.indices,
                                                                                           loss="topk") + 1e-6
    assert distill_loss(overconfident, k3.values, k3.indices) > distill_loss(t, k3.values, k3.indices) + 1.0
    # exact where the student's tail is far below float32's resolution of 1 - sum(top-k)
    far = t.clone().scatter(-1, k3.indices, k3.values + 40.0).double()
    logz = torch.logsumexp(far, -1)
    q_far_tail = torch.logsumexp(far.scatter(-1, k3.indices, float("-inf")), -1) - logz
    expected = -((p_top * (far.gather(-1, k3.indices) - logz[..., None])).sum(-1) + p_tail * q_far_tail).mean()
    assert_close(distill_loss(far, k3.values, k3.indices).double(), expected, rtol=1e-5, atol=1e-5)
    # gradients are finite, with and without a tail
    for top in (k3, torch.log_softmax(t, -1).topk(11, -1)):
        x = s.clone().requires_grad_(True)
        distill_loss(x, top.values, top.indices).backward()
        assert torch.isfinite(x.grad).all()
    with pytest.raises(PrunecompError, match="refine loss"):
        distill_loss(s, k3.values, k3.indices, loss="kl")


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2"])
@pytest.mark.parametrize("mode", ["norms", "norms+writers", "channels"])
def test_folded_gains_equal_hooked_gains(family: str, mode: str) -> None:
    model = gemma2_model() if family == "gemma2" else tiny_model(family)
    remove_layer(model, 2)
    items = gains(model, mode)
    gen = torch.Generator().manual_seed(3)
    for g in items:
        with torch.no_grad():
            g.value.copy_(1 + 0.3 * torch.randn(g.value.shape, generator=gen))
    ids = tokens()
    with gains_applied(items):
        hooked = _logits(model, ids)
    plain = _logits(model, ids)
    assert (hooked - plain).abs().max() > 1e-3  # the gains do change the model
    names = {n: p.shape for n, p in model.named_parameters()}
    fold_gains(items)
    assert {n: p.shape for n, p in model.named_parameters()} == names  # a plain model, nothing added
    assert_close(_logits(model, ids), hooked, atol=1e-4, rtol=1e-4)  # float rounding of (1+w)*g-1


def test_norms_writers_adds_writer_gains_only_for_pre_norm_families() -> None:
    llama = gains(tiny_model("llama"), "norms+writers")
    assert {g.kind for g in llama} == {"norm", "linear"}
    gemma = gains(gemma2_model(), "norms+writers")
    assert {g.kind for g in gemma} == {"norm"}  # sandwich-norm writers are norms, fitted already
    assert len(gemma) == len(gains(gemma2_model(), "norms"))
    with pytest.raises(PrunecompError, match="refine mode"):
        gains(tiny_model("llama"), "everything")


def test_refine_lowers_the_calibration_loss_and_is_reproducible() -> None:
    dense = tiny_model("llama")
    ids = tokens(n=4, t=16)
    targets = teacher_targets(dense, ids, topk=16)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(dense)
        remove_layer(m, 2)
        seen: list[int] = []
        rep = refine(m, ids, targets, mode="norms+writers", steps=20, lr=2e-2, batch_size=2, seed=5,
                     on_step=seen.append)
        assert seen == list(range(1, 21))
        runs.append((m, rep))
    (m1, r1), (m2, r2) = runs
    assert r1.loss_after < r1.loss_before and r2.losses == r1.losses
    assert r1.parameters == sum(g.value.numel() for g in gains(m1, "norms+writers"))
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(p.requires_grad for p in m1.parameters())  # the caller's flags are restored


def test_audit_rows_spread_over_the_windows() -> None:
    assert audit_rows(128, 16).tolist() == list(range(0, 128, 8))
    assert audit_rows(10, 4).tolist() == [0, 2, 5, 7]
    assert audit_rows(3, 16).tolist() == [0, 1, 2] and audit_rows(5, None).tolist() == [0, 1, 2, 3, 4]


def test_refine_audit_windows_change_the_report_not_the_fit() -> None:
    """``eval_windows`` only decides where loss_before/loss_after are measured: the fit (its losses and the folded
    weights) is the same bit for bit, and the reported loss is the mean of distill_loss over exactly those
    windows, before the fit (the gains at 1) and after the fold."""
    dense = tiny_model("llama")
    ids = tokens(n=6, t=16)
    targets = teacher_targets(dense, ids, topk=16)
    pruned = copy.deepcopy(dense)
    remove_layer(pruned, 2)
    runs = {}
    for limit in (None, 2):
        m = copy.deepcopy(pruned)
        runs[limit] = (m, refine(m, ids, targets, mode="channels", steps=6, lr=2e-2, batch_size=2,
                                 eval_windows=limit))
    (m_all, r_all), (m_two, r_two) = runs[None], runs[2]
    assert r_all.losses == r_two.losses and (r_all.loss_windows, r_two.loss_windows) == (6, 2)
    for a, b in zip(m_all.state_dict().values(), m_two.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rows = [0, 3]

    def by_hand(model: torch.nn.Module) -> torch.Tensor:
        return torch.stack([distill_loss(_logits(model, ids[[r]]), targets.logprobs[[r]], targets.indices[[r]])
                            for r in rows]).mean()

    assert_close(torch.tensor(r_two.loss_before), by_hand(pruned), rtol=1e-5, atol=1e-6)
    assert_close(torch.tensor(r_two.loss_after), by_hand(m_two), rtol=1e-5, atol=1e-6)
    assert r_two.loss_before != r_all.loss_before  # a different set of windows, so a different number
    with pytest.raises(PrunecompError, match="eval_windows"):
        refine(copy.deepcopy(pruned), ids, targets, eval_windows=0)


def test_refine_rejects_targets_of_other_windows() -> None:
    model = tiny_model("llama")
    targets = TeacherTargets(torch.zeros(2, 8, 4), torch.zeros(2, 8, 4, dtype=torch.long))
    with pytest.raises(PrunecompError, match="do not match the calibration windows"):
        refine(model, tokens(n=3, t=8), targets)


def test_compress_refines_after_the_last_removal() -> None:
    model = tiny_model("llama")
    ids = tokens(n=4, t=16)
    cfg = PruneConfig(n_layers=2, refine="norms", refine_steps=10, refine_lr=2e-2, refine_topk=8)
    plain = copy.deepcopy(model)
    base = compress(plain, ids, cfg.model_copy(update={"refine": "none"}), batch_size=2)
    report = compress(model, ids, cfg, batch_size=2)
    assert report.removed == base.removed  # refinement does not change the pruning decisions
    assert report.refine is not None and report.refine["mode"] == "norms"
    assert report.refine["loss_after"] < report.refine["loss_before"]
    assert base.refine is None
    assert "refine" in report.to_dict()


def test_compress_fits_with_the_configured_loss() -> None:
    """``refine_loss`` reaches the fit: compress() with topk equals refine(..., loss="topk") by hand, bit for bit,
    and differs from the default tail fit."""
    ids = tokens(n=4, t=16)
    cfg = PruneConfig(n_layers=1, refine="norms", refine_steps=6, refine_lr=2e-2, refine_topk=8, refine_loss="topk")
    dense = tiny_model("llama")
    targets = teacher_targets(dense, ids, topk=8, batch_size=2)
    by_hand = copy.deepcopy(dense)
    prune_and_compensate(by_hand, ids, cfg, batch_size=2)
    rep = refine(by_hand, ids, targets, mode="norms", steps=6, lr=2e-2, batch_size=2, loss="topk")
    fitted = {}
    for loss in ("topk", "tail"):
        m = copy.deepcopy(dense)
        report = compress(m, ids, cfg.model_copy(update={"refine_loss": loss}), batch_size=2)
        assert report.refine is not None and report.refine["loss"] == loss
        fitted[loss] = m
    assert rep.loss == "topk"
    for (name, x), (_, y) in zip(by_hand.state_dict().items(), fitted["topk"].state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, y) for x, y in zip(fitted["topk"].state_dict().values(),
                                                     fitted["tail"].state_dict().values(), strict=True))
    with pytest.raises(PrunecompError, match="refine loss"):
        refine(copy.deepcopy(by_hand), ids, targets, loss="kl")


def test_the_loop_alone_does_not_refine() -> None:
    """Refinement is the caller's step: the loop's result equals compress() without refinement, bit for bit."""
    cfg = PruneConfig(n_layers=2, refine="norms", refine_steps=3, refine_topk=8)
    a, b = tiny_model("llama"), tiny_model("llama")
    rep = prune_and_compensate(a, tokens(n=4, t=16), cfg, batch_size=2)
    compress(b, tokens(n=4, t=16), cfg.model_copy(update={"refine": "none"}), batch_size=2)
    assert rep.refine is None and rep.refine_edit is None
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_compress_refines_on_its_own_windows() -> None:
    model = tiny_model("llama")
    ids, more = tokens(n=2, t=16), tokens(n=6, t=16, seed=7)
    cfg = PruneConfig(n_layers=1, refine="norms", refine_steps=4, refine_topk=8)
    report = compress(model, ids, cfg, batch_size=2, refine_windows=more)
    assert report.refine is not None and report.refine["loss_after"] < report.refine["loss_before"]


def test_compress_needs_a_teacher_for_an_already_pruned_model() -> None:
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    remove_layer(model, 1)
    ids = tokens(n=2, t=8)
    cfg = PruneConfig(n_layers=2, refine="norms", refine_steps=2)
    with pytest.raises(PrunecompError, match="pass teacher="):
        compress(model, ids, cfg, batch_size=2)
    report = compress(model, ids, cfg, batch_size=2, teacher=dense)
    assert report.refine is not None and len(report.steps) == 1


def _sampled(model: torch.nn.Module, n: int, t: int, seed: int) -> torch.Tensor:
    """Windows the model itself writes (ancestral sampling): text on which matching it lowers the NLL."""
    torch.manual_seed(seed)
    start = tokens(n=n, t=1, seed=seed)
    with torch.no_grad():
        return model.generate(start, do_sample=True, max_new_tokens=t - 1, min_new_tokens=t - 1, top_k=0,
                              pad_token_id=0)


def test_gains_that_lower_the_held_out_nll_are_folded_as_without_the_check() -> None:
    dense = tiny_model("llama")
    ids, check = _sampled(dense, 6, 16, seed=3), _sampled(dense, 4, 16, seed=4)
    targets = teacher_targets(dense, ids, topk=16)
    plain, checked = copy.deepcopy(dense), copy.deepcopy(dense)
    for m in (plain, checked):
        remove_layer(m, 1)
    refine(plain, ids, targets, mode="channels", steps=30, lr=2e-2)
    rep = refine(checked, ids, targets, mode="channels", steps=30, lr=2e-2, check=check)
    assert rep.kept and rep.check_windows == 4 and rep.check_loss_after < rep.check_loss_before
    assert rep.folded and rep.to_dict()["kept"] is True
    for (name, x), (_, y) in zip(plain.state_dict().items(), checked.state_dict().items(), strict=True):
        assert torch.equal(x, y), name  # the check decides; it does not change the fit


def test_gains_that_raise_the_held_out_nll_are_declined_and_nothing_is_folded() -> None:
    """Distilled towards a teacher that is not the model the text comes from, the gains lower their own loss and
    raise the NLL of real text: declined, the model left exactly as it was."""
    dense, other = tiny_model("llama"), tiny_model("llama", seed=7)
    ids, check = _sampled(dense, 6, 16, seed=3), _sampled(dense, 4, 16, seed=4)
    wrong = teacher_targets(other, ids, topk=16)
    model = copy.deepcopy(dense)
    remove_layer(model, 1)
    before = copy.deepcopy(model.state_dict())
    rep = refine(model, ids, wrong, mode="channels", steps=30, lr=2e-1, check=check)
    assert rep.loss_after == pytest.approx(rep.loss_before)  # nothing folded: the audit loss is unchanged
    assert not rep.kept and rep.folded == {} and rep.check_loss_after >= rep.check_loss_before
    for name, x in model.state_dict().items():
        assert torch.equal(x, before[name]), name


def test_compress_passes_the_check_windows_to_the_gains() -> None:
    dense = tiny_model("llama")
    ids, check = _sampled(dense, 4, 16, seed=3), _sampled(dense, 2, 16, seed=4)
    cfg = PruneConfig(n_layers=1, refine="channels", refine_steps=6, refine_lr=2e-2, refine_topk=8)
    report = compress(dense, ids, cfg, batch_size=2, check_windows=check)
    assert report.refine is not None and report.refine["check_windows"] == 2
    assert isinstance(report.refine["kept"], bool)
