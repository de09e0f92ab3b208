"""A key/value cache: generate one token at a time without recomputing the whole prefix
(notebook 05).

Without a cache, sampling token t runs the model over all t previous tokens again: O(t) work
per token, O(T^2) for a sequence. Attention is the only place where a position looks at other
positions, and it only needs their keys and values, which never change once computed (the
model is causal). So each layer keeps them, and a decoding step computes q, k, v for the new
token alone and attends over the stored keys and values. With grouped-query attention only the
n_kv_head key/value heads are stored (notebook 07): the cache shrinks by n_head / n_kv_head.
"""

import torch


class KVCache:
    """Keys and values of every layer for the first `length` positions of a batch."""

    def __init__(self, config, batch_size: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.kv_heads, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, n_kv, block_size, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored so far; the next token's position

    @property
    def max_length(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new positions' k, v (B, n_kv, T, hs); return all of this layer's so far."""
        end = self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(
                f"KVCache holds {self.max_length} positions (block_size) and {self.length} are used; "
                f"cannot add {k.size(2)} more. Start a new cache on the last block_size tokens."
            )
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, length + T, hs)

    def advance(self, n_tokens: int):
        """Called once per forward pass, after every layer has stored its keys and values."""
        self.length += n_tokens
