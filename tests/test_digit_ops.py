import random
from collections import Counter

import pytest

from nemo_guide.data import digit_ops
from nemo_guide.data.sources import default_reward, load_split, resolve_eval
from nemo_guide.rewards import ExactAnswerReward, exact_answer_reward


def test_hand_computed_trace():
    # '#' = 7a+3b digit-wise mod 10: 47 # 31 -> 7*4=28->8, 3*3=9, 8+9=17->7; 7*7=49->9, 3*1=3, 9+3=12->2.
    rec = digit_ops.make_record("#", 47, 31, "x")
    assert rec.problem == "Q:47#31="
    assert rec.hint == "#=7a+3b"
    assert rec.answer == "72"
    assert rec.solution == "#=7a+3b;7*4=8,3*3=9,8+9=7;7*7=9,3*1=3,9+3=2;A:72"
    assert rec.extra == {"kind": "novel", "op": "#"}
    # '+' = 1a+1b keeps leading zeros: 05 + 07 -> 0, 2 (5+7=12 -> 2).
    assert digit_ops.make_record("+", 5, 7, "x").answer == "02"


def test_answer_identifies_the_definition():
    # On every operand pair of both splits, no other (c1, c2) gives the same answer,
    # so a wrong definition is never rewarded by accident.
    defs = [(c1, c2) for c1 in range(1, 10) for c2 in range(1, 10)]
    for a, b in digit_ops.pairs(True) + digit_ops.pairs(False)[::7]:
        answers = [digit_ops.apply(d, a, b) for d in defs]
        assert len(set(answers)) == len(defs)
    # And the filter is needed: 10 # 20 has determinant 0, many definitions agree.
    assert not digit_ops.identifies_definition(10, 20)
    assert len({digit_ops.apply(d, 10, 20) for d in defs}) < len(defs)


@pytest.mark.parametrize("op", list(digit_ops.DEFINITIONS))
def test_solution_ends_with_answer_and_is_consistent(op):
    rng = random.Random(op)
    for _ in range(50):
        a, b = rng.randrange(100), rng.randrange(100)
        rec = digit_ops.make_record(op, a, b, "x")
        assert exact_answer_reward(rec.solution, rec.answer) == 1.0
        c1, c2 = digit_ops.DEFINITIONS[op]
        for step, x, y in zip(rec.solution.split(";")[1:-1], f"{a:02d}", f"{b:02d}", strict=True):
            p, q, r = (int(part.split("=")[1]) for part in step.split(","))
            assert p == c1 * int(x) % 10 and q == c2 * int(y) % 10
            assert r == (p + q) % 10


def test_splits_are_disjoint_and_interleaved():
    train = digit_ops.build_split("digit_ops", "train")
    held = digit_ops.build_split("digit_ops", "eval")
    pairs = lambda recs: {r.problem for r in recs}  # noqa: E731
    assert not pairs(train) & pairs(held)
    assert len({r.id for r in train}) == len(train) == 6 * 600 + 2 * 1800
    assert set(digit_ops.pairs(True)).isdisjoint(digit_ops.pairs(False))
    assert Counter(r.extra["kind"] for r in held) == {"known": 60, "novel": 80}
    # Any prefix has the task's mix (half novel in train).
    first = Counter(r.extra["kind"] for r in train[:100])
    assert 40 <= first["novel"] <= 60
    assert digit_ops.build_split("digit_ops", "train")[:20] == train[:20]  # deterministic


def test_unseen_task_and_errors():
    recs = digit_ops.build_split("digit_ops_unseen", "eval")
    assert {r.extra["op"] for r in recs} == set(digit_ops.KNOWN) | {"@"}
    with pytest.raises(ValueError, match="unknown built-in task"):
        digit_ops.build_split("nope", "train")
    with pytest.raises(ValueError, match="split"):
        digit_ops.build_split("digit_ops", "test")


def test_sft_mixture():
    rng = random.Random(0)
    kinds = Counter()
    for _ in range(4000):
        kind, prompt, solution = digit_ops.sft_example(rng)
        kinds[kind] += 1
        hinted = prompt.startswith("H:")
        assert hinted == kind.endswith("hinted") or kind == "hinted_random"
        if kind == "novel_random":
            assert prompt[4] in digit_ops.NOVEL
        if hinted:  # the solution restates the hint's definition
            assert solution.startswith(prompt[2:].split(";")[0])
        if kind == "known":
            assert solution.startswith(digit_ops.definition_text(prompt[4], digit_ops.KNOWN[prompt[4]]))
    # 40/20/20/20 within sampling noise.
    assert abs(kinds["known"] / 4000 - 0.4) < 0.03
    assert all(abs(kinds[k] / 4000 - 0.2) < 0.03 for k in ("known_hinted", "novel_random", "hinted_random"))
    # The unseen operator never appears without a hint.
    for _ in range(2000):
        _, prompt, _ = digit_ops.sft_example(rng)
        if "@" in prompt:
            assert prompt.startswith("H:@=")


def test_exact_reward():
    reward = ExactAnswerReward()
    assert reward(["p"] * 4, ["x;A:96", "A:96 ", "A:9", "no marker"], answers=["96", "96", "96", "96"]) == [1.0, 1.0, 0.0, 0.0]
    assert exact_answer_reward("A:1;A:96", "96") == 1.0  # the last marker counts
    assert exact_answer_reward("A:96x", "96") == 0.0
    with pytest.raises(ValueError, match="1 prompts, 2 completions and 2 answers"):
        reward(["p"], ["a", "b"], answers=["1", "2"])


def test_sources():
    assert resolve_eval("builtin:digit_ops", None) == "builtin:digit_ops"
    assert resolve_eval("data.jsonl", None) is None
    assert resolve_eval("data.jsonl", "held.jsonl") == "held.jsonl"
    assert default_reward("builtin:digit_ops") == "exact" and default_reward("x.jsonl") == "math"
    assert len(load_split("builtin:digit_ops", "eval")) == 140
