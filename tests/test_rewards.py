import json
import re
import time

import pytest

from conftest import BENCHMARKS
from nemo_guide.rewards import MathReward, VerifierPool, extract_answer, format_reward, math_reward
from nemo_guide.rewards._worker import strip_percent


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"The answer is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
        (r"set \boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{7} and a truncated \boxed{\frac{1}{", "7"),
        (r"\fbox{3}", "3"),
        (r"\boxed {5}", "5"),
        ("<think>hmm</think><answer> 12 </answer>", "12"),
        (r"<answer>3</answer> but finally \boxed{4}", "4"),
        ("<answer>1</answer><answer>2</answer>", "2"),
        ("no answer here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_is_linear_on_adversarial_input():
    text = "\\boxed{" * 20000 + "x"
    t = time.perf_counter()
    assert extract_answer(text) is None
    assert time.perf_counter() - t < 2.0


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac12}", "0.5", 1.0),
        (r"\boxed{3}", "4", 0.0),
        (r"\boxed{x^2+2x+1}", r"(x+1)^2", 1.0),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        ("I think it is 5.", "5", 0.0),  # no final-answer marker
        ("<answer>12</answer>", "12", 1.0),
        (r"\boxed{}", "0", 0.0),
        (r"\boxed{__import__('os').system('echo pwned')}", "0", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward(completion, answer) == expected


@pytest.fixture(scope="module")
def exact_pool():
    """One verifier process for a module's hand cases; no fast path: every pair through math-verify."""
    pool = VerifierPool(num_workers=1, fast_path=False)
    yield pool
    pool.close()


@pytest.mark.parametrize("text", [r"20\%", "20%", r"20 \%", r"20\,\%", r"20\text{ percent}", r"20\text{\%}", "20 percent", "20"])
def test_strip_percent(text):
    assert strip_percent(text) == "20"


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        # Percent policy: a trailing percent sign is a unit, on either side (issue 11) ...
        (r"The answer is \boxed{20}", r"20\%", 1.0),
        (r"\boxed{20\%}", r"20\%", 1.0),
        (r"\boxed{20%}", r"20\%", 1.0),
        (r"\boxed{20 \%}", "20%", 1.0),
        (r"\boxed{20\text{ percent}}", r"$20\%$", 1.0),
        (r"\boxed{20\%}", "20", 1.0),
        (r"\boxed{12.5}", r"12.5\%", 1.0),
        # ... and a number is read in the unit it is given in: 0.2 is not 20%.
        (r"\boxed{0.2}", r"20\%", 0.0),
        (r"\boxed{\frac{1}{5}}", r"20\%", 0.0),
        (r"\boxed{0.2\%}", r"20\%", 0.0),
        (r"\boxed{21\%}", r"20\%", 0.0),
        (r"\boxed{20\%}", "21", 0.0),
        # Gold readings tried in turn: "-1./3" is not LaTeX but reads whole as a plain expression ...
        (r"\boxed{-\frac{1}{3}}", "-1./3", 1.0),
        (r"\boxed{-0.5}", "-1./2", 1.0),
        # ... while a number found inside a gold answer is not a reading of it ($-1./3$ -> -1).
        (r"\boxed{-1}", "-1./3", 0.0),
        (r"\boxed{2}", r"\hbar \omega(v+1 / 2)-\frac{E_{0}^{2} e^{2}}{2 m \omega^{2}}", 0.0),
    ],
)
def test_percent_policy_and_gold_readings(completion, answer, expected, exact_pool):
    assert exact_pool.score([completion], [answer]) == [expected]


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="../shared/data/benchmarks not present")
def test_percent_answers_of_olympiadbench():
    rows = [json.loads(line) for line in (BENCHMARKS / "olympiadbench.jsonl").open()]
    percent = {r["id"]: r["answer"] for r in rows if "%" in r["answer"]}
    assert percent == {"olympiadbench-0138": "62.5%", "olympiadbench-0149": r"$8 \%$", "olympiadbench-0187": "17.5%"}
    values = {"olympiadbench-0138": "62.5", "olympiadbench-0149": "8", "olympiadbench-0187": "17.5"}
    accepted = [(values[i] + suffix, gold) for i, gold in percent.items() for suffix in ("", r"\%", "%", r" \%")]
    rejected = [(other, gold) for i, gold in percent.items() for other in (str(float(values[i]) / 100), str(float(values[i]) + 1) + r"\%")]
    reward = MathReward(num_workers=1, fast_path=False)
    try:
        for pairs, expected in ((accepted, 1.0), (rejected, 0.0)):
            scores = reward([""] * len(pairs), [r"so \boxed{" + pred + "}." for pred, _ in pairs], answers=[gold for _, gold in pairs])
            assert scores == [expected] * len(pairs), [p for p, s in zip(pairs, scores, strict=True) if s != expected]
    finally:
        reward.close()


