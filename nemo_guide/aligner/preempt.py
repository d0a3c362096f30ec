"""Checkpoint, then exit, on Slurm's time-limit signal: the half of preemption that runs in Python.

``slurm/guide_grpo.sbatch`` asks Slurm for ``SIGUSR1`` some minutes before the time limit
(``--signal=B:USR1@...``) and forwards it to every task. :class:`StopRequest` records it; the
trainer asks after each step, all ranks agree (one all-reduce, so they stop at the same step even
when the signal reaches them on either side of a step boundary), the step's checkpoint and Guide
side file are written, and the process exits with :data:`PREEMPTED_EXIT`, which the script
answers with ``scontrol requeue``. The requeued job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import signal
import sys

PREEMPT_SIGNAL = signal.SIGUSR1
PREEMPTED_EXIT = 75
"""Exit code of a run that checkpointed on the signal (EX_TEMPFAIL: try again); the sbatch script requeues on it."""


class Preempted(Exception):
    """Raised by the trainer once the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped on {signal.Signals(PREEMPT_SIGNAL).name} after step {step}, checkpoint written; exit code {PREEMPTED_EXIT} asks for a requeue")
        self.step = step


class StopRequest:
    """Installs a handler for :data:`PREEMPT_SIGNAL`; calling the object tells, collectively, whether
    any rank has received it (every rank must call it at the same point)."""

    def __init__(self, signum: int = PREEMPT_SIGNAL) -> None:
        self.received = False
        signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.received:
            print(f"received {signal.Signals(signum).name}: checkpointing after this step", file=sys.stderr, flush=True)
        self.received = True

    def __call__(self) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def never() -> bool:
    """The default stop request: none."""
    return False
