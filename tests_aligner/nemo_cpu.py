"""Test-side patches that let NeMo 2.1 + NeMo-Aligner 0.7.0 run on a CPU-only machine.

Measured in ``../shared/notes/aligner-plugin.md`` and ``cpu-stack.md``; each one was
confirmed necessary there. They live in the test tier only: the package never patches
NeMo, Megatron or torch. Call :func:`install` once per process, before importing NeMo.

1. ``NVIDIA_PYTORCH_VERSION`` set (NeMo parses it and fails on None), and
   ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (torch 2.4's ``torch.load`` default, which NeMo's
   checkpoints of OmegaConf objects rely on).
2. Import stubs for ``tensorrt_llm``, ``tensorrt``, ``pytriton`` and ``mpi4py``, which
   NeMo and Aligner import unguarded.
3. ``torch.cuda`` device, RNG and cache calls pointed at the CPU.
4. A ``TorchFunctionMode`` rewriting ``device="cuda"`` to CPU; ``Tensor.cuda()`` and
   ``Module.cuda()`` return their receiver.
5. ``nlp_overrides.HAVE_APEX = True`` plus placeholders for apex's fused norms and
   ``listify_model``.
6. megatron-core's ``set_defaults_if_not_set_tensor_model_parallel_attributes`` visible to
   NeMo's ``build_model``.
7. NeMo's ``get_specs`` returns megatron-core's local layer spec (no TransformerEngine).
8. Lightning's ``MPIEnvironment.detect`` returns False (it would probe the mpi4py stub).
9. ``get_megatron_pretrained_bert_models`` returns ``[]`` (its BERT spec needs TE).
10. ``setup_transformer_engine_cp_groups`` does nothing (it creates a CUDA stream for TE).
11. The tensor-parallel RNG tracker is seeded with NeMo's seed (NeMo does it only when
    ``torch.cuda.device_count() > 0``).
13. torch Adam's per-parameter 0-dim ``step`` is checkpointed as an object per shard
    (megatron-core expects apex's per-group step).
14. NeMo's checkpoint I/O writes torch_dist synchronously (megatron-core 0.10's writer
    forks and uses a private API of torch < 2.7).
12. Aligner's gradient clipping uses a torch version of NeMo's ``clip_grad_norm_fp32``
    (NeMo's needs apex's ``amp_C`` kernels and CUDA tensors).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpu(TorchFunctionMode):
    """Every ``device=cuda`` becomes CPU; ``Tensor.cuda()`` returns the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if kwargs.get("device") is not None and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _Stub(types.ModuleType):
    """A module whose every attribute is another stub (enough for unguarded imports)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        # Capitalised names are used as classes (annotations, base classes, isinstance).
        value = type(name, (), {"__module__": self.__name__}) if name[:1].isupper() else _Stub(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:  # used as a decorator at import time
            return args[0]
        raise RuntimeError(f"{self.__name__} is a CPU test stub; the real package is not installed")

    def __mro_entries__(self, bases):
        return (object,)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``tensorrt_llm``, ``tensorrt``, ``pytriton``, ``mpi4py`` and their submodules yield stubs."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


STUBBED = ("tensorrt_llm", "tensorrt", "pytriton", "mpi4py")


def _stub_packages() -> None:
    sys.meta_path.insert(0, _StubFinder())


def _patch_cuda() -> None:
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it: a CPU seed would recurse
    torch.cuda.empty_cache = lambda: None
    torch.cuda.LongTensor = torch.LongTensor
    torch.cuda.FloatTensor = torch.FloatTensor
    torch.cuda.BoolTensor = torch.BoolTensor
    torch.cuda.IntTensor = torch.IntTensor
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_nemo() -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import layers as mlayers

    from nemo.collections.nlp.models.language_modeling import megatron_gpt_model
    from nemo.collections.nlp.modules.common.megatron import build_model as nemo_build
    from nemo.collections.nlp.parts import nlp_overrides
    from nemo.core.classes import modelPT

    from nemo.collections.nlp.modules.common.megatron import utils as megatron_utils

    nlp_overrides.HAVE_APEX = True
    for module in (nlp_overrides, megatron_utils):
        # isinstance targets only: apex's fused norms and distributed optimizers
        for name in ("FusedLayerNorm", "FastLayerNorm", "MixedFusedRMSNorm", "MegatronDistributedFusedAdam", "McoreDistributedOptimizer"):
            if not hasattr(module, name):
                setattr(module, name, type(name, (), {}))
    listify = lambda model: model if isinstance(model, list) else [model]  # noqa: E731  (apex's helper)
    for module in (nlp_overrides, megatron_utils):
        if not hasattr(module, "listify_model"):
            module.listify_model = listify
    nemo_build.set_defaults_if_not_set_tensor_model_parallel_attributes = mlayers.set_defaults_if_not_set_tensor_model_parallel_attributes
    megatron_gpt_model.get_specs = lambda *a, **k: get_gpt_layer_local_spec()
    modelPT.ModelPT.cuda = lambda self, *a, **k: self
    from nemo.collections.nlp.models.language_modeling import megatron_base_model

    # context-parallel groups for TransformerEngine: a CUDA stream, and nothing to do without TE
    megatron_base_model.MegatronBaseModel.setup_transformer_engine_cp_groups = lambda self: None
    _seed_rng_tracker_on_cpu()

    from lightning.fabric.plugins.environments import mpi as lightning_mpi

    lightning_mpi.MPIEnvironment.detect = staticmethod(lambda: False)
    from nemo.collections.nlp.models import nlp_model

    nlp_model.get_megatron_pretrained_bert_models = lambda: []


def _seed_rng_tracker_on_cpu() -> None:
    """NeMo seeds megatron-core's tensor-parallel RNG tracker only when a GPU is visible."""
    from megatron.core import parallel_state, tensor_parallel

    from nemo.collections.nlp.modules.common.megatron import megatron_init

    original = megatron_init._set_random_seed

    def set_random_seed(seed: int) -> None:
        original(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())

    megatron_init._set_random_seed = set_random_seed


