"""Capacity planner: will this model, layout and Guide-GRPO step fit the GPUs, and if not, what fixes it.

``nemo-guide plan CONFIG`` and ``python -m nemo_guide.aligner.train`` (before anything is built)
call :func:`plan_config`. Pure Python: imports neither torch nor NeMo.

``--json`` prints :func:`plan_json`, one object with these keys (memory in GiB per GPU, on the
heaviest GPU: the pipeline stage holding the most):

- ``config``: the file planned; ``gpu_memory_gib``: the memory each GPU has;
- ``model``: ``params`` (total), ``params_per_gpu`` (heaviest stage), ``layers``, ``hidden``,
  ``ffn``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``;
- ``layout``: ``nodes``, ``gpus_per_node``, ``world``, ``tp``, ``pp``, ``dp``,
  ``sequence_parallel``, ``micro_batch_size``, ``optimizer`` (bytes/param of weights,
  gradients and unsharded state, and whether the state is sharded), ``recompute``, ``flash``;
- ``terms_gib``: ``weights``, ``gradients``, ``optimizer`` (after sharding), ``activations``
  (training peak on the first stage), ``logprobs`` (fused log-prob peak, what the plugin runs),
  ``logprobs_naive`` (Aligner's full-logit log-probs, for comparison: counted nowhere),
  ``engine_weights``, ``kv_cache``, ``engine_workspace`` (rollout engine), ``runtime_reserve``;
- ``phases_gib``: ``rollout`` and ``training``, each ``{term: GiB}`` held at once plus ``total``;
- ``peak_gib``, ``peak_phase``, ``fits`` (bool), ``largest_term``, ``problems`` (layout errors);
- ``fix``: null when it fits, else ``{"overrides": ["key=value", ...], "peak_gib", "fits"}``
  (``fits`` false: the best single setting found is not enough alone);
- ``tokens``: per step ``prompts_per_step``, ``rollouts_per_step_min``/``_max`` (plain only /
  every prompt guided), ``generated_tokens_per_step_max``, ``rollout_tokens_per_step_max``,
  ``train_tokens_per_step_max``, ``seq_len``, ``rollouts_per_replica_max``,
  ``engine_calls_per_replica_max``, ``optimizer_steps_per_step_max``, ``micro_batches_per_replica``;
- ``verdict``: the one-line verdict the text report ends with.
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_guide.planner.fixes import Fix, find_fix
from nemo_guide.planner.inputs import plan_inputs
from nemo_guide.planner.memory import GIB
from nemo_guide.planner.plan import Plan, make_plan

FIXES = {
    "weights": "spread the weights over more GPUs (TP within a node, or PP)",
    "gradients": "spread the gradient buffer over more GPUs (TP or PP)",
    "optimizer": "shard or spread the optimizer state",
    "activations": "store fewer activations (recompute, smaller micro-batches, sequence parallelism)",
    "logprobs": "shrink the log-prob chunk or spread the vocabulary over more TP ranks",
    "kv_cache": "generate fewer sequences per engine call",
    "engine_workspace": "generate fewer sequences per engine call",
    "engine_weights": "free the engine during training or spread it over more GPUs",
}


def plan_config(cfg: Mapping[str, Any], *, nodes: int | None = None, gpus_per_node: int | None = None,
                gpu_memory_gib: float = 80.0, source: str = "config") -> tuple[Plan, Fix | None]:
    """The plan of a plain-container run config and, when it does not fit, the fix found."""

    def replan(c: Mapping[str, Any]) -> Plan:
        return make_plan(plan_inputs(c, gpu_memory_gib=gpu_memory_gib, source=source))

    base = dict(cfg)
    if nodes is not None or gpus_per_node is not None:
        trainer = dict(base.get("trainer") or {})
        trainer.update({k: v for k, v in (("num_nodes", nodes), ("devices", gpus_per_node)) if v is not None})
        base["trainer"] = trainer
    plan = replan(base)
    return plan, (None if plan.fits else find_fix(base, plan, replan))


def check_memory(cfg: Mapping[str, Any], *, gpu_memory_gib: float, source: str = "config") -> Plan | None:
    """What ``python -m nemo_guide.aligner.train`` runs before building anything: the plan of
    ``cfg`` (its own layout) on GPUs of ``gpu_memory_gib``. Returns None (and says why on stderr)
    when the model's shape is unknown.

    Raises:
        RunError: the run does not fit (or cannot start); the message is the verdict with its fix.
    """
    import sys

    from nemo_guide.errors import RunError

    try:
        plan, fix = plan_config(cfg, gpu_memory_gib=gpu_memory_gib, source=source)
    except RunError as exc:
        if "shape is unknown" not in str(exc):
            raise
        print(f"memory check skipped: {exc}", file=sys.stderr)
        return None
    if not plan.fits:
        raise RunError(f"{source}: {verdict(plan, fix)}. Details: nemo-guide plan <config>; to start anyway set model.guide_memory_check=false")
    return plan


def gib(value: float) -> float:
    return round(value / GIB, 2)


def verdict(plan: Plan, fix: Fix | None) -> str:
    mem = plan.inputs.gpu_memory_gib
    if plan.problems:
        return "does not start: " + "; ".join(plan.problems)
    if plan.fits:
        return f"fits: peak {gib(plan.peak)} GiB of {mem:g} GiB per GPU ({plan.peak_phase} phase; largest term {plan.largest_term})"
    term = plan.largest_term
    head = (f"does not fit: peak {gib(plan.peak)} GiB > {mem:g} GiB per GPU in the {plan.peak_phase} phase; "
            f"largest term {term} ({gib(plan.terms[term])} GiB): {FIXES.get(term, 'reduce it')}")
    if fix is None:
        return head + "; no single setting found that helps"
    said = " ".join(fix.overrides)
    if fix.fits:
        return head + f"; fix: {said} (peak {gib(fix.plan.peak)} GiB)"
    return head + f"; best single setting {said} brings the peak to {gib(fix.plan.peak)} GiB, not enough alone"


def plan_json(plan: Plan, fix: Fix | None, *, config: str = "") -> dict[str, Any]:
    inp, lay, shape, prec = plan.inputs, plan.inputs.layout, plan.inputs.shape, plan.inputs.precision
    from nemo_guide.planner.memory import stage_params

    return {
        "config": config,
        "gpu_memory_gib": inp.gpu_memory_gib,
        "model": {"params": shape.total_params(), "params_per_gpu": round(stage_params(shape, lay.tp, lay.pp)), "layers": shape.num_layers,
                  "hidden": shape.hidden_size, "ffn": shape.ffn_hidden_size, "heads": shape.num_heads, "kv_heads": shape.num_kv_heads,
                  "head_dim": shape.head_dim, "vocab": shape.vocab_size},
        "layout": {"nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node, "world": lay.world, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                   "sequence_parallel": lay.sequence_parallel, "micro_batch_size": inp.activations.micro_batch,
                   "optimizer": {"param_bytes": prec.param_bytes, "grad_bytes": prec.grad_bytes, "state_bytes": prec.state_bytes, "sharded": prec.sharded},
                   "recompute": inp.activations.recompute, "flash": inp.activations.flash},
        "terms_gib": {k: gib(v) for k, v in plan.terms.items()},
        "phases_gib": {p: {**{k: gib(v) for k, v in terms.items()}, "total": gib(plan.phase_total(p))} for p, terms in plan.phases.items()},
        "peak_gib": gib(plan.peak),
        "peak_phase": plan.peak_phase,
        "fits": plan.fits,
        "largest_term": plan.largest_term,
        "problems": list(plan.problems),
        "fix": None if fix is None else {"overrides": list(fix.overrides), "peak_gib": gib(fix.plan.peak), "fits": fix.fits},
        "tokens": dict(plan.tokens),
        "verdict": verdict(plan, fix),
    }


def plan_text(plan: Plan, fix: Fix | None, *, config: str = "") -> str:
    d = plan_json(plan, fix, config=config)
    m, lay = d["model"], d["layout"]
    lines = [
        f"{config}: {m['params'] / 1e9:.2f}B parameters ({m['layers']} layers, hidden {m['hidden']}, ffn {m['ffn']}, heads {m['heads']}/{m['kv_heads']} KV, vocab {m['vocab']})",
        f"layout: {lay['nodes']} nodes x {lay['gpus_per_node']} GPUs, TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}"
        f"{', sequence parallel' if lay['sequence_parallel'] else ''}, micro-batch {lay['micro_batch_size']}, "
        f"recompute {lay['recompute'] or 'none'}, {'flash' if lay['flash'] else 'unfused'} attention; {m['params_per_gpu'] / 1e9:.2f}B parameters per GPU",
        f"per GPU (GiB)          {'rollout':>9} {'training':>9}",
    ]
    for term in ("weights", "gradients", "optimizer", "activations", "logprobs", "engine_weights", "kv_cache", "engine_workspace", "runtime_reserve"):
        cells = [f"{d['phases_gib'][p][term]:9.2f}" if term in d["phases_gib"][p] else f"{'-':>9}" for p in ("rollout", "training")]
        lines.append(f"  {term:<20} {' '.join(cells)}")
    lines.append(f"  {'total':<20} {d['phases_gib']['rollout']['total']:9.2f} {d['phases_gib']['training']['total']:9.2f}")
    lines.append(f"  (naive full-logit log-probs would hold {d['terms_gib']['logprobs_naive']:.2f} GiB instead of {d['terms_gib']['logprobs']:.2f})")
    t = d["tokens"]
    lines.append(f"per step: {t['prompts_per_step']} prompts, {t['rollouts_per_step_min']}-{t['rollouts_per_step_max']} rollouts, "
                 f"<= {t['generated_tokens_per_step_max']:,} generated tokens, <= {t['train_tokens_per_step_max']:,} training tokens "
                 f"(rows of {t['seq_len']}), {t['micro_batches_per_replica']} micro-batches per replica per optimizer step")
    lines.append(d["verdict"])
    return "\n".join(lines)
