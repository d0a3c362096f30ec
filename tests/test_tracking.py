"""Run outputs a user watches: log lines without a progress bar, and the training-curves figure."""

import re

import matplotlib.pyplot as plt

from nemo_guide.tracking import StepReport, rolling_mean, training_figure


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_without_a_bar_a_line_every_twentieth_of_the_run_and_every_30_seconds():
    clock, lines = Clock(), []
    report = StepReport("r", 100, 0, progress=False, log=lines.append, clock=clock)
    for step in range(1, 101):
        clock.now += 0.5 if step <= 40 else 40.0  # from step 41 on, 40 s a step
        report.step(step, {"train/reward": 0.25, "train/guided_frac": 0.5})
    steps = [int(re.match(r"step (\d+)/100: ", line).group(1)) for line in lines]
    assert steps[:2] == [5, 10] and steps[7] == 40  # every 100 // 20 = 5 steps
    assert steps[8:] == list(range(41, 101))  # and whenever 30 s have passed
    assert lines[0] == "step 5/100: reward 0.25, guided 0.50, 0.50 s/step, eta 48s"
    assert lines[-1].endswith("eta 0s")
    # step 60: (40 * 0.5 + 20 * 40) s / 60 steps = 13.67 s/step; 40 steps left: 546.7 s
    assert lines[27] == "step 60/100: reward 0.25, guided 0.50, 13.67 s/step, eta 9m07s"


def test_a_resumed_run_reports_from_its_first_new_step():
    clock, lines = Clock(), []
    report = StepReport("r", 4, 2, progress=False, log=lines.append, clock=clock)
    for step in (3, 4):
        clock.now += 2.0
        report.step(step, {"train/reward": 1.0, "train/guided_frac": 0.0})
    report.write("a message")
    assert lines == ["step 3/4: reward 1.00, guided 0.00, 2.00 s/step, eta 2s", "step 4/4: reward 1.00, guided 0.00, 2.00 s/step, eta 0s", "a message"]


def test_rolling_mean():
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling_mean([], 3) == []


def test_training_figure_shows_pass1_per_kind_and_lengths_from_zero():
    rows = [{"step": 0, "eval/pass1": 0.4, "eval/pass1_known": 1.0, "eval/pass1_novel": 0.0}]
    rows += [
        {"step": s, "train/reward": s / 10, "train/guided_frac": 0.5, "train/reward_guided": 0.9, "train/entropy": 0.3, "train/response_length": 40.0 + s % 2}
        for s in range(1, 11)
    ]
    rows[-1].update({"eval/pass1": 0.9, "eval/pass1_known": 1.0, "eval/pass1_novel": 0.8})
    fig = training_figure(rows, "t")
    try:
        accuracy, heldout, entropy, length = fig.axes
        assert [line.get_label() for line in heldout.get_lines()] == ["held-out pass@1, all", "held-out pass@1, known", "held-out pass@1, novel"]
        novel = heldout.get_lines()[2]
        assert list(novel.get_xdata()) == [0, 10] and list(novel.get_ydata()) == [0.0, 0.8]
        assert "rollout accuracy (no hint)" in [line.get_label() for line in accuracy.get_lines()]
        for ax in (entropy, length):
            raw, mean = ax.get_lines()
            assert ax.get_ylim()[0] == 0 and raw.get_alpha() < 0.5 and mean.get_label().startswith("rolling mean")
        assert length.get_ylim()[1] >= 41  # a one-token wiggle on a 40-token response is a flat line
    finally:
        plt.close(fig)
