"""Worker (GPU, NeMo-Aligner's image with TensorRT-LLM 0.13): a real engine for a tiny random
Qwen2 or Llama actor, probed against the Megatron actor.

Modes: ``guide`` (the Guide export: the probe must pass, at build and after a refit of changed
weights), ``nobias`` (the Guide export with the stock export's engine config, ``attn_bias``
false and no attention-bias weights: the probe must fail for Qwen2), ``stock`` (NeMo-Aligner's
own wrapper and NeMo 2.1's export: which bias weights the engine holds, and how its greedy
tokens compare with Megatron's). Usage: ``trt_engine_gpu.py OUT TMPDIR FAMILY MODE``; writes
``OUT.rank0``. Run by ``tests_aligner/test_trt_gpu.py`` (``gpu`` marker) only.
"""

import os
import sys
from pathlib import Path

os.environ["NEMO_GUIDE_GPU_TIER"] = "1"  # the real stack: no CPU patches
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actor_env

import torch

rank, world_size = actor_env.world()
out, tmp, family, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]

import tensorrt as trt
from nemo.export.trt_llm import tensorrt_llm_run
from nemo_aligner.utils.trt_llm import GPTGenerateTRTLLM

import nemo_guide.aligner.trt_engine as trt_engine
from nemo_guide.aligner.build import build_actor
from nemo_guide.aligner.config import ProbeSettings
from nemo_guide.aligner.host import AlignerHost
from nemo_guide.aligner.probe import run_probe
from nemo_guide.core.mismatch import greedy_disagreement

NEW_TOKENS = 16
model = actor_env.model_config(actor_env.char_tokenizer(tmp / "tok"), hidden=64, qkv_bias=family == "qwen2", seq_len=128)
model["init_method_std"] = 0.3  # peaked distributions: greedy decisions are not near-ties
model["ppo"].update(rollout_micro_batch_size=4, trt_model_dir=str(tmp / "engine"), length_params=dict(max_length=NEW_TOKENS, min_length=0),
                    trt_llm=dict(enable=True, max_input_len=32, model_type="llama", unload_engine_train=False, seed=0))
cfg = actor_env.full_config(model, devices=world_size)
cfg.trainer.accelerator = "gpu"
actor = build_actor(cfg, optimizer_steps=1).actor
if family == "qwen2":
    with torch.no_grad():
        for name, p in actor.model.named_parameters():
            if name.endswith("linear_qkv.bias"):
                p.normal_(0.0, 1.0)

if mode == "nobias":  # the Guide wrapper, with the engine config and weights the stock export produces
    config, weights = trt_engine.trtllm_config, trt_engine.rank_engine_weights
    trt_engine.trtllm_config = lambda *a, **k: {**config(*a, **k), "attn_bias": False}
    trt_engine.rank_engine_weights = lambda *a, **k: {n: w for n, w in weights(*a, **k).items() if not n.endswith(("attention.qkv.bias", "attention.dense.bias"))}
if mode == "stock":
    actor.trtllm_generate = trt_engine.engine_from_config(actor.cfg, actor.tokenizer, cls=GPTGenerateTRTLLM)
host = AlignerHost(actor, None, None, grad_clip=1.0, rollout_micro_batch_size=4)
prompts = [[1] + [4 + (7 * i + j) % 90 for j in range(3 + i % 5)] for i in range(8)]
payload = {"family": family, "mode": mode}

if mode == "stock":
    host._inference()  # NeMo 2.1's build
    engine = tensorrt_llm_run.tensorrt_llm_worker_context.decoder.session.runtime.engine
    names = list(trt.Refitter(engine, trt.Logger(trt.Logger.ERROR)).get_all_weights())
    payload["engine_qkv_bias_weights"] = sum(n.endswith("attention.qkv.bias") for n in names)
    actor.trtllm_generate.sampling_config.update(top_k=1)
    lengths = torch.tensor([len(p) for p in prompts[:4]])
    text = torch.full((4, int(lengths.max()) + NEW_TOKENS), actor.tokenizer.eos_id, dtype=torch.long)
    for i, p in enumerate(prompts[:4]):
        text[i, : len(p)] = torch.tensor(p)
    result = actor.infer({"text": text, "length": lengths})
    tokens, ends = result["response_tokens"].cpu(), result["response_lengths"].cpu()
    engine_greedy = [tokens[i, len(p) : int(ends[i])].tolist() for i, p in enumerate(prompts[:4])]
    megatron_greedy = host.greedy(prompts[:4], max_new_tokens=NEW_TOKENS, engine=False)
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence([torch.tensor(r or [0]) for r in rows], batch_first=True, padding_value=-1)  # noqa: E731
    decisions, differ = greedy_disagreement(pad(engine_greedy), torch.tensor([len(r) for r in engine_greedy]), pad(megatron_greedy), torch.tensor([len(r) for r in megatron_greedy]))
    payload.update(greedy_decisions=int(decisions), greedy_disagreements=int(differ))
else:
    settings = ProbeSettings()
    kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, seed=0)
    first = run_probe(host, prompts, settings, step=0, **kwargs)
    payload["build"] = {**first.metrics(), "failures": first.failures(settings), "tokens": first.tokens, "report": first.format(settings)}
    host._training()
    with torch.no_grad():  # new weights, as after an update: the next inference phase refits
        for p in actor.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    second = run_probe(host, prompts, settings, step=1, **kwargs)
    payload["refit"] = {**second.metrics(), "failures": second.failures(settings), "tokens": second.tokens, "report": second.format(settings)}
    payload["timings"] = actor.trtllm_generate.pop_timings()
actor_env.write(out, rank, payload)
