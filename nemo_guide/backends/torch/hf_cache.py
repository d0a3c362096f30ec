"""A KV cache allocated once per generation call for Hugging Face causal LMs.

transformers' default ``DynamicCache`` grows each layer's keys and values by ``torch.cat`` at
every token, copying the whole cache each time. :func:`preallocated_cache` gives a cache of the
same kind whose layers write into buffers of Shape ``[B, n_kv_head, capacity, d_head]`` and
hand the attention the views of the filled positions: the same values in the same shape (so
the same masks and the same attention results, bit for bit), without the copies.

It needs transformers' per-layer caches (>= 4.56) and a model whose every layer is plain full
attention (no sliding window, no linear attention); otherwise it returns None and the model
builds its own growing cache.
"""

from __future__ import annotations

import torch

from nemo_guide.backends.torch import _hf


def preallocated_cache(model: torch.nn.Module, capacity: int):
    """A cache for one generation call of at most ``capacity`` positions, or None where
    transformers or the model's layer types do not allow it (see module docstring)."""
    if _hf.DynamicLayer is None:
        return None
    try:
        cache = _hf.DynamicCache(config=model.config)
    except TypeError:  # a DynamicCache that takes no config: layer types unknown
        return None
    if not cache.layers or any(
        type(layer) is not _hf.DynamicLayer for layer in cache.layers
    ):
        return None
    cache.layers = [_BufferLayer(capacity) for _ in cache.layers]
    return cache


def _buffer_layer_class():
    """The buffered layer class, a subclass of transformers' ``DynamicLayer`` (None where this
    transformers has none, as :func:`preallocated_cache` then never builds one)."""
    if _hf.DynamicLayer is None:
        return None

    class BufferLayer(_hf.DynamicLayer):
        """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers allocated on the first update."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.filled = 0

        def lazy_initialization(
            self, key_states: torch.Tensor, value_states: torch.Tensor
        ) -> None:
            """Buffers Shape: ``[B, n_kv_head, capacity, d_head]``, from the first update's states."""
            b, h, _, d = key_states.shape
            self.device = key_states.device
            self._key_buffer = torch.empty(
                (b, h, self.capacity, d), dtype=key_states.dtype, device=self.device
            )
            self._value_buffer = torch.empty(
                (b, h, self.capacity, value_states.shape[-1]),
                dtype=value_states.dtype,
                device=self.device,
            )
            self.keys, self.values = (
                self._key_buffer[:, :, :0],
                self._value_buffer[:, :, :0],
            )
            self.filled = 0
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Write ``[B, n_kv_head, T, d_head]`` states after the filled positions; return the filled views."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.filled + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(
                    f"the preallocated KV cache holds {self.capacity} positions, a forward reached {end}; allocate it for the whole call"
                )
            self._key_buffer[:, :, self.filled : end] = key_states
            self._value_buffer[:, :, self.filled : end] = value_states
            self.filled = end
            self.keys, self.values = (
                self._key_buffer[:, :, :end],
                self._value_buffer[:, :, :end],
            )
            return self.keys, self.values

    return BufferLayer


_BufferLayer = _buffer_layer_class()
