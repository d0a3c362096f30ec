"""``nemo-guide doctor``: what this machine (or image) has of the pinned NeMo-Aligner stack, and
which features of the plugin it can use, with the reason when it cannot.

Versions come from the installed distributions' metadata (no import); usability from importing
the module each feature needs, in one guarded place (this module), so a missing or broken
package is reported in one line instead of a traceback. Runs on CPU: without CUDA every GPU
feature says so.

:data:`STACK` holds the versions NeMo-Aligner 0.7.0's Dockerfile pins; ``containers/Dockerfile``,
``constraints/aligner-cpu.txt`` and ``setup.cfg`` must agree with it (``tests/test_containers.py``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import warnings
from dataclasses import asdict, dataclass

STACK = {"nemo_toolkit": "2.1.0", "nemo_aligner": "0.7.0", "megatron_core": "0.10.0", "tensorrt_llm": "0.13.0"}
"""Distribution -> version of NeMo-Aligner 0.7.0's stack (its Dockerfile: NeMo v2.1.0, Megatron core_r0.10.0, TRT-LLM v0.13.0)."""
BASE_IMAGE = "nvcr.io/nvidia/pytorch:24.07-py3"
"""The NGC image NeMo-Aligner 0.7.0's Dockerfile builds on."""

COMPONENTS = {
    "torch": ("torch",),
    "NeMo": ("nemo_toolkit", "nemo-toolkit"),
    "NeMo-Aligner": ("nemo_aligner", "nemo-aligner"),
    "megatron-core": ("megatron_core", "megatron-core"),
    "TensorRT-LLM": ("tensorrt_llm", "tensorrt-llm"),
    "TransformerEngine": ("transformer_engine", "transformer-engine", "transformer_engine_torch"),
    "apex": ("apex",),
    "transformers": ("transformers",),
}


@dataclass(frozen=True)
class Feature:
    name: str
    setting: str
    """The config key or command that uses it."""
    usable: bool
    reason: str
    """Why not (empty when usable), or a caveat."""


def installed_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    return {label: installed_version(names) for label, names in COMPONENTS.items()}


def pin_problems(found: dict[str, str | None] | None = None) -> list[str]:
    """Each stack distribution whose installed version is not the pinned one."""
    found = versions() if found is None else found
    labels = {"nemo_toolkit": "NeMo", "nemo_aligner": "NeMo-Aligner", "megatron_core": "megatron-core", "tensorrt_llm": "TensorRT-LLM"}
    out = []
    for dist, pinned in STACK.items():
        have = found.get(labels[dist])
        if have is None:
            out.append(f"{labels[dist]} is not installed (pinned {pinned})")
        elif have.split("+")[0] != pinned:
            out.append(f"{labels[dist]} {have} is installed, the stack pins {pinned}")
    return out


def _probe(module: str) -> str:
    """'' when ``module`` imports, else the error in one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback notices (no TE/Apex) are not the answer asked for
            importlib.import_module(module)
    except BaseException as exc:  # a broken package may raise anything at import, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"import {module} failed: {type(exc).__name__}: {first}"[:300]
    return ""


def cuda() -> dict[str, object]:
    """torch's CUDA build and the visible devices."""
    try:
        import torch
    except ImportError as exc:
        return {"torch_cuda": None, "available": False, "devices": [], "error": str(exc)}
    available = torch.cuda.is_available()
    devices = []
    if available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"{props.name} ({props.total_memory / 2**30:.1f} GiB)")
    return {"torch_cuda": torch.version.cuda, "available": available, "devices": devices,
            "bf16": bool(available and torch.cuda.is_bf16_supported())}


def features(*, imports: bool = True, gpu: dict | None = None) -> list[Feature]:
    """Each plugin feature with whether it is usable here. ``imports=False`` skips the import
    probes (an image build has no GPU and must not initialise one)."""
    gpu = cuda() if gpu is None else gpu
    found = versions()
    no_gpu = "" if gpu["available"] else "no CUDA device visible"

    def check(name: str, setting: str, needs: list[str], module: str | None, *, gpu_needed: bool = True) -> Feature:
        missing = [n for n in needs if found.get(n) is None]
        if missing:
            return Feature(name, setting, False, f"{', '.join(missing)} not installed (use the image of containers/Dockerfile)")
        why = _probe(module) if (module and imports) else ""
        if not why and gpu_needed and no_gpu:
            why = no_gpu
        caveat = "" if (module is None or imports) else "import not checked (--no-import)"
        return Feature(name, setting, not why, why or caveat)

    out = [Feature("config checks and memory planner", "nemo-guide plan CONFIG", True, "")]
    stack = check("NeMo-Aligner trainer", "python -m nemo_guide.aligner.train",
                  ["NeMo", "NeMo-Aligner", "megatron-core", "transformers"], "nemo_guide.aligner.build")
    pins = [p for p in pin_problems(found) if "TensorRT-LLM" not in p]
    if stack.usable and pins:
        stack = Feature(stack.name, stack.setting, True, "untested versions: " + "; ".join(pins))
    out.append(stack)
    out.append(check("TensorRT-LLM rollouts", "model.ppo.trt_llm.enable=true", ["TensorRT-LLM"], "tensorrt_llm"))
    out.append(check("TransformerEngine layers", "model.transformer_engine=true", ["TransformerEngine"], "transformer_engine.pytorch"))
    out.append(check("Apex distributed Adam (and its CPU offload)", "model.optim.name=distributed_fused_adam", ["apex"],
                     "apex.contrib.optimizers.distributed_fused_adam"))
    out.append(check("megatron-core distributed optimizer", "model.optim.name=mcore_distributed_optim", ["megatron-core"], "megatron.core.optimizer"))
    out.append(check("Triton fused log-prob kernels", "NEMO_GUIDE_LOGPROBS_IMPL=triton", [], "triton"))
    bf16 = bool(gpu.get("bf16"))
    out.append(Feature("bf16 training", "trainer.precision=bf16", bf16, "" if bf16 else (no_gpu or "this GPU has no bf16 support")))
    return out


def report(*, imports: bool = True) -> dict[str, object]:
    """Everything ``nemo-guide doctor --json`` prints."""
    gpu = cuda()
    return {
        "python": platform.python_version(),
        "versions": versions(),
        "cuda": gpu,
        "stack_pins": dict(STACK),
        "pin_problems": pin_problems(),
        "features": [asdict(f) for f in features(imports=imports, gpu=gpu)],
    }


def render(rep: dict[str, object]) -> str:
    lines = [f"python {rep['python']}"]
    for label, version in rep["versions"].items():
        lines.append(f"{label:<18} {version or 'not installed'}")
    gpu = rep["cuda"]
    devices = ", ".join(gpu["devices"]) or "none visible"
    lines.append(f"{'CUDA':<18} {gpu.get('torch_cuda') or 'CPU-only torch build'}; devices: {devices}")
    pins = rep["pin_problems"]
    lines.append("stack pins: " + ("all match" if not pins else "; ".join(pins)))
    for f in rep["features"]:
        mark = "yes" if f["usable"] else "NO "
        lines.append(f"[{mark}] {f['name']} ({f['setting']})" + (f": {f['reason']}" if f["reason"] else ""))
    return "\n".join(lines)
