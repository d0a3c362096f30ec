import hashlib
import math
import random
from collections import Counter

import pytest

from nemo_guide.backends.torch import tiny_llama
from nemo_guide.backends.torch.tiny import CharTokenizer
from nemo_guide.data import digit_ops
from nemo_guide.data.sources import default_reward, load_split, resolve_eval
from nemo_guide.evaluation import heldout_pass1
from nemo_guide.prompts import Prompt, PromptSet
from nemo_guide.rewards import ExactAnswerReward, exact_answer_reward


def _digest(obj) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()


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


# Computed with the code before the regimes knob existed (main at d1e7193): the default SFT
# mixture and the tasks of builtin:tiny / builtin:tiny-llama must draw exactly the same.
DEFAULT_MIXTURE_2000 = "e7b168a43cb771c1bed1df39314ce1395bdbb1c50a4e2664a519b5248d3272e6"
SPLITS = {
    ("digit_ops", "train"): (7200, "818d0b20f42b308497fe1a345cac285d66d5f4715e1584cbd978cb1316a05af4"),
    ("digit_ops", "eval"): (140, "f5a203c73eda90ee1355e2b087a4bc695b1e6b249ebf07cd702d79c2f2abb6fa"),
    ("digit_ops_unseen", "train"): (6192, "0e6511440240a7a8ecce08072cbf0343f3afe4ed434c375823d18ac54480281b"),
    ("digit_ops_unseen", "eval"): (140, "b45a6cb9f8489258e9f90400e799ed8303142e68e8216e2c6007b6d0064b239f"),
}


def test_knob_off_draws_exactly_as_before():
    rng = random.Random(0)
    examples = [digit_ops.sft_example(rng) for _ in range(2000)]
    assert examples[:3] == [
        ("novel_random", "Q:63&96=", "&=7a+1b;7*6=2,1*9=9,2+9=1;7*3=1,1*6=6,1+6=7;A:17"),
        ("known_hinted", "H:*=2a+3b;Q:83*51=", "*=2a+3b;2*8=6,3*5=5,6+5=1;2*3=6,3*1=3,6+3=9;A:19"),
        ("hinted_random", "H:*=4a+9b;Q:94*45=", "*=4a+9b;4*9=6,9*4=6,6+6=2;4*4=6,9*5=5,6+5=1;A:21"),
    ]
    assert _digest(examples) == DEFAULT_MIXTURE_2000
    assert rng.random() == 0.9061366598004098  # and the same number of draws
    rng = random.Random(0)
    assert [digit_ops.sft_example(rng, regimes=False) for _ in range(50)] == examples[:50]
    assert not any(kind.startswith("rare") or set(prompt) & set(digit_ops.RARE_P) for kind, prompt, _ in examples)
    for (task, split), (n, digest) in SPLITS.items():
        recs = digit_ops.build_split(task, split)
        assert len(recs) == n
        assert _digest([(r.id, r.problem, r.answer, r.hint, r.solution, r.extra) for r in recs]) == digest, (task, split)


def test_rare_and_wrong_operators_fit_the_text_format():
    reserved = set("HQA:;=,+*ab0123456789")  # the hint / problem / trace syntax (+ and * only as known operators)
    assert set(digit_ops.RARE_P) == set(digit_ops.RARE) | set(digit_ops.WRONG) == set(digit_ops.RARE_WRONG)
    for op in digit_ops.RARE_P:
        assert op not in reserved and op not in digit_ops.BASE_OPS
        assert digit_ops.kind_of(op) == ("rare" if op in digit_ops.RARE else "wrong")
        rec = digit_ops.make_record(op, 47, 31, "x")
        guided = digit_ops.HINT_TEMPLATE.replace("{hint}", rec.hint).replace("{problem}", rec.problem)
        for text in (guided, rec.solution):
            ids = CharTokenizer().encode(text)
            assert len(ids) == len(text) and CharTokenizer().decode(ids) == text
        assert op in tiny_llama.vocabulary()
        assert guided.split(";")[1].split(op) == ["Q:47", "31="]  # parses back: the operator splits the operands
    # '$' = 3a+7b: 47 $ 31 -> 3*4=12->2, 7*3=21->1, 2+1=3; 3*7=21->1, 7*1=7, 1+7=8.
    assert digit_ops.make_record("$", 47, 31, "x").solution == "$=3a+7b;3*4=2,7*3=1,2+1=3;3*7=1,7*1=7,1+7=8;A:38"
    assert digit_ops.apply(digit_ops.RARE_WRONG["$"], 47, 31) == "88"  # 8a+2b: 8*4=32->2, 2*3=6, 8; 8*7=56->6, 2*1=2, 8
    for op, p in digit_ops.RARE_P.items():
        right, wrong = digit_ops.DEFINITIONS[op], digit_ops.RARE_WRONG[op]
        assert right[0] != wrong[0] and right[1] != wrong[1]  # a wrong first digit is wrong, whatever follows
        assert right not in digit_ops.BASE_DEFINITIONS.values() and wrong not in digit_ops.BASE_DEFINITIONS.values()
        assert 0 <= p < 0.5 and (p > 0) == (op in digit_ops.RARE)  # a minority: greedy decoding writes the wrong one


