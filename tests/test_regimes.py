"""The regime measurements: the plain policy's probability of the hint-supplied tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from nemo_guide.backends.torch.models import TinyAdapter, load_adapter
from nemo_guide.backends.torch.regimes import (
    definition_token_positions,
    held_out_records,
    markdown_table,
    measure_operator,
    pass_at_k_from_p,
    regime_stats,
    response_logprobs,
)
from nemo_guide.backends.torch.tiny import CharTokenizer, TinyConfig, TinyDecoder
from nemo_guide.data import digit_ops


def test_regime_stats_hand_computed():
    # Two problems, two definition tokens each. Plain probabilities (.5, .2) and (1, .1);
    # hinted (1, 1) and (1, .5).
    plain = torch.tensor([[0.5, 0.2], [1.0, 0.1]]).log()
    hinted = torch.tensor([[1.0, 1.0], [1.0, 0.5]]).log()
    out = regime_stats(plain, hinted)
    # p = mean(.5 * .2, 1 * .1) = .1; p_hinted = mean(1, .5) = .75.
    assert out["p"].item() == pytest.approx(0.1)
    assert out["p_hinted"].item() == pytest.approx(0.75)
    # Per-token ratios .5, .2, 1, .2 -> sorted .2 .2 .5 1; quantiles interpolate the logs:
    # p10 at rank 0.3 -> .2; median at rank 1.5 -> sqrt(.2 * .5) = .316; p90 at rank 2.7 -> .5 * 2^0.7.
    q = out["ratio_q"].tolist()
    assert q == pytest.approx([0.2, math.sqrt(0.1), 0.5 * 2**0.7])
    assert out["log_ratio_mean"].item() == pytest.approx((math.log(0.5) + math.log(0.2) + 0 + math.log(0.2)) / 4)
    # Equal contexts: ratio 1 everywhere.
    same = regime_stats(plain, plain)
    assert same["ratio_q"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        regime_stats(plain, hinted[:1])


def test_pass_at_k_from_p():
    # p = (.5, 0, 1), k = 2: 1 - .25 = .75, 0, 1 -> mean 7/12.
    assert pass_at_k_from_p(torch.tensor([0.5, 0.0, 1.0]), 2).item() == pytest.approx(7 / 12)
    assert pass_at_k_from_p(torch.tensor([0.3]), 1).item() == pytest.approx(0.3)
    p = torch.rand(50)
    assert (pass_at_k_from_p(p, 8) >= pass_at_k_from_p(p, 4)).item()  # more tries never hurt
    with pytest.raises(ValueError, match="k >= 1"):
        pass_at_k_from_p(p, 0)


def test_response_logprobs_match_a_direct_forward():
    torch.manual_seed(0)
    model = TinyDecoder(TinyConfig(vocab_size=CharTokenizer().vocab_size, d_model=32, n_layer=1, n_head=2, d_ff=64)).eval()
    adapter = TinyAdapter(model, "test")
    recs = held_out_records("$", 3)
    prompts = [recs[0].problem, digit_ops.HINT_TEMPLATE.replace("{hint}", recs[1].hint).replace("{problem}", recs[1].problem), recs[2].problem]
    got = response_logprobs(adapter, prompts, [r.solution for r in recs])
    for prompt, rec, lp in zip(prompts, recs, got, strict=True):
        p, s = adapter.encode(prompt), adapter.encode(rec.solution, False)
        ids = torch.tensor([p + s])
        hidden, _ = model(ids, torch.ones_like(ids, dtype=torch.bool))
        logp = F.log_softmax(hidden[0] @ model.output_weight.T, dim=-1)  # [T, V]
        want = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(s)])
        assert lp.shape == (len(s),)
        torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_definition_positions_and_held_out_problems():
    adapter = TinyAdapter(TinyDecoder(TinyConfig(d_model=16, n_layer=1, n_head=2, d_ff=32)), "test")
    rec = digit_ops.make_record("$", 47, 31, "x")  # "$=3a+7b;..."
    assert definition_token_positions(adapter, rec.solution) == [2, 5]
    assert [rec.solution[i] for i in (2, 5)] == ["3", "7"]
    recs = held_out_records("!", 10, seed=3)
    assert len(recs) == 10 and recs == held_out_records("!", 10, seed=3)
    held = set(digit_ops.pairs(held_out=True))
    assert all((int(r.problem[2:4]), int(r.problem[5:7])) in held for r in recs)


def test_measure_operator_on_the_regimes_policy():
    """The shipped regimes policy sits where its mixture puts it: the right meaning of a rare
    operator at about p without the hint, the wrong one under greedy decoding; the wrong
    operator's right meaning (p = 0) at vanishing probability."""
    adapter = load_adapter("builtin:tiny-regimes", torch.float32, torch.device("cpu"))
    rows = {op: measure_operator(adapter, op, problems=24, samples=8, k=8) for op in "+#$!?"}
    assert rows["+"].p > 0.95 and rows["+"].greedy_plain == 1.0
    assert 1 / 81 / 3 < rows["#"].p < 3 / 81
    for op in digit_ops.RARE:
        row = rows[op]
        assert row.level == "rare" and row.greedy_plain == 0.0 and row.greedy_hinted >= 0.9
        assert digit_ops.RARE_P[op] / 3 < row.p < min(0.5, 3 * digit_ops.RARE_P[op]), (op, row.p)
    assert rows["$"].p < rows["!"].p
    assert rows["?"].level == "wrong" and rows["?"].p < 1e-3 and rows["?"].greedy_plain == 0.0 and rows["?"].greedy_hinted >= 0.9
    table = markdown_table(list(rows.values()))
    assert table.count("\n") == 2 + 5 and "| rare | `!` |" in table


def test_unseen_operator_on_the_default_policy_is_regime_1():
    row = measure_operator(load_adapter("builtin:tiny", torch.float32, torch.device("cpu")), "@", problems=16, samples=4, k=4)
    assert row.level == "unseen" and row.p < 1e-4 and row.ratio_p10 < 1e-4 and row.greedy_hinted == 1.0
    assert row.pass_k_from_p < 1e-3
