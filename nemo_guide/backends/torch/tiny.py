"""The built-in policy: a small character-level decoder with a KV cache, in plain torch.

``CharTokenizer`` maps printable ASCII and newline to ids (plus pad/bos/eos);
``TinyDecoder`` is a pre-LayerNorm transformer with learned positions and a tied output
layer. Both exist so that the embedded default runs on a fresh CPU machine with nothing
downloaded; any Hugging Face causal LM can replace them (``backend.model=<directory>``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from nemo_guide.errors import RunError

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    """Character-level tokenizer: ids 0-2 are ``<pad> <bos> <eos>``, then ``\\n`` and ASCII 32-126."""

    pad_token_id = 0
    eos_token_id = 2

    def __init__(self) -> None:
        self._ids = {ch: i + len(SPECIALS) for i, ch in enumerate(CHARS)}
        self.vocab_size = len(SPECIALS) + len(CHARS)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError:
            bad = sorted({ch for ch in text if ch not in self._ids})
            raise ValueError(
                f"the built-in character tokenizer cannot encode {bad!r} in {text[:80]!r}; it knows printable "
                "ASCII and newline only (use a Hugging Face model directory for other text)"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = len(SPECIALS) + len(CHARS)
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    d_ff: int = 512
    max_seq_len: int = 128

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TinyConfig":
        return cls(**json.loads(text))


KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer ``(k, v)``, each Shape: ``[B, n_head, S, d_head]``: a cache that grows by ``torch.cat``."""


class KVBuffer:
    """A KV cache allocated once for a whole generation call: per layer, keys and values in
    buffers of Shape ``[B, n_head, capacity, d_head]``.

    A forward over positions ``[past, S)`` writes its keys and values there and attends over
    the views ``[:, :, :S]``: the same values, in the same ``[B, n_head, S, d_head]`` shape,
    as the growing :data:`KVCache`, without copying the whole cache at every token.
    """

    def __init__(self, cfg: TinyConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, cfg.n_head, capacity, cfg.d_model // cfg.n_head)
        self.capacity = capacity
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]

    def write(self, layer: int, past: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (Shape: ``[B, n_head, T, d_head]``) at positions ``[past, past + T)`` of
        ``layer``; returns the views of positions ``[0, past + T)``."""
        end = past + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVBuffer holds {self.capacity} positions, a forward reached {end}; allocate it for the whole call")
        self.keys[layer][:, :, past:end] = k
        self.values[layer][:, :, past:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | tuple[KVBuffer, int, int] | None):
        """``past``: the cached ``(k, v)`` (grown by ``torch.cat``), ``(buffer, layer, position)``
        (written in place), or None. Returns ``(x, (k, v))`` with ``k, v`` over every position."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # [B, h, T, dh]
        if past is None:
            kv = (k, v)
        elif isinstance(past[0], KVBuffer):
            buffer, layer, position = past
            kv = buffer.write(layer, position, k, v)  # views [B, h, S, dh]
            if position:  # a prefill (position 0) attends over its own k, v as without a cache
                k, v = kv
        else:
            k = torch.cat([past[0], k], dim=2)  # [B, h, S, dh]
            v = torch.cat([past[1], v], dim=2)
            kv = (k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, h, T, dh]
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return x, kv


class TinyDecoder(nn.Module):
    """Pre-LN decoder. ``forward`` returns final hidden states; ``output_weight`` the tied head."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        """Shape: ``[V, H]``."""
        return self.tok_emb.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | KVBuffer | None = None,
    ) -> tuple[torch.Tensor, KVCache | KVBuffer]:
        """Hidden states of the new tokens.

        Args:
            input_ids: Shape: ``[B, T]``, the new tokens.
            attention_mask: True for real tokens over the cached and new positions.
                Shape: ``[B, S]`` with ``S = cached + T``. Positions count real tokens only,
                so left padding does not shift them.
            cache: from the previous call (None for a prefill), or a :class:`KVBuffer` (empty
                for a prefill) that this call fills at positions ``[S - T, S)``.

        Returns:
            ``(hidden [B, T, H], cache)``: a :class:`KVBuffer` comes back as it went in (filled),
            otherwise the grown :data:`KVCache`.
        """
        b, t = input_ids.shape
        s = attention_mask.shape[1]
        past = s - t
        mask = attention_mask.bool()
        if isinstance(cache, KVBuffer) and t == 1 and past:
            positions, attn = decode_positions_and_bias(mask, self.tok_emb.weight.dtype)  # [B, 1], [B, 1, 1, S]
        else:
            positions, attn = positions_and_attention(mask, t)  # [B, T], [B, T, S]
            attn = attn[:, None]  # [B, 1, T, S]
        # positions <= S - 1, so only a sequence longer than max_seq_len needs the (synchronising) check
        if s > self.cfg.max_seq_len and positions.numel() and int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {int(positions.max()) + 1} tokens is longer than the tiny model's "
                f"max_seq_len = {self.cfg.max_seq_len}; shorten prompts or generation.max_new_tokens"
            )
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        if isinstance(cache, KVBuffer):
            for i, block in enumerate(self.blocks):
                x, _ = block(x, attn, (cache, i, past))
            return self.ln_f(x), cache
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, attn, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.ln_f(x), new_cache

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def positions_and_attention(mask: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the last ``t`` columns and what each of them attends to.

    Args:
        mask: True on real tokens. Shape: ``[B, S]``.

    Returns:
        ``(positions [B, T], attend [B, T, S])``: a position counts the real tokens up to it
        (left padding does not shift it); a query attends to the real tokens at or before it,
        and a padded query to itself (no empty rows).
    """
    s = mask.shape[1]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, s - t :]  # [B, T]
    q_idx = torch.arange(s - t, s, device=mask.device)  # [T]
    k_idx = torch.arange(s, device=mask.device)  # [S]
    causal = k_idx[None, :] <= q_idx[:, None]  # [T, S]
    attend = causal[None] & mask[:, None, :]  # [B, T, S]
    attend = attend | (k_idx[None, None, :] == q_idx[None, :, None])  # a padded query sees itself
    return positions, attend


