"""Each metric against a hand-written formula on small tensors, plus the properties the method relies on."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from prunecomp.method import metrics as M


def _x(seed: int, shape: tuple[int, ...] = (2, 3, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cos_loop(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for n in range(a.shape[0]):
        for t in range(a.shape[1]):
            u, v = a[n, t].tolist(), b[n, t].tolist()
            dot = sum(x * y for x, y in zip(u, v, strict=True))
            out.append(dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))))
    return out


def test_block_influence_matches_formula() -> None:
    a, b = _x(0), _x(1)
    total, count = M.block_influence_sum(a, b)
    expected = sum(1 - c for c in _cos_loop(a, b))
    assert count == 6
    assert abs(float(total) - expected) < 1e-5


def test_angular_distance_matches_formula() -> None:
    a, b = _x(2), _x(3)
    total, count = M.angular_distance_sum(a, b)
    expected = sum(math.acos(max(-1.0, min(1.0, c))) / math.pi for c in _cos_loop(a, b))
    assert count == 6
    assert abs(float(total) - expected) < 1e-5


def test_identity_layer_scores_zero_and_scale_one() -> None:
    a = _x(4)
    total, _ = M.block_influence_sum(a, a.clone())
    assert abs(float(total)) < 1e-6
    r = M.magnitude_ratio(a, a.clone())
    assert M.gap_scale(r.sum(0), r.shape[0]) == 1.0 or abs(M.gap_scale(r.sum(0), r.shape[0]) - 1.0) < 1e-6


def test_magnitude_ratio_and_gap_scale_match_paper_formula() -> None:
    x_in, x_out = _x(5, (3, 5, 4)), _x(6, (3, 5, 4)) * 2.5
    r = M.magnitude_ratio(x_in, x_out)
    assert r.shape == (3, 4)
    # s = mean_c mean_n ( mean_t |x_out[n,t,c]| / mean_t |x_in[n,t,c]| ), written out with loops
    per = []
    for c in range(4):
        vals = []
        for n in range(3):
            num = sum(abs(float(x_out[n, t, c])) for t in range(5)) / 5
            den = sum(abs(float(x_in[n, t, c])) for t in range(5)) / 5
            vals.append(num / den)
        per.append(sum(vals) / 3)
    expected = sum(per) / 4
    assert abs(M.gap_scale(r.sum(0), 3) - expected) < 1e-5


def test_scaled_output_gives_exact_scale() -> None:
    x = _x(7)
    r = M.magnitude_ratio(x, 1.7 * x)
    assert abs(M.gap_scale(r.sum(0), r.shape[0]) - 1.7) < 1e-6


def test_streaming_accumulation_equals_one_shot() -> None:
    x_in, x_out = _x(8, (6, 4, 3)), _x(9, (6, 4, 3))
    state = None
    for lo in (0, 2, 4):
        r = M.magnitude_ratio(x_in[lo : lo + 2], x_out[lo : lo + 2])
        state = M.accumulate(state, r.sum(0), r.shape[0])
    full = M.magnitude_ratio(x_in, x_out)
    assert state[1] == 6
    assert_close(state[0].float(), full.sum(0))
    bi_state = None
    for lo in (0, 3):
        bi_state = M.accumulate(bi_state, *M.block_influence_sum(x_in[lo : lo + 3], x_out[lo : lo + 3]))
    total, count = M.block_influence_sum(x_in, x_out)
    assert abs(float(M.mean(bi_state)) - float(total) / count) < 1e-6


def test_taylor_and_magnitude_importance() -> None:
    w1, g1 = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.1, 0.3], [-2.0, 5.0]])
    w2, g2 = torch.tensor([3.0, -1.0]), torch.tensor([-1.0, -1.0])
    assert abs(M.taylor_importance([(w1, g1), (w2, g2)]) - (0.1 + 0.6 + 1.0 + 0.0 + 3.0 + 1.0)) < 1e-6
    assert abs(M.magnitude_importance([w1, w2]) - (1 + 2 + 0.5 + 0 + 3 + 1)) < 1e-9


def test_gap_scale_rejects_empty() -> None:
    try:
        M.gap_scale(torch.ones(3), 0)
    except ValueError as exc:
        assert "at least one" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_layer_statistics_accumulate_as_state_in_state_out() -> None:
    """Two batches through ``accumulate_layer`` equal the hand-written formulas over all tokens at once."""
    from prunecomp.method.metrics import accumulate_layer, layer_scale, layer_score

    g = torch.Generator().manual_seed(0)
    x_in = torch.randn(3, 5, 4, generator=g)
    x_out = x_in + 0.3 * torch.randn(3, 5, 4, generator=g)
    state = accumulate_layer(None, x_in[:2], x_out[:2], ("bi", "angular"))
    again = accumulate_layer(state, x_in[2:], x_out[2:], ("bi", "angular"))
    assert state["ratio"][1] == 2 and again["ratio"][1] == 3  # the first state was not mutated
    cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
    torch.testing.assert_close(layer_score(again, "bi"), float((1 - cos).mean()))
    torch.testing.assert_close(layer_score(again, "angular"), float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
    per_window = x_out.abs().double().mean(dim=1) / x_in.abs().double().mean(dim=1)  # [n, C]
    torch.testing.assert_close(layer_scale(again), float(per_window.mean()), rtol=1e-6, atol=1e-9)
