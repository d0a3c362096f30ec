"""The setting that would make a plan fit: candidates aimed at the largest term, each re-planned.

Every candidate is a list of ``key=value`` overrides of the run config (what a user types on
the command line). Candidates are tried in order of how directly they shrink the largest
term; the first one whose plan fits (and whose layout megatron-core accepts) is the fix. When
none fits alone, the one with the lowest peak is reported as "not enough alone".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nemo_guide.planner.inputs import get
from nemo_guide.planner.plan import Plan


@dataclass(frozen=True)
class Fix:
    overrides: tuple[str, ...]
    plan: Plan

    @property
    def fits(self) -> bool:
        return self.plan.fits


def apply(cfg: Mapping[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(dict(cfg))
    for dotted, value in overrides:
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[last] = value
    return out


def _divisors_above(n: int, current: int, limit: int) -> list[int]:
    return [d for d in range(current + 1, limit + 1) if n % d == 0]


def candidates(cfg: Mapping[str, Any], plan: Plan) -> list[list[tuple[str, Any]]]:
    inp, lay, shape = plan.inputs, plan.inputs.layout, plan.inputs.shape
    term = plan.largest_term
    tp_up = [[("model.tensor_model_parallel_size", t)] for t in _divisors_above(shape.num_kv_heads, lay.tp, lay.gpus_per_node)]
    pp_up = [[("model.pipeline_model_parallel_size", p)] for p in _divisors_above(shape.num_layers, lay.pp, min(shape.num_layers, lay.world // lay.tp))
             if lay.world % (lay.tp * p) == 0]
    more_nodes = [[("trainer.num_nodes", lay.nodes * f)] for f in (2, 4)]
    halve = lambda key, start: [[(key, v)] for v in _halvings(start)]  # noqa: E731
    engine_batch = halve("model.ppo.rollout_micro_batch_size", inp.engine.max_batch)
    unload = [[("model.ppo.trt_llm.unload_engine_train", True)]] if inp.engine.enabled and not inp.engine.unload_during_training else []
    recompute = [] if inp.activations.recompute == "full" else [[("model.activations_checkpoint_granularity", "full"),
                                                                   ("model.activations_checkpoint_method", "uniform"),
                                                                   ("model.activations_checkpoint_num_layers", 1)]]
    sp = [[("model.sequence_parallel", True)]] if lay.tp > 1 and not lay.sequence_parallel else []
    offload = [[("model.ppo.offload_adam_states", True)]] if str(get(cfg, "model.optim.name")) == "distributed_fused_adam" and not inp.offload_optimizer else []
    sharded = [] if inp.precision.sharded else [[("model.optim.name", "distributed_fused_adam")]]
    by_term = {
        "weights": tp_up + pp_up,
        "gradients": tp_up + pp_up,
        "optimizer": sharded + (offload if plan.peak_phase == "rollout" else []) + more_nodes + tp_up + pp_up,
        "activations": sp + recompute + halve("model.micro_batch_size", inp.activations.micro_batch) + tp_up + pp_up,
        "logprobs": [[("model.guide_logprob_chunk_size", c)] for c in _halvings(inp.logprob_chunk) if c >= 128] + tp_up,
        "kv_cache": engine_batch + (unload if plan.peak_phase == "training" else []) + tp_up,
        "engine_workspace": engine_batch + (unload if plan.peak_phase == "training" else []) + tp_up,
        "engine_weights": (unload if plan.peak_phase == "training" else []) + tp_up + pp_up,
    }
    rest = sp + recompute + unload + offload + tp_up + pp_up + more_nodes
    return by_term.get(term, []) + [c for c in rest if c not in by_term.get(term, [])]


def _halvings(start: int) -> list[int]:
    out, v = [], start // 2
    while v >= 1:
        out.append(v)
        v //= 2
    return out


def find_fix(cfg: Mapping[str, Any], plan: Plan, replan: Callable[[Mapping[str, Any]], Plan]) -> Fix | None:
    """The first candidate whose plan fits, else the lowest-peak one; None when none can be planned."""
    best: Fix | None = None
    for overrides in candidates(cfg, plan):
        try:
            other = replan(apply(cfg, overrides))
        except ValueError:  # an override the config checks refuse (ConfigError is a ValueError)
            continue
        fix = Fix(tuple(f"{k}={_show(v)}" for k, v in overrides), other)
        if other.fits:
            return fix
        if not other.problems and (best is None or other.peak < best.plan.peak):
            best = fix
    return best


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
