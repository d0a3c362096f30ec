"""Worker: Guide-GRPO steps through the whole plugin (train.run) on a tiny random model.

Usage: ``train_steps.py OUT TMPDIR STEPS [SAVE_EVERY [SIGNAL_AT]]`` under torchrun (DP = world size);
with SIGNAL_AT, every rank sends itself Slurm's time-limit signal (SIGUSR1) during step SIGNAL_AT.
The digit-ops records, k = 4 rollouts of <= 8 tokens for B = 4 prompts, one rollout per
generation micro-batch (so the samples do not depend on the data-parallel layout), and a
reward that is a fixed function of the text, so groups are mixed and some prompts get hints.
Writes ``OUT.rank<r>``: the metrics rows of rank 0 and a checksum of this rank's weights.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor_env


rank, world_size = actor_env.world()
out, tmp, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
save_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
signal_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0

from nemo_guide.aligner.train import run


class LengthReward:
    """1 for completions whose length is a multiple of 3: mixed groups from a random policy."""

    def __call__(self, prompts, completions, *, answers):
        return [1.0 if len(c) % 3 == 0 else 0.0 for c in completions]

    def close(self):
        pass


guide = dict(
    algorithm=dict(mode="guide_grpo", group_size=4, guidance_threshold="mostly_incorrect"),
    generation=dict(max_new_tokens=8, temperature=1.0),
    data=dict(train="builtin:digit_ops", eval=None, prompt_batch_size=4, hint_template="H:{hint};{problem}", max_prompt_tokens=40),
    run=dict(steps=steps, seed=3, eval_every=0, save_every=save_every, log_every=1, name="t", output_dir=str(tmp / "runs")),
)
model = actor_env.model_config(actor_env.char_tokenizer(tmp / "tok"), micro_batch_size=3, global_batch_size=6)
model["ppo"]["rollout_micro_batch_size"] = 1
cfg = actor_env.full_config(model, devices=world_size, exp_dir=tmp / "exp", guide=guide)
if signal_at:
    import os
    import signal

    import nemo_guide.aligner.train as train_module
    from nemo_guide.aligner.preempt import StopRequest

    class SignalDuringStep(StopRequest):
        """The real handler and agreement; the signal arrives just before the step's end."""

        asked = 0

        def __call__(self) -> bool:
            SignalDuringStep.asked += 1
            if SignalDuringStep.asked == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().__call__()

    train_module.StopRequest = SignalDuringStep
from nemo_guide.aligner.preempt import Preempted

try:
    history, preempted = run(cfg, reward_fn=LengthReward(), log=lambda msg: None), None
except Preempted as exc:
    history, preempted = {}, exc.step

from nemo_guide.tracking import read_metrics

rows = read_metrics(tmp / "exp" / "guide") if rank == 0 else []
weights = {}
import nemo_guide.aligner.host  # noqa: F401

actor_env.write(out, rank, {"rows": rows, "history": history, "preempted": preempted, "checkpoints": sorted(p.name for p in (tmp / "exp" / "checkpoints").glob("*")) if (tmp / "exp" / "checkpoints").exists() else []})