def test_adversarial_inputs_return_within_five_seconds():
    math_reward(r"\boxed{1}", "2")  # start the worker first
    for completion in [
        r"\boxed{9^{9^{9^{9}}}}",
        r"\boxed{10^{10^{10^{10^{10}}}}}",
        r"\boxed{2^{99999999}!}",
        "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
        r"\boxed{" + "x" * 5000 + "}",
        "\\boxed{" * 3000,
    ]:
        t = time.perf_counter()
        assert math_reward(completion, "3") == 0.0
        assert time.perf_counter() - t < 5.0, completion[:40]


def test_hard_deadline_kills_and_restarts_worker():
    pool = VerifierPool(num_workers=1, timeout_s=0.5)
    try:
        assert pool.score([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2}"], ["3", "2"]) == [0.0, 1.0]
        assert pool.stats["timeout"] == 1
        assert pool.score([r"\boxed{\frac{4}{2}}"], ["2"]) == [1.0]  # a fresh worker answers
    finally:
        pool.close()


def test_reward_function_signature_and_lengths():
    reward = MathReward(num_workers=2)
    try:
        assert reward(["p1", "p2"], [r"\boxed{1}", r"\boxed{3}"], answers=["1", "2"]) == [1.0, 0.0]
        with pytest.raises(ValueError, match="1 prompts but 2 completions"):
            reward(["p1"], [r"\boxed{1}", r"\boxed{3}"], answers=["1", "2"])
    finally:
        reward.close()


def test_format_reward():
    assert format_reward("<think> a </think> <answer> 3 </answer>") == 1.0
    assert format_reward("\n<think>a\nb</think>\n<answer>3</answer>\n") == 1.0
    assert format_reward("<answer>3</answer>") == 0.0
    assert format_reward("<think>a</think><answer>3</answer> trailing") == 0.0
    assert format_reward("<think>a</think><think>b</think><answer>3</answer>") == 0.0


def _perturb(answer: str) -> str:
    """A different answer: integers shift by one, anything else gains '+1'."""
    if re.fullmatch(r"-?\d+", answer.strip()):
        return str(int(answer.strip()) + 1)
    return answer + "+1"


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="../shared/data/benchmarks not present")
def test_gold_answers_of_every_benchmark():
    rows = [json.loads(line) for path in sorted(BENCHMARKS.glob("*.jsonl")) for line in path.open()]
    assert len(rows) > 2800
    golds = [r["answer"] for r in rows]
    # fast_path=False: every gold goes through math-verify, not the string shortcut
    reward = MathReward(num_workers=2, fast_path=False)
    try:
        correct = reward([""] * len(rows), ["\\boxed{" + g + "}" for g in golds], answers=golds)
        wrong = reward([""] * len(rows), ["\\boxed{" + _perturb(g) + "}" for g in golds], answers=golds)
    finally:
        reward.close()
    failures = [(r["id"], r["answer"]) for r, c in zip(rows, correct, strict=True) if c != 1.0]
    accepted_wrong = [(r["id"], r["answer"]) for r, w in zip(rows, wrong, strict=True) if w != 0.0]
    print(f"\ngold accepted: {len(rows) - len(failures)}/{len(rows)}; failures: {failures}")
    print(f"perturbed rejected: {len(rows) - len(accepted_wrong)}/{len(rows)}; accepted: {accepted_wrong[:20]}")
    assert len(failures) <= 0.01 * len(rows), failures
    assert len(accepted_wrong) <= 0.01 * len(rows), accepted_wrong