def _clip_grad_norm_cpu(parameters, max_norm, norm_type=2, use_fsdp=False):
    """NeMo's ``clip_grad_norm_fp32`` without apex's ``amp_C`` kernels: the L2 norm of the
    gradients over the model-parallel group (tensor-parallel duplicates counted once), then
    the same in-place scaling."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in (parameters if isinstance(parameters, list) else list(parameters)) if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            squares += p.grad.float().pow(2).sum()
    dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    total = float(squares.sqrt())
    coeff = max_norm / (total + 1.0e-6)
    if coeff < 1.0:
        for p in params:
            p.grad.mul_(coeff)
    return total


def _patch_optimizer_checkpoint() -> None:
    """torch's Adam keeps a 0-dim ``step`` tensor per parameter (apex's fused Adam, used on GPUs,
    keeps it per group); megatron-core shards optimizer states like their parameter. On CPU a
    0-dim state is saved as a small object per rank and parameter (in the optimizer's fixed
    order), so resume at the same world size keeps Adam's step count exactly."""
    import itertools

    import torch.distributed as dist
    from megatron.core.dist_checkpointing import optimizer as mopt
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    original_make, original_state = mopt.make_sharded_optimizer_tensor, mopt.optim_state_to_sharding_state
    counter = itertools.count()

    def make_sharded_optimizer_tensor(model_param, optim_param, prefix):
        if torch.is_tensor(optim_param) and optim_param.dim() == 0:
            return ShardedObject(f"{prefix}.rank{dist.get_rank()}.n{next(counter)}", optim_param, (1,), (0,), replica_id=0)
        return original_make(model_param, optim_param, prefix)

    def optim_state_to_sharding_state(*args, **kwargs):
        nonlocal counter
        counter = itertools.count()
        return original_state(*args, **kwargs)

    mopt.make_sharded_optimizer_tensor = make_sharded_optimizer_tensor
    mopt.optim_state_to_sharding_state = optim_state_to_sharding_state
    from nemo.collections.nlp.parts import nlp_overrides

    if hasattr(nlp_overrides, "optim_state_to_sharding_state"):
        nlp_overrides.optim_state_to_sharding_state = optim_state_to_sharding_state
    original_init = nlp_overrides.init_optimizer_states

    def init_optimizer_states(optimizer) -> None:
        """NeMo's empty Adam states (the load template), plus torch Adam's per-parameter step."""
        original_init(optimizer)
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            for state in optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))

    nlp_overrides.init_optimizer_states = init_optimizer_states


def _patch_checkpoint_writer() -> None:
    """megatron-core 0.10's torch_dist writer forks a process, calls torch.cuda.synchronize()
    and a private torch API that changed in torch 2.7; NeMo's checkpoint I/O writes the same
    format synchronously here (the project's own writer of ``backends/megatron/checkpoint``)."""
    from nemo.utils.callbacks import dist_ckpt_io

    from nemo_guide.backends.megatron.checkpoint import _save_strategy

    dist_ckpt_io.DistributedCheckpointIO._determine_dist_ckpt_save_strategy = lambda self: _save_strategy()


def _patch_aligner() -> None:
    from nemo_aligner.utils import train_utils

    train_utils.clip_grad_norm_fp32 = _clip_grad_norm_cpu


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install() -> None:
    """Apply every patch in this process (idempotent). Nothing with ``NEMO_GUIDE_GPU_TIER=1``: the
    GPU tests (``test_trt_gpu.py``) run the real stack inside NeMo-Aligner's image."""
    global _installed
    if _installed or os.environ.get("NEMO_GUIDE_GPU_TIER") == "1":
        return
    os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")
    # torch >= 2.6 loads with weights_only=True by default; the pinned stack (torch 2.4 in the
    # 24.07 image) did not, and NeMo/megatron-core checkpoints pickle OmegaConf objects.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _stub_packages()
    _patch_cuda()
    _patch_megatron()
    _patch_nemo()
    _patch_aligner()
    _patch_optimizer_checkpoint()
    _patch_checkpoint_writer()
    CudaToCpu().__enter__()
    _installed = True
