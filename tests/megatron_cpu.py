"""Test-side shims that let megatron-core 0.10.0 run on a CPU-only machine under gloo.

Measured in ``../shared/notes/cpu-stack.md``. They live in tests/ only: the package never
patches torch or Megatron. Every spawned worker calls :func:`init_worker` first.

- ``torch.cuda.current_device()`` (global memory buffer, RoPE) returns the CPU device.
- The tensor-parallel RNG tracker's CUDA state calls use the CPU generator.
- A ``TorchFunctionMode`` rewrites ``device="cuda"`` arguments (pipeline schedules, p2p,
  optimizer) to CPU and makes ``Tensor.cuda()`` a no-op.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)


class CudaToCpu(TorchFunctionMode):
    """Every ``device=cuda`` becomes CPU; ``Tensor.cuda()`` returns the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_worker(rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1, seed: int = 1234, cuda: bool = False) -> None:
    """Start gloo + the CPU shims (or, with ``cuda``, NCCL on GPU ``rank`` without shims) and
    Megatron's parallel state in this process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size)
    else:
        torch.set_num_threads(1)
        patch_torch_cuda()
        CudaToCpu().__enter__()
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from megatron.core import tensor_parallel

    from nemo_guide.backends.megatron.model import initialize_parallel

    initialize_parallel(tp, pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def shutdown_worker() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _entry(rank, world_size, port, tp, pp, fn, args, out_dir, cuda):
    try:
        init_worker(rank, world_size, port, tp, pp, cuda=cuda)
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        shutdown_worker()


def run_parallel(fn, world_size: int, tp: int, pp: int, args: tuple, tmp_dir, cuda: bool = False) -> list:
    """Run ``fn(rank, *args)`` in ``world_size`` processes with Megatron TP/PP set up
    (gloo on CPU with the shims; NCCL, one GPU per rank, with ``cuda``).

    ``fn`` must be importable (module level). Returns each rank's return value.
    """
    import torch.multiprocessing as mp

    out_dir = str(tmp_dir)
    os.makedirs(out_dir, exist_ok=True)
    port = free_port()
    try:
        mp.spawn(_entry, args=(world_size, port, tp, pp, fn, args, out_dir, cuda), nprocs=world_size, join=True)
    except Exception as exc:
        errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
        raise AssertionError("worker failed:\n" + "\n".join(errors)) from exc
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
