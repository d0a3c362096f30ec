"""A world of one for NeMo 2.1 on CPU: gloo, megatron-core parallel state, a CPU Lightning trainer.

For worker processes of the aligner tier that load or build a ``MegatronGPTModel``
(``restore_from``) at world size 1. Call :func:`start` once per process, before touching NeMo
models; it applies ``nemo_cpu.install()`` first. Test side only.

Besides ``nemo_cpu``'s patches, one more is needed to restore a ``.nemo`` written for GPUs
(``use_cpu_initialization: False``, as NeMo's own converters write it): NeMo then calls
``torch.cuda.set_device``, which is made a no-op here.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nemo_cpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(seed: int = 1234, precision: int | str = 32):
    """Set up this process and return a CPU ``lightning.pytorch.Trainer`` for ``restore_from``.

    gloo process group of one, ``parallel_state.initialize_model_parallel(1, 1)`` (so NeMo's
    ``restore_from`` finds it set up and skips its launcher) and the tensor-parallel CUDA-RNG
    tracker seeded (NeMo seeds it only when a GPU is visible); NeMo's ``NLPDDPStrategy``.
    """
    nemo_cpu.install()
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Trainer
    from megatron.core import parallel_state, tensor_parallel

    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    torch.cuda.set_device = lambda *args, **kwargs: None
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(), precision=precision, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def stop() -> None:
    """Undo :func:`start`'s process group and parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
