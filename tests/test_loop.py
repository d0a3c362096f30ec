"""Algorithm 1 end to end on the embedded backend: the main job in short, contexts, resume, bad input."""

import json
import math
import os
import random
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import nemo_guide.loop as loop_module
from nemo_guide.backends.torch.backend import TorchBackend
from nemo_guide.checkpoint import CorruptCheckpoint
from nemo_guide.cli import main, make_backend
from nemo_guide.data.records import Record, write_records
from nemo_guide.errors import RunError
from nemo_guide.loop import Interrupted, train
from nemo_guide.prompts import PromptSampler
from nemo_guide.tracking import read_metrics

EXPECTED_METRICS = {
    "train/reward",
    "train/reward_guided",
    "train/guided_frac",
    "train/entropy",
    "train/response_length",
    "loss/policy",
    "plain/ratio_mean",
    "guided/ratio_p50",
    "guided/frac_ratio_below_1e-3",
    "perf/tokens_per_s",
    "time/generation",
    "time/scoring",
    "time/logprobs",
    "time/update",
}


def run(cfg, backend=None, **injected):
    injected.setdefault("log", lambda s: None)
    return train(cfg, backend or make_backend(cfg), progress=False, **injected)


def test_main_job_short(tiny_cfg):
    cfg = tiny_cfg("run.steps=3", "run.save_every=2")
    summary = run(cfg)
    run_dir = cfg.run.run_dir
    for key in ("steps", "wall_seconds", "train_reward_first", "train_reward_last", "eval_before", "eval_after"):
        assert summary[key] is not None, key
    assert summary["steps"] == 3
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert EXPECTED_METRICS <= set(rows[1])
    assert (run_dir / "training_curves.png").stat().st_size > 10_000
    assert any((run_dir / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000003"]
    assert {p.name for p in (run_dir / "checkpoints" / "step_000003").iterdir()} == {
        "model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json"}
    # The warm-started policy solves known operators and fails novel ones before training.
    before = summary["eval_before_detail"]
    assert before["eval/pass1_known"] >= 0.75 and before["eval/pass1_novel"] <= 0.25


class Spy:
    """Wraps a backend; records what the loop hands to train_step and the log-probs the loss sees."""

    def __init__(self, inner):
        self.inner = inner
        self.seen = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_step(self, batch, loss_fn, **kwargs):
        def spying(micro, logprobs, entropy, mini):
            self.seen.append((micro, logprobs.detach().clone()))
            return loss_fn(micro, logprobs, entropy, mini)

        return self.inner.train_step(batch, spying, **kwargs)


def _direct(model, prompt, response):
    ids = torch.tensor([prompt + response])
    hidden, _ = model(ids, torch.ones_like(ids, dtype=torch.bool))
    logp = F.log_softmax(hidden[0] @ model.output_weight.T, dim=-1)
    return torch.stack([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])


def test_loop_contexts_token_for_token(tiny_cfg):
    """For a guided rollout: old log-probs = a direct forward on hinted prompt + response,
    new log-probs = a direct forward on plain prompt + response."""
    cfg = tiny_cfg("run.steps=1", "algorithm.guidance_threshold=always", "optim.micro_batch_size=5", "data.eval_limit=1")
    backend = make_backend(cfg)
    weights = {k: v.clone() for k, v in backend.model.state_dict().items()}
    spy = Spy(backend)
    run(cfg, spy)
    # Score with the weights the loop used (pi_old = the weights before the update).
    backend.model.load_state_dict(weights)
    guided_rows = 0
    for micro, new in spy.seen:
        for i in range(len(micro)):
            resp = micro.response_ids[i]
            n = len(resp)
            if micro.guided[i]:
                guided_rows += 1
                assert micro.sample_prompt_ids[i] != micro.plain_prompt_ids[i]
                assert backend.decode(micro.sample_prompt_ids[i]).startswith("H:")
            old_ref = _direct(backend.model, micro.sample_prompt_ids[i], resp)
            new_ref = _direct(backend.model, micro.plain_prompt_ids[i], resp)
            torch.testing.assert_close(micro.old_logprobs[i, :n], old_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(new[i, :n], new_ref, atol=1e-5, rtol=1e-5)
            assert micro.loss_mask[i, :n].all() and not micro.loss_mask[i, n:].any()
            if micro.guided[i]:  # the hint changes the denominator somewhere
                assert not torch.allclose(old_ref, new_ref)
    assert guided_rows == 4 * 4  # every prompt guided, k = 4


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def test_resume_reproduces_uninterrupted_run(tiny_cfg, monkeypatch):
    common = ("run.steps=4", "run.save_every=2", "data.eval_limit=4")
    full_cfg = tiny_cfg(*common, "run.name=full")
    run(full_cfg)

    killed_cfg = tiny_cfg(*common, "run.name=killed")
    import nemo_guide.loop as loop_module

    original = loop_module.MetricsLogger.log

    def log_then_die(self, step, metrics):
        original(self, step, metrics)
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3, whose checkpoint was never written

    monkeypatch.setattr(loop_module.MetricsLogger, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(killed_cfg)
    monkeypatch.setattr(loop_module.MetricsLogger, "log", original)
    assert [r["step"] for r in read_metrics(killed_cfg.run.run_dir)] == [0, 1, 2, 3]

    resumed_cfg = tiny_cfg(*common, "run.name=killed", "run.resume=true")
    summary = run(resumed_cfg)
    assert summary["steps"] == 4
    full_rows = read_metrics(full_cfg.run.run_dir)
    resumed_rows = read_metrics(killed_cfg.run.run_dir)
    assert [r["step"] for r in resumed_rows] == [0, 1, 2, 3, 4]
    assert _comparable(resumed_rows) == _comparable(full_rows)
    a = load_file(full_cfg.run.run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    b = load_file(killed_cfg.run.run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class KilledSaving(Spy):
    """A Spy killed (KeyboardInterrupt) while saving checkpoint ``step``, after the weights were written."""

    def __init__(self, inner, step):
        super().__init__(inner)
        self.step = step

    def save(self, directory):
        self.inner.save(directory)
        if directory.name.startswith(f"step_{self.step:06d}"):
            raise KeyboardInterrupt


@pytest.mark.parametrize("moment", ["metrics_line", "checkpoint", "summary"])
def test_a_kill_at_any_moment_leaves_a_run_that_resumes_to_the_uninterrupted_one(tiny_cfg, monkeypatch, moment):
    """Killed mid-write of step 3's metrics line (the line is torn), of step 4's checkpoint,
    or of the summary after the last step: resuming gives the uninterrupted run's metrics and weights."""
    common = ("run.steps=4", "run.save_every=2", "data.eval_limit=4")
    full_cfg = tiny_cfg(*common, "run.name=full")
    run(full_cfg)
    killed_cfg = tiny_cfg(*common, "run.name=killed")
    run_dir = killed_cfg.run.run_dir
    backend = make_backend(killed_cfg)
    if moment == "metrics_line":
        original = loop_module.MetricsLogger.log

        def torn_at_3(self, step, metrics):
            if step == 3:
                row = json.dumps({"step": step, **metrics})
                self._file.write(row[: len(row) // 2])  # the kill cuts the line
                self._file.flush()
                raise KeyboardInterrupt
            original(self, step, metrics)

        monkeypatch.setattr(loop_module.MetricsLogger, "log", torn_at_3)
    elif moment == "checkpoint":
        backend = KilledSaving(backend, 4)
    else:
        original_write = loop_module.atomic_write_text

        def killed_writing_summary(path, text):
            if path.name == "summary.json":
                path.with_name(f"summary.json.tmp-{os.getpid()}").write_text(text[:10])
                raise KeyboardInterrupt
            original_write(path, text)

        monkeypatch.setattr(loop_module, "atomic_write_text", killed_writing_summary)
    last = {"metrics_line": 2, "checkpoint": 2, "summary": 4}[moment]
    with pytest.raises(Interrupted, match=f"last complete checkpoint is {re.escape(str(run_dir))}/checkpoints/step_00000{last}: .*run.resume=true"):
        run(killed_cfg, backend)
    monkeypatch.undo()
    if moment == "metrics_line":
        assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")
    summary = run(tiny_cfg(*common, "run.name=killed", "run.resume=true"))
    assert summary["steps"] == 4
    assert _comparable(read_metrics(run_dir)) == _comparable(read_metrics(full_cfg.run.run_dir))
    a = load_file(full_cfg.run.run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    b = load_file(run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_resume_from_a_corrupt_checkpoint_names_it_and_the_previous_one(tiny_cfg, damage):
    common = ("run.steps=2", "run.save_every=1", "data.eval_limit=1", "algorithm.mode=grpo")
    run(tiny_cfg(*common))
    ckpts = tiny_cfg(*common).run.run_dir / "checkpoints"
    bad = ckpts / "step_000002" / "model.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else random.Random(0).randbytes(len(data)))
    cfg = tiny_cfg(*common, "run.steps=3", "run.resume=true")
    previous, corrupt = re.escape(str(ckpts / "step_000001")), re.escape(str(ckpts / "step_000002"))
    with pytest.raises(CorruptCheckpoint, match=rf"^{re.escape(str(bad))} is corrupt \(not a complete safetensors file: .*\).*previous complete checkpoint instead, {previous}.*mv {corrupt} {corrupt}.corrupt\) and run again with run.resume=true"):
        run(cfg)
    os.rename(ckpts / "step_000002", ckpts / "step_000002.corrupt")  # the advice
    logs = []
    assert run(cfg, log=logs.append)["steps"] == 3
    assert f"resumed from {ckpts / 'step_000001'} (step 1)" in logs
    assert [r["step"] for r in read_metrics(ckpts.parent)] == [0, 1, 2, 3]


def test_without_a_progress_bar_train_logs_periodic_lines(tiny_cfg):
    logs = []
    train(tiny_cfg("run.steps=2", "data.eval_limit=1"), make_backend(tiny_cfg("run.steps=2")), progress=False, log=logs.append)
    lines = [line for line in logs if line.startswith("step ")]
    assert len(lines) == 2
    assert re.fullmatch(r"step 1/2: reward \d\.\d\d, guided \d\.\d\d, \d+\.\d\d s/step, eta \d+s", lines[0])
    assert lines[1].startswith("step 2/2: ") and lines[1].endswith(", eta 0s")


def test_resume_refuses_another_config(tiny_cfg):
    run(tiny_cfg("run.steps=1", "data.eval_limit=1"))
    with pytest.raises(RunError, match=r"(?s)another config.*algorithm.group_size: 4 -> 2"):
        run(tiny_cfg("run.steps=2", "data.eval_limit=1", "run.resume=true", "algorithm.group_size=2"))


def test_existing_run_directory_is_not_overwritten(tiny_cfg):
    run(tiny_cfg("run.steps=1", "data.eval_limit=1"))
    with pytest.raises(RunError, match=r"(?s)already holds a run.*run.resume=true"):
        run(tiny_cfg("run.steps=1", "data.eval_limit=1"))
    with pytest.raises(RunError, match="holds no run"):
        run(tiny_cfg("run.steps=1", "run.name=other", "run.resume=true"))


def test_records_without_hints_are_an_error_when_guiding(tiny_cfg, tmp_path):
    data = tmp_path / "nohint.jsonl"
    write_records(data, [Record("a", "Q:12+34=", "46", hint="+=1a+1b"), Record("b", "Q:13+34=", "47"), Record("c", "Q:14+34=", "48")])
    cfg = tiny_cfg("run.steps=1", f"data.train={data}", "data.reward=exact")
    with pytest.raises(RunError, match=r"(?s)2 unusable.*'b' has no hint.*'c' has no hint.*nemo-guide hints"):
        run(cfg)
    assert not cfg.run.run_dir.exists()  # refused before anything was written
    # The same data trains with GRPO (no hints needed).
    run(tiny_cfg("run.steps=1", f"data.train={data}", "data.reward=exact", "algorithm.mode=grpo", "run.name=grpo"))


def test_overlong_prompt_is_an_error(tiny_cfg, tmp_path):
    data = tmp_path / "long.jsonl"
    write_records(data, [Record("long", "Q:" + "1" * 100 + "+2=", "3", hint="h")])
    with pytest.raises(RunError, match=r"'long': the prompt has 105 tokens, more than 64"):
        run(tiny_cfg("run.steps=1", f"data.train={data}"))


class Recorder(Spy):
    """A Spy that also records every mini-batch handed to train_step and its keyword arguments."""

    def __init__(self, inner):
        super().__init__(inner)
        self.minis = []

    def train_step(self, batch, loss_fn, **kwargs):
        self.minis.append((batch, kwargs))
        return super().train_step(batch, loss_fn, **kwargs)


def _run_recorded(tiny_cfg, *overrides):
    cfg = tiny_cfg("run.steps=2", "data.eval_limit=2", *overrides)
    spy = Recorder(make_backend(cfg))
    summary = run(cfg, spy)
    rows = read_metrics(cfg.run.run_dir)
    assert summary["steps"] == cfg.run.steps and [r["step"] for r in rows] == list(range(cfg.run.steps + 1))
    assert all(r["optim/skipped"] == 0 for r in rows[1:])
    return cfg, spy, rows[1:]


def _groups(batch):
    """group id -> (rewards of its rows in the batch, guided flags)."""
    out = {}
    for g, r, gd in zip(batch.group.tolist(), batch.rewards.tolist(), batch.guided.tolist(), strict=True):
        out.setdefault(g, ([], []))
        out[g][0].append(r)
        out[g][1].append(gd)
    return out


def test_grpo_never_guides(tiny_cfg):
    _, spy, rows = _run_recorded(tiny_cfg, "algorithm.mode=grpo")
    assert all(r["train/guided_frac"] == 0 for r in rows)
    assert not any(batch.guided.any() for batch, _ in spy.minis)


def test_guide_grpo_trains_all_equal_groups_and_filter_grpo_drops_them(tiny_cfg):
    # The warm start solves known operators, so some groups are all correct.
    _, guide_spy, _ = _run_recorded(tiny_cfg, "run.name=guide")
    assert any(len(set(r)) == 1 for batch, _ in guide_spy.minis for r, _ in _groups(batch).values())
    _, spy, rows = _run_recorded(tiny_cfg, "algorithm.mode=filter_grpo", "run.name=filter")
    assert sum(r["train/filtered_frac"] for r in rows) > 0
    trained_steps = [r for r in rows if r["optim/updates"]]  # a step whose groups are all filtered has no update
    assert all(r["train/trained_rollouts"] == 0 for r in rows if not r["optim/updates"])
    for (batch, _), row in zip(spy.minis, trained_steps, strict=True):  # one mini-batch per trained step
        groups = _groups(batch)
        assert all(len(set(rewards)) == 2 for rewards, _ in groups.values())
        assert row["train/trained_rollouts"] == len(batch) < row["train/rollouts"]


def test_sft_trains_on_the_reference_solutions(tiny_cfg):
    from nemo_guide.data.sources import load_split

    cfg, spy, rows = _run_recorded(tiny_cfg, "algorithm.mode=sft")
    solutions = {r.solution for r in load_split(cfg.data.train, "train")}
    for batch, _ in spy.minis:
        assert len(batch) == cfg.data.prompt_batch_size
        assert all(spy.decode(ids) in solutions for ids in batch.response_ids)
    assert all(r["loss/sft_nll"] > 0 for r in rows)


def test_replace_trains_guided_groups_without_their_failed_plain_rollouts(tiny_cfg):
    _, spy, rows = _run_recorded(tiny_cfg, "algorithm.guided_group=replace", "algorithm.shaping=percentile", "algorithm.shaping_scope=rollout")
    guided_groups = 0
    for batch, _ in spy.minis:
        for rewards, guided in _groups(batch).values():
            if any(guided):
                guided_groups += 1
                assert all(guided), "a failed plain rollout was trained next to its guided replacements"
    assert guided_groups > 0
    assert all(r["guided/shaping_gamma"] > 0 for r in rows if r["train/guided_frac"] > 0)


def test_old_logprobs_on_the_plain_prompt_give_ratio_one_on_the_first_update(tiny_cfg):
    """The first micro-batch of a step sees the weights that scored pi_old: its ratio is exactly 1
    on every token when pi_old is scored on the plain prompt, but not for guided tokens when
    pi_old is scored on the hinted prompt (the paper's default)."""
    def first_ratios(*overrides):
        _, spy, _ = _run_recorded(tiny_cfg, "run.steps=1", "algorithm.guidance_threshold=always", *overrides)
        micro, new = spy.seen[0]
        mask = micro.loss_mask
        return (new - micro.old_logprobs)[mask], micro.guided[:, None].expand_as(mask)[mask]

    diff, guided = first_ratios("algorithm.old_logprob_context=plain", "run.name=plain")
    assert guided.any() and torch.equal(diff, torch.zeros_like(diff))
    diff, guided = first_ratios("run.name=sampling")
    assert diff[~guided].abs().max() == 0 and diff[guided].abs().max() > 1e-3


def test_ppo_epochs_and_mini_batches(tiny_cfg):
    _, spy, rows = _run_recorded(tiny_cfg, "algorithm.ppo_epochs=2", "optim.mini_batch_size=8", "algorithm.kl_coef=0.01")
    start = 0
    for row in rows:
        n = int(row["train/trained_rollouts"])
        updates = 2 * -(-n // 8)
        assert row["optim/updates"] == updates
        minis = [b for b, _ in spy.minis[start : start + updates]]
        start += updates
        half = updates // 2
        for epoch in (minis[:half], minis[half:]):  # every trained rollout once per epoch
            assert sum(len(b) for b in epoch) == n
        assert all(b.ref_logprobs is not None for b in minis)
    assert start == len(spy.minis)
    assert rows[-1]["plain/ratio_max"] != 1.0  # later mini-batches see updated weights
    assert all("loss/kl" in r for r in rows)


def test_mostly_incorrect_guides_prompts_below_a_quarter(tiny_cfg):
    _, spy, rows = _run_recorded(tiny_cfg, "algorithm.guidance_threshold=mostly_incorrect", "algorithm.aggregation=paper", "algorithm.entropy_coef=0.01")
    for batch, kwargs in spy.minis:
        assert kwargs["with_entropy"]
        for rewards, guided in _groups(batch).values():
            plain = [r for r, g in zip(rewards, guided, strict=True) if not g]
            assert (sum(plain) / len(plain) < 0.25) == any(guided)
    assert all("loss/entropy" in r for r in rows)


def test_hf_qwen2_trains_two_steps(tiny_cfg, tiny_qwen2_dir):
    # A random policy never earns the exact reward, so every advantage would be 0. Score by
    # response length instead (a fixed, non-constant rule) so that the update has a signal.
    class LengthParity:
        def __call__(self, prompts, completions, *, answers):
            return [float(len(c) % 2) for c in completions]

        def close(self):
            """Nothing to release."""

    cfg = tiny_cfg("run.steps=2", f"backend.model={tiny_qwen2_dir}", "data.eval_limit=2", "generation.max_new_tokens=24", "optim.lr=1e-3")
    backend = make_backend(cfg)
    assert isinstance(backend, TorchBackend) and backend.adapter.kind == "hf"
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    summary = run(cfg, backend, reward_fn=LengthParity())
    assert summary["steps"] == 2
    rows = read_metrics(cfg.run.run_dir)
    assert all(r["optim/skipped"] == 0 for r in rows[1:])
    assert rows[1]["optim/updates"] == 1 and rows[1]["train/trained_rollouts"] >= 16
    changed = [k for k, v in backend.model.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) == len(before)


def test_prompt_sampler_epochs_and_state():
    s = PromptSampler(5, seed=1)
    first = s.next(3) + s.next(3)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and s.state() == {"epoch": 1, "position": 1}
    resumed = PromptSampler(5, seed=1, **s.state())
    assert resumed.next(4) == s.next(4)


def test_cli_train_and_eval(tmp_path, capsys):
    from conftest import SMALL, TINY_CONF

    args = ["train", str(TINY_CONF), *SMALL, "run.steps=1", "data.eval_limit=2", f"run.output_dir={tmp_path}", "--no-progress"]
    assert main(args) == 0
    ckpt = tmp_path / "tiny_cpu" / "checkpoints" / "step_000001"
    assert ckpt.is_dir()
    capsys.readouterr()
    assert main(["eval", str(TINY_CONF), f"checkpoint={ckpt}", "data.eval_limit=4", "--n", "2", "--no-progress"]) == 0
    assert "| pass@1 (greedy) |" in capsys.readouterr().out
    result = json.loads((ckpt / "eval" / "results.json").read_text())
    assert result["model"] == str(ckpt) and result["unguided"]["micro"]["problems"] == 4
    # Bad input: a clear error and exit code 2.
    assert main(["train", str(TINY_CONF), "algorithm.group_sise=4"]) == 2
    assert "did you mean 'algorithm.group_size'" in capsys.readouterr().err


class NoTorchModel:
    """A PolicyBackend with no model: a fixed answer per prompt, zero log-probs, and updates
    that report themselves skipped on the steps listed. Enough to drive the loop's control flow
    without sampling a real policy (and proof that the protocols are all the loop needs)."""

    pad_id, eos_ids, max_length, chat_tokenizer = 0, (1,), None, None

    def __init__(self, skip_steps):
        self.skip_steps, self.steps, self.saved = set(skip_steps), 0, []

    def encode(self, text, *, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 1)

    def describe(self):
        return "no model"

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed):
        return [[ord("A"), ord(":"), ord(str(len(p) % 10)), 1] for p in prompts], [True] * len(prompts)

    def logprobs(self, batch, context, *, reference=False, with_entropy=False):
        zeros = torch.zeros(batch.loss_mask.shape)
        return zeros, (zeros.clone() if with_entropy else None)

    def train_step(self, batch, loss_fn, *, micro_batch_size, with_entropy=False):
        self.steps += 1
        return {"optim/skipped": float(self.steps in self.skip_steps), "optim/grad_norm": 0.0, "optim/lr": 0.0}

    def snapshot_reference(self):
        """Nothing to freeze."""

    def save(self, directory):
        self.saved.append(directory.name)

    def load(self, directory):
        raise AssertionError("not resumed in this test")

    def load_weights(self, directory):
        raise AssertionError("not evaluated in this test")


def test_skipped_updates_are_counted_and_three_in_a_row_stop_the_run(tiny_cfg):
    # One update per step; steps 1, 3, 4, 5 skip. Step 2's success resets the count, so the run
    # stops at step 5 (3 in a row), having logged steps 1-4 and checkpointed step 4.
    cfg = tiny_cfg("run.steps=8", "run.save_every=4", "data.eval_limit=1")
    backend = NoTorchModel(skip_steps={1, 3, 4, 5})
    with pytest.raises(RunError, match=r"(?s)step 5: every update of the last 3 steps had a non-finite.*Lower optim.lr.*step_000004"):
        run(cfg, backend)
    rows = read_metrics(cfg.run.run_dir)
    assert [r["optim/skipped"] for r in rows[1:]] == [1.0, 0.0, 1.0, 1.0]
    assert [name.split(".tmp")[0] for name in backend.saved] == ["step_000004"]  # written to a temp dir, then renamed
    state = json.loads((cfg.run.run_dir / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["skipped_updates"] == 3


def test_non_finite_loss_leaves_the_weights_unchanged(tiny_cfg):
    cfg = tiny_cfg("run.steps=5", "data.eval_limit=1", "data.prompt_batch_size=2", "algorithm.group_size=2")
    backend = make_backend(cfg)
    weights = {k: v.clone() for k, v in backend.model.state_dict().items()}

    def nan_loss(micro, logprobs, entropy, mini):
        return logprobs.sum() * float("nan"), {}

    with pytest.raises(RunError, match=r"(?s)last 3 steps had a non-finite"):
        run(cfg, backend, loss_fn=nan_loss)
    assert all(torch.equal(weights[k], v) for k, v in backend.model.state_dict().items())


def test_reduce_metrics():
    from nemo_guide.tracking import reduce_metrics

    parts = [{"a": torch.tensor(1.0), "x_min": 2.0, "x_max": 2.0, "n": 1.0}, {"a": float("nan"), "x_min": 1.0, "x_max": 5.0, "n": 1.0}, {"a": 3.0, "b": float("nan")}]
    out = reduce_metrics(parts, sums=("n",))
    assert out["a"] == 2.0 and out["x_min"] == 1.0 and out["x_max"] == 5.0 and out["n"] == 2.0
    assert math.isnan(out["b"])


def test_pinned_losses_of_the_first_two_steps(tiny_cfg):
    """A regression pin: the main job made small, seed 0, one thread. These values were measured
    before the loop was split into named steps and must not move without a reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg("run.steps=2", "data.eval_limit=2")
        run(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(cfg.run.run_dir)[1:]
    assert [r["train/reward"] for r in rows] == [0.0, 0.5]
    assert [r["train/guided_frac"] for r in rows] == [1.0, 0.5]
    assert [r["loss/policy"] for r in rows] == pytest.approx([0.016958996653556824, 0.01132410578429699], rel=1e-5)
    assert [r["optim/grad_norm"] for r in rows] == pytest.approx([0.04379206523299217, 0.06037895381450653], rel=1e-5)


def test_rollout_correction_tis_on_the_embedded_host(tiny_cfg):
    """algorithm.rollout_correction=tis through the named steps: the embedded sampler is the trainer, so
    the sampler/trainer gap is float noise and no weight is truncated; off (the default) logs no rollout/*."""
    cfg = tiny_cfg("run.steps=1", "data.eval_limit=2", "algorithm.rollout_correction=tis")
    run(cfg)
    row = read_metrics(cfg.run.run_dir)[-1]
    assert row["rollout/logprob_diff_mean"] < 1e-4 and row["rollout/logprob_diff_max"] < 1e-3
    assert row["rollout/tis_clip_frac"] == 0.0 and row["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert row["rollout/logprob_diff_mean_guided"] < 1e-4  # guided rows: the trainer behind the hint, as sampled