def decode_positions_and_bias(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`positions_and_attention` for one new token (``t = 1``), in fewer operations.

    The last column's cumulative count is the row's count of real tokens, and the causal part
    is all True, so the query attends to the real tokens and to itself. The attention comes as
    the additive bias (0 where attended, -inf elsewhere) that ``scaled_dot_product_attention``
    would otherwise build from the boolean mask in every layer.

    Args:
        mask: True on real tokens. Shape: ``[B, S]``.

    Returns:
        ``(positions [B, 1], bias [B, 1, 1, S])``.
    """
    positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # [B, 1]
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))  # [B, S]
    bias[:, -1] = 0.0  # the query sees itself
    return positions, bias[:, None, None, :]


def sampling_step(model: TinyDecoder):
    """The ``step(ids, mask, cache, capacity) -> (last_logits [B, V], cache)`` of ``sampling.generate``.

    With a ``capacity`` the prefill call (``cache`` None) allocates a :class:`KVBuffer` of that
    many positions, which later calls fill in place; without one the cache grows by ``torch.cat``.
    """

    def step(ids: torch.Tensor, mask: torch.Tensor, cache: KVCache | KVBuffer | None, capacity: int | None = None):
        if cache is None and capacity is not None:
            weight = model.output_weight
            cache = KVBuffer(model.cfg, ids.shape[0], capacity, weight.dtype, weight.device)
        hidden, cache = model(ids, mask, cache)
        return hidden[:, -1] @ model.output_weight.T, cache

    return step


def sequence_logits(model: TinyDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Full logits (for tests and SFT on tiny batches). Shape: ``[B, T, V]``."""
    hidden, _ = model(input_ids, attention_mask)
    return hidden @ model.output_weight.T



def save_tiny(path, model: TinyDecoder, metadata: dict[str, str] | None = None) -> None:
    """Write weights and config to one safetensors file (atomically: temp file + rename)."""
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "tiny_config": model.cfg.to_json(), **(metadata or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_tiny(path) -> tuple[TinyDecoder, dict[str, str]]:
    """``(model, metadata)`` from a file written by :func:`save_tiny` (safetensors only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "tiny_config" not in meta:
        raise RunError(f"{path}: not a built-in tiny model file (no 'tiny_config' in its safetensors metadata)")
    model = TinyDecoder(TinyConfig.from_json(meta["tiny_config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunError(f"{path}: weights do not match the tiny config: missing {missing}, unexpected {unexpected}")
    return model, meta
