"""CPU decode transform: single-row matrix-vector products through `torch.mv` (a module transform; the model
file stays pure).

Notable:
- On CPU, `F.linear` with one input row in bfloat16 reads weights at ~16 GB/s where `torch.mv` reaches ~25 GB/s
  (measured on this project's 2-core Xeon; fp32 is about equal). Batch-1 decode is exactly that case, so swapping
  the class of the decoder's `nn.Linear` modules for one that takes the mv path when there is a single row gives
  ~1.3x decode tokens/s (benchmarks/bench_decode.py). Prefill and batched decode keep `F.linear`.
- Results can differ from `F.linear` in the last bit (another reduction order), so it is applied only where the
  caller asks (nvlm.load does for CPU + bfloat16/float16).
"""

from __future__ import annotations

import torch
from torch import nn


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and x.device.type == "cpu":
            y = torch.mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], -1)
        return super().forward(x)


def use_gemv(model: nn.Module) -> nn.Module:
    """Swap every plain `nn.Linear` of the language model for `GemvLinear` in place (no weights move)."""
    for mod in model.language_model.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = GemvLinear
    return model