def test_regimes_mixture_shows_the_right_meaning_in_a_fraction_p():
    rng = random.Random(1)
    n = 40000
    kinds = Counter()
    rare_defs: dict[str, Counter] = {op: Counter() for op in digit_ops.RARE_P}
    hinted_ops = Counter()
    for _ in range(n):
        kind, prompt, solution = digit_ops.sft_example(rng, regimes=True)
        kinds[kind] += 1
        hinted = prompt.startswith("H:")
        if kind.startswith("rare"):
            assert not hinted and prompt[4] in digit_ops.RARE_P
            rare_defs[prompt[4]][solution[:7]] += 1
        if hinted:
            assert solution.startswith(prompt[2:].split(";")[0])
            hinted_ops[prompt[2]] += 1
        if "@" in prompt:
            assert hinted  # the unseen operator still never appears without a hint
    # 35/15/15/15/20 within sampling noise (4 sigma of a binomial share).
    for share, keys in [(0.35, ["known"]), (0.15, ["known_hinted"]), (0.15, ["novel_random"]), (0.15, ["rare_right", "rare_wrong"]), (0.2, ["hinted_random"])]:
        assert abs(sum(kinds[k] for k in keys) / n - share) < 4 * math.sqrt(share * (1 - share) / n), keys
    # Hinted draws use every operator, the rare ones included.
    assert set(hinted_ops) == set(digit_ops.DEFINITIONS)
    for op, counts in rare_defs.items():
        total = sum(counts.values())
        right = counts[digit_ops.definition_text(op, digit_ops.DEFINITIONS[op])]
        wrong = counts[digit_ops.definition_text(op, digit_ops.RARE_WRONG[op])]
        assert right + wrong == total  # only these two meanings
        p = digit_ops.RARE_P[op]
        assert abs(right / total - p) < 4 * math.sqrt(p * (1 - p) / total) or right == p == 0, (op, right / total)
        # Greedy decoding follows the majority: the wrong first digit is the most frequent one.
        first = Counter(d[2] for d in counts.elements())
        assert first.most_common(1)[0][0] == str(digit_ops.RARE_WRONG[op][0])


def test_rare_task_and_per_kind_eval():
    train = digit_ops.build_split("digit_ops_rare", "train")
    held = digit_ops.build_split("digit_ops_rare", "eval")
    assert {r.extra["op"] for r in held} == set(digit_ops.KNOWN) | set(digit_ops.RARE)
    assert Counter(r.extra["kind"] for r in held) == {"known": 60, "rare": 80}
    assert Counter(r.extra["kind"] for r in train) == {"known": 3600, "rare": 3600}
    assert not {r.problem.replace("$", "#").replace("!", "#") for r in held} & {r.problem.replace("$", "#").replace("!", "#") for r in train}
    assert all(r.answer == digit_ops.apply(digit_ops.RARE[r.extra["op"]], int(r.problem[2:4]), int(r.problem[5:7])) for r in held if r.extra["kind"] == "rare")
    assert len(load_split("builtin:digit_ops_rare", "eval")) == 140
    wrong = digit_ops.build_split("digit_ops_wrong", "eval")
    assert Counter(r.extra["kind"] for r in wrong) == {"known": 60, "wrong": 80}
    assert all(r.hint == digit_ops.definition_text("?", digit_ops.WRONG["?"]) for r in wrong if r.extra["kind"] == "wrong")
    # Held-out pass@1 reports each kind, rare, wrong and unseen included: a stub policy
    # right on rare operators only, wrong elsewhere.
    records = held + wrong[-10:] + digit_ops.build_split("digit_ops_unseen", "eval")[-10:]
    prompts = PromptSet(records, [Prompt(r.problem, [i], None) for i, r in enumerate(records)], [None] * len(records))

    class Stub:
        def generate(self, ids, **kwargs):
            return [list(x) for x in ids], [True] * len(ids)

        def decode(self, ids):
            r = records[ids[0]]
            return f"A:{r.answer if r.extra['kind'] == 'rare' else 'xx'}"

    out = heldout_pass1(Stub(), Stub(), ExactAnswerReward(), prompts, max_new_tokens=8, temperature=0.0)
    assert out["eval/pass1_rare"] == 1.0 and out["eval/pass1_known"] == 0.0 and out["eval/pass1_unseen"] == 0.0
    assert out["eval/pass1_wrong"] == 0.0
    assert out["eval/pass1"] == pytest.approx(80 / 160)
