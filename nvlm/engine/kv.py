"""Slot-based KV memory for the engine: a fixed pool of sequence slots, running ones kept contiguous.

Notable:
- Per layer one (slots, H_kv, max_len, hd) tensor for keys and one for values, allocated once from the memory
  budget, each on its layer's device.
- Running sequences always occupy slots [0, B), so a decode step attends over the view [:B, :, :L] without any
  gather; when a sequence leaves, slots are swapped (a copy of the used positions only).
- Slots beyond the running ones are either free or hold a finished sequence kept for prefix reuse (LRU).
- The views implement the decoder's cache interface, `update(pos, k, v) -> (k_all, v_all)`: `pos` is an int for a
  one-sequence prefill and a (B,) tensor of per-row positions for a batched decode step.
"""

from __future__ import annotations

import torch


class _PrefillView:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: int):
        self.k, self.v, self.slot = k, v, slot

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        end = pos + k.shape[2]
        self.k[self.slot:self.slot + 1, :, pos:end] = k
        self.v[self.slot:self.slot + 1, :, pos:end] = v
        return self.k[self.slot:self.slot + 1, :, :end], self.v[self.slot:self.slot + 1, :, :end]


class _DecodeView:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, length: int):
        self.k, self.v, self.rows, self.length = k, v, rows, length

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k: (B, H_kv, 1, hd) -> written at each row's own position
        pos = pos.to(self.k.device)
        self.k[self.rows, :, pos] = k[:, :, 0]
        self.v[self.rows, :, pos] = v[:, :, 0]
        B = self.rows.shape[0]
        return self.k[:B, :, :self.length], self.v[:B, :, :self.length]


class SlotPool:
    """KV tensors for `num_slots` sequences of at most `max_len` positions."""

    def __init__(self, language_model, num_slots: int, max_len: int, dtype: torch.dtype | None = None):
        cfg = language_model.config
        self.num_slots, self.max_len = num_slots, max_len
        self.k, self.v = [], []
        for layer in language_model.model.layers:
            w = layer.input_layernorm.weight  # a float tensor even when the linears are quantized
            dt = dtype or w.dtype
            shape = (num_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
            self.k.append(torch.zeros(shape, dtype=dt, device=w.device))
            self.v.append(torch.zeros(shape, dtype=dt, device=w.device))

    @staticmethod
    def bytes_per_position(language_model, dtype: torch.dtype) -> int:
        cfg = language_model.config
        size = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size

    def prefill_views(self, slot: int) -> list[_PrefillView]:
        return [_PrefillView(k, v, slot) for k, v in zip(self.k, self.v)]

    def decode_views(self, batch: int, length: int) -> list[_DecodeView]:
        rows = {}
        views = []
        for k, v in zip(self.k, self.v):
            if k.device not in rows:
                rows[k.device] = torch.arange(batch, device=k.device)
            views.append(_DecodeView(k, v, rows[k.device], length))
        return views

    def swap(self, i: int, j: int, used: int) -> None:
        """Exchange the first `used` positions of slots i and j."""
        if i == j or used == 0:
            return
        for t in self.k + self.v:
            tmp = t[i, :, :used].clone()
            t[i, :, :used] = t[j, :, :used]
            t[j, :, :used] = tmp

    def copy(self, src: int, dst: int, used: int) -> None:
        """Copy the first `used` positions of slot src into slot dst."""
        if src == dst or used == 0:
            return
        for t in self.k + self.v:
            t[dst, :, :used] = t[src, :, :used]
