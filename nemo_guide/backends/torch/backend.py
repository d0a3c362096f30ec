"""``TorchBackend``: the embedded :class:`~nemo_guide.backends.base.PolicyBackend` (all three roles).

One process, CPU or one GPU. Sampling uses the KV-cache loop of ``sampling.py``;
log-probs of the response tokens behind either prompt go through ``fused_logprobs`` on
the final hidden states (``[chunk, V]`` logits at a time, never ``[N, L, V]``). Dropout
is off throughout (the model stays in eval mode), so a rollout's ratio on its first
update is exactly 1.

Batch layout of a scoring forward (DESIGN section 3)::

    [ left pad | prompt (plain or sampling context) | response | right pad ]
                                                   ^ column P

Every prompt ends at column ``P - 1``, so the hidden state at column ``P - 1 + t``
predicts response token ``t`` whatever the prompt's length: the output is ``[N, L]``
aligned on response positions in both contexts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

import torch

from nemo_guide.backends.base import TRAIN_ENTROPY, Context, LossFn, RolloutBatch, Totals
from nemo_guide.backends.torch.models import load_adapter
from nemo_guide.backends.torch.sampling import generate, left_pad, right_pad
from nemo_guide.checkpoint import corrupt, load_torch_file
from nemo_guide.config import BackendConfig, OptimConfig
from nemo_guide.kernels.logprobs import fused_logprobs
from nemo_guide.tracking import reduce_metrics
from nemo_guide.errors import RunError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"backend.device = {name!r} but no CUDA device is visible; use backend.device=cpu or auto")
    return device


class TorchBackend:
    """The embedded backend (see module docstring)."""

    def __init__(self, cfg: BackendConfig, optim: OptimConfig, *, temperature: float = 1.0, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.optim_cfg = optim
        self.device = resolve_device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self.temperature = temperature
        self.adapter = load_adapter(cfg.model, self.dtype, self.device)
        self.model = self.adapter.model
        self.model.eval()
        self.pad_id = self.adapter.pad_id
        self.eos_ids = tuple(self.adapter.eos_ids)
        self.max_length: int | None = self.adapter.max_length
        self.chat_tokenizer = self.adapter.tokenizer if self.adapter.kind == "hf" else None
        self.reference: torch.nn.Module | None = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        warmup = optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.adapter.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.adapter.decode(ids)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{self.adapter.source} ({self.adapter.kind}, {n:,} parameters, {self.device}, {self.cfg.dtype})"

    # -- sampling --------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> tuple[list[list[int]], list[bool]]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate(
            self.adapter.step(self.model),
            prompts,
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            device=self.device,
        )

    def generate_with_logprobs(self, prompts, *, max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0):
        """:meth:`generate` (the same tokens for the same seed) plus each token's sampling log-prob."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate(
            self.adapter.step(self.model), prompts, pad_id=self.pad_id, eos_ids=self.eos_ids, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, generator=generator, device=self.device, return_logprobs=True,
        )

    # -- scoring ---------------------------------------------------------------------------

    def _score(self, model: torch.nn.Module, batch: RolloutBatch, context: Context, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of ``batch``'s response tokens behind ``context``. Shape: ``[n, L]``."""
        n, width = len(batch), batch.response_length
        longest = max((len(r) for r in batch.response_ids), default=0)
        p_ids, p_mask = left_pad(batch.prompts(context), self.pad_id, self.device)  # [n, P]
        r_ids, r_mask = right_pad(batch.response_ids, self.pad_id, longest, self.device)  # [n, L']
        prompt_len = p_ids.shape[1]
        ids = torch.cat([p_ids, r_ids], dim=1)  # [n, P + L']
        mask = torch.cat([p_mask, r_mask], dim=1)
        hidden = self.adapter.hidden(model, ids, mask)  # [n, P + L', H]
        h = hidden[:, prompt_len - 1 : prompt_len - 1 + longest]  # [n, L', H]: predicts response token t
        scaled = h[r_mask] / self.temperature  # [T, H], T = real response tokens
        result = fused_logprobs(
            scaled, self.adapter.output_weight(model), r_ids[r_mask], chunk_size=self.cfg.logprob_chunk_size, return_entropy=with_entropy
        )
        lp, ent = result if with_entropy else (result, None)
        logprobs = torch.zeros(n, width, dtype=torch.float32, device=self.device)
        logprobs[:, :longest] = logprobs[:, :longest].masked_scatter(r_mask, lp)
        entropy = None
        if ent is not None:
            entropy = torch.zeros(n, width, dtype=torch.float32, device=self.device)
            entropy[:, :longest] = entropy[:, :longest].masked_scatter(r_mask, ent)
        return logprobs, entropy

    @torch.no_grad()
    def logprobs(
        self,
        batch: RolloutBatch,
        context: Context,
        *,
        reference: bool = False,
        with_entropy: bool = False,
        micro_batch_size: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.model
        if reference:
            if self.reference is None:
                raise RuntimeError("no reference policy: call snapshot_reference() first (algorithm.kl_coef > 0 does)")
            model = self.reference
        lps, ents = [], []
        for start in range(0, len(batch), micro_batch_size):
            micro = batch.select(range(start, min(len(batch), start + micro_batch_size)))
            lp, ent = self._score(model, micro, context, with_entropy)
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps).cpu(), (torch.cat(ents).cpu() if with_entropy else None)

    # -- training --------------------------------------------------------------------------

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, *, micro_batch_size: int, with_entropy: bool = False) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[dict[str, torch.Tensor]] = []
        totals = Totals.of(batch)
        finite = True
        token_entropy = torch.full(batch.loss_mask.shape, float("nan"))  # [n, L]: rows not scored stay NaN
        for start in range(0, len(batch), micro_batch_size):
            micro = batch.select(range(start, min(len(batch), start + micro_batch_size)))
            logprobs, entropy = self._score(self.model, micro, "plain", with_entropy)
            if entropy is not None:
                token_entropy[start : start + len(micro)] = entropy.detach().cpu()
            loss, metrics = loss_fn(micro.to_device(self.device).with_current_as_old(logprobs), logprobs, entropy, totals)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            parts.append(metrics)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if finite else torch.tensor(float("nan"))
        skipped = not (finite and torch.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        out = reduce_metrics(parts) if parts else {}
        out["optim/grad_norm"] = float(grad_norm)
        out["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        out["optim/skipped"] = float(skipped)
        if with_entropy:
            out[TRAIN_ENTROPY] = token_entropy
        return out

    def snapshot_reference(self) -> None:
        self.reference = copy.deepcopy(self.model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    # -- checkpoints -----------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.model, str(Path(directory) / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, Path(directory) / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.load_weights(directory)
        state = load_torch_file(Path(directory) / "optimizer.pt", map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def load_weights(self, directory: Path) -> None:
        """The weights of ``directory/model.safetensors``.

        Raises:
            CorruptCheckpoint: the file is cut short or not a safetensors file (the message names
                the checkpoint to use instead).
            ValueError: its tensors do not fit ``backend.model``.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        path = Path(directory) / "model.safetensors"
        try:
            missing, unexpected = load_model(self.model, str(path), strict=False, device=str(self.device))
        except SafetensorError as exc:  # a bad header: cut short, or another kind of file
            raise corrupt(path, f"not a complete safetensors file: {exc}") from None
        except RuntimeError as exc:  # tensors of another shape
            raise RunError(f"{path} does not fit backend.model = {self.cfg.model!r} ({str(exc).splitlines()[-1].strip()}); was it written by another model?") from None
        if unexpected or [m for m in missing if not self._tied(m)]:
            raise RunError(
                f"{path} does not fit backend.model = {self.cfg.model!r}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; was it written by another model?"
            )

    def _tied(self, name: str) -> bool:
        return name.endswith("lm_head.weight") and bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))
