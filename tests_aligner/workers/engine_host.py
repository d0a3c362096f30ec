"""Worker: the plugin's TensorRT-LLM path end to end on CPU, with a stand-in for the engine.

``train.run`` with ``model.ppo.trt_llm.enable`` (the probe at start-up and every 2 steps,
``algorithm.rollout_correction=tis``), where the engine wrapper is :class:`StandInEngine`: the
wrapper's interface (``refit``, ``generate``, ``free``, ``options``, ``last_logprobs``,
``pop_timings``) over Megatron's own generation, which *refuses any call whose batch is not the
engine's fixed batch*, and reports the actor's log-probs as the sampler's. So everything but
TensorRT-LLM itself runs: the config checks, the engine batches padded with inert prompts, the
probe, the sampler log-probs into the correction, the metrics. Usage: ``engine_host.py OUT TMPDIR``.
"""

import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor_env

import torch

rank, world_size = actor_env.world()
out, tmp = sys.argv[1], Path(sys.argv[2])

import nemo_aligner.models.nlp.gpt.megatron_gpt_ppo_actor as aligner_actor

import nemo_guide.aligner.trt_engine as trt_engine
from nemo_guide.aligner.train import run
from nemo_guide.steps import build_batch

BATCH = 3
CALLS = []


class StandInEngine:
    def __init__(self, actor):
        self.actor, self.compiled = actor, False
        self._greedy = self._logprobs = False
        self.last_logprobs, self.timings = None, {}

    def refit(self, model):
        key = "refit" if self.compiled else "engine_build"
        self.compiled = True
        self.timings[key] = self.timings.get(key, 0.0) + 1e-3
        time.sleep(1e-3)

    def free(self):
        pass

    def pop_timings(self):
        out, self.timings = self.timings, {}
        return out

    @contextmanager
    def options(self, *, greedy=False, logprobs=False):
        self._greedy, self._logprobs = greedy, logprobs
        try:
            yield
        finally:
            self._greedy = self._logprobs = False

    def generate(self, inputs):
        tokens, lengths = inputs
        CALLS.append(tokens.shape[0])
        if tokens.shape[0] != BATCH:
            raise AssertionError(f"the engine got {tokens.shape[0]} rows, not its batch {BATCH}")
        actor, saved = self.actor, dict(self.actor._sampling_params)
        actor.use_trtllm_generation = False
        if self._greedy:
            actor._sampling_params.update(use_greedy=True)
        try:
            result = actor.infer({"text": tokens, "length": lengths})
        finally:
            actor.use_trtllm_generation, actor._sampling_params = True, saved
        ids, ends = result["response_tokens"].cpu(), result["response_lengths"].cpu()
        if self._logprobs:
            prompts = [tokens[i, : int(lengths[i])].tolist() for i in range(BATCH)]
            responses = [ids[i, int(lengths[i]) : int(ends[i])].tolist() for i in range(BATCH)]
            batch = build_batch(prompts, prompts, responses, torch.zeros(BATCH), torch.arange(BATCH), torch.zeros(BATCH, dtype=torch.bool), torch.ones(BATCH, dtype=torch.bool))
            lp, _ = actor.guide_logprobs(batch, "sample")
            self.last_logprobs = torch.zeros(ids.shape, dtype=torch.float32)
            for i in range(BATCH):
                self.last_logprobs[i, int(lengths[i]) : int(ends[i])] = lp[i, : int(ends[i]) - int(lengths[i])]
        return {"response_tokens": result["response_tokens"], "response_lengths": result["response_lengths"]}


class NoEngine:  # what Aligner's own actor __init__ would build (it needs TensorRT-LLM); replaced by the Guide actor
    def __init__(self, **kwargs):
        pass


aligner_actor.GPTGenerateTRTLLM = NoEngine


class LengthReward:
    def __call__(self, prompts, completions, *, answers):
        return [1.0 if len(c) % 3 == 0 else 0.0 for c in completions]

    def close(self):
        pass


guide = dict(
    algorithm=dict(mode="guide_grpo", group_size=4, guidance_threshold="mostly_incorrect", rollout_correction="tis"),
    generation=dict(max_new_tokens=8, temperature=1.0),
    data=dict(train="builtin:digit_ops", eval=None, prompt_batch_size=4, hint_template="H:{hint};{problem}", max_prompt_tokens=40),
    run=dict(steps=3, seed=3, eval_every=0, save_every=0, log_every=1, name="t", output_dir=str(tmp / "runs")),
)
model = actor_env.model_config(actor_env.char_tokenizer(tmp / "tok"), micro_batch_size=3, global_batch_size=6, seq_len=64)
model["ppo"].update(rollout_micro_batch_size=BATCH, length_params=dict(max_length=8, min_length=0),
                    trt_llm=dict(enable=True, max_input_len=48, probe_every=2, probe_prompts=5))
cfg = actor_env.full_config(model, devices=world_size, exp_dir=tmp / "exp", guide=guide)

# the Guide actor builds its engine wrapper through trt_engine.engine_from_config: here, the stand-in
from nemo_guide.aligner import actor as guide_actor

original_init = guide_actor.MegatronGPTGuideActorModel.__init__


def init(self, cfg, trainer):
    original_init(self, cfg, trainer)
    self.trtllm_generate = StandInEngine(self)


trt_engine.engine_from_config = lambda cfg, tokenizer: None
guide_actor.MegatronGPTGuideActorModel.__init__ = init
logged = []
history = run(cfg, reward_fn=LengthReward(), log=logged.append)

from nemo_guide.tracking import read_metrics

rows = read_metrics(tmp / "exp" / "guide") if rank == 0 else []
actor_env.write(out, rank, {"rows": rows, "history": history, "calls": CALLS, "logged": logged})
