"""Weight-only int8 / int4 quantization of the Qwen2 decoder, as a module transform (the model file knows nothing).

`quantize_model(model, "int8" | "int4")` swaps the decoder's `nn.Linear`s (q/k/v/o, gate/up/down; the lm_head on
request) for the modules below, in place. Only the decoder is touched: batch-1 decoding reads every decoder weight
once per token, so fewer weight bytes is what makes it faster. The ViT and projector run once per image over
hundreds of tokens at a time (compute-bound: nothing to gain) and their error would reach every image token, so
they keep the model dtype.

Notable:
- int8: symmetric, per output channel: w ~ q * scale, scale = absmax / 127. Plain (N, K) int8 layout (no packing),
  run by torch's `_weight_int8pack_mm` for decode-sized inputs, else `(x @ q.T) * scale` (the per-row scale commutes
  with the matmul, so it is applied to the small output rather than the weight).
- int4: asymmetric, groups of `group_size` along the input dim: w ~ (q - 8) * scale + zero, q in [0, 15]: the
  convention of torch's packed int4 kernels (`_weight_int4pack_mm[_for_cpu]`), so one (G, N, 2) scales_and_zeros
  tensor serves the kernel and the fallback. In memory the weight is packed for the device's kernel only; the
  device-independent form that checkpoints hold (uint8 (N, K/2), high nibble = even input column) is recovered
  *exactly* by running the kernel on an identity matrix with scale 1 / zero 8. So int4 costs 0.5 byte per weight;
  the price is a slow save on CPU (~20 s for the `1b` preset), which `quantize_checkpoint` avoids by not packing.
- Each kernel is tried once per (device, dtype, shape class) against the dequantize reference; where it is missing,
  fails or disagrees, layers use dequantize-and-matmul, which runs everywhere. (The CUDA calls follow torch's
  documented layouts but have only run through this probe on CPU-only machines so far.)
- CPU: torch's int8/int4 kernels are vectorised for bf16/fp16 activations only (with float32 they are ~4x slower than
  a float32 matmul), so float32 models use the fallback and a warning suggests bfloat16. The CPU int4 kernel is tuned
  for a few rows: long prefills (image prompts) are slower than in bf16; int8 switches to the fallback above 16 rows.
- Checkpoints: the official layout written by `weights.save_checkpoint`; a quantized layer stores `<name>.weight`
  (int8, or uint8 nibbles), `<name>.scales` (+ `<name>.zeros` for int4) and its bias; config.json gets a
  `quantization_config` entry. `load_quantized` builds on `meta`, swaps the same layers and loads tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import weights as W
from .config import NVLMConfig
from .model import NVLM

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
QUANT_METHOD = "nvlm"
KERNEL_MAX_ROWS = 16  # int8 kernel vs dequantize-and-matmul crossover: ~20 rows for a 4864x896 bf16 linear on CPU
_FORMATS = {
    "int8": "weight int8 (out, in), scales (out,): w = weight * scales[:, None]",
    "int4": "weight uint8 (out, in/2), high nibble = even input column; scales, zeros (out, in/group_size): "
            "w = (q - 8) * scale + zero",
}


def _fallback_warning(what: str, device: torch.device, dtype: torch.dtype) -> None:
    warnings.warn(f"{what} kernel unavailable for {device.type}/{dtype}; using dequantize-and-matmul", stacklevel=3)


# ---- int8 ----------------------------------------------------------------------------------------------------

@functools.cache
def _int8_kernel_ok(device: str, dtype: torch.dtype) -> bool:
    """Does `_weight_int8pack_mm` run, and agree with the reference, for this device and activation dtype?"""
    dev = torch.device(device)
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    if dev.type == "cpu" and dtype not in (torch.bfloat16, torch.float16):
        return False  # it runs, but unvectorised: slower than the fallback
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    s = (torch.rand(32, generator=g) + 0.5) / 100
    x = torch.randn(4, 64, generator=g)
    want = (x @ q.float().T) * s
    try:
        got = torch.ops.aten._weight_int8pack_mm(x.to(dev, dtype), q.to(dev), s.to(dev, dtype)).float().cpu()
    except (RuntimeError, NotImplementedError):
        return False
    return bool((got - want).abs().max() <= 2e-2 * want.abs().max())


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (q * scale).T + bias with q int8 (out, in) and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        scales = (w.float().abs().amax(1) / 127).to(w.dtype)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # an all-zero row stays zero
        # quantize against the scale as stored (rounded to the model dtype), so the kernel's w is the closest one
        mod.weight.copy_(torch.round(w.float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8))
        mod.scales.copy_(scales)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_stored(cls, weight, scales, bias=None, *, device, dtype) -> "Int8WeightOnlyLinear":
        mod = cls(weight.shape[1], weight.shape[0], bias is not None, device="meta")
        mod.weight = weight.to(device, torch.int8).contiguous()
        mod.scales = scales.to(device, dtype).contiguous()
        mod.bias = bias.to(device, dtype).contiguous() if bias is not None else None
        return mod

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype or self.scales.dtype)

    def forward_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x2.dtype))

    def forward_dequant(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype == torch.float16:  # x @ q.T could pass fp16's 65504 before the scale brings it down
            return F.linear(x2, self.dequantize(x2.dtype))
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] <= KERNEL_MAX_ROWS and _int8_kernel_ok(str(x.device), x.dtype):
            y = self.forward_kernel(x2)
        else:
            y = self.forward_dequant(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- int4 ----------------------------------------------------------------------------------------------------

def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> uint8 (N, K/2), the even column in the high nibble (the CUDA packer's input)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K)."""
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


def _inner_k_tiles(k: int) -> int:
    """The CUDA layout tiles K by 16 * inner_k_tiles (2, 4 or 8); the CPU packer ignores it."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), 0)


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, K) q in [0, 15] on `device` -> the kernel's packed weight."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    return torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), _inner_k_tiles(q.shape[1]))


def _int4_mm(x2: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if x2.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, scales_and_zeros)


def _unpack_int4(packed: torch.Tensor, n: int, k: int, group_size: int, chunk: int = 1024) -> torch.Tensor:
    """Exact inverse of `_pack_int4`: the kernel applied to identity rows with scale 1 and zero 8 returns q.T
    ((q - 8) * 1 + 8 = q, small integers, exact in bf16). bf16 whatever the model dtype: the fastest CPU path."""
    dev = packed.device
    sz = torch.stack([torch.ones(k // group_size, n), torch.full((k // group_size, n), 8.0)], -1)
    sz = sz.to(dev, torch.bfloat16)
    rows = []
    for start in range(0, k, chunk):
        r = min(chunk, k - start)
        eye = torch.zeros(r, k, dtype=torch.bfloat16, device=dev)  # rows start..start+r of the identity
        eye[torch.arange(r), torch.arange(start, start + r)] = 1
        rows.append(_int4_mm(eye, packed, group_size, sz).round().to(torch.uint8))  # (chunk, N)
    return torch.cat(rows).T.contiguous()  # (N, K)


def _int4_eligible(n: int, k: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Shape and dtype rules of the packed kernels (the probe below checks that they actually run)."""
    if device.type == "cpu":
        return n % 16 == 0 and dtype in (torch.bfloat16, torch.float16)  # fp32: unvectorised, see module doc
    if device.type == "cuda":
        return n % 8 == 0 and _inner_k_tiles(k) > 0
    return False


@functools.cache
def _int4_kernel_ok(device: str, dtype: torch.dtype, group_size: int, inner_k_tiles: int) -> bool:
    """Pack, multiply and unpack a small random layer; True when all three agree with the reference."""
    dev = torch.device(device)
    n, k = 32, max(2 * group_size, 16 * inner_k_tiles)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(k // group_size, n, generator=g) + 0.5) / 100
    zeros = torch.randn(k // group_size, n, generator=g) / 100
    x = torch.randn(4, k, generator=g)
    w = (q.float().view(n, -1, group_size) - 8) * scales.T[..., None] + zeros.T[..., None]
    want = x @ w.reshape(n, k).T
    try:
        packed = _pack_int4(q.to(dev), dev)
        sz = torch.stack([scales, zeros], -1).to(dev, dtype)
        got = _int4_mm(x.to(dev, dtype), packed, group_size, sz).float().cpu()
        same = torch.equal(_unpack_int4(packed, n, k, group_size).cpu(), q)
    except (RuntimeError, NotImplementedError):
        return False
    return same and bool((got - want).abs().max() <= 2e-2 * want.abs().max())


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ w.T + bias with w = (q - 8) * scale + zero per group of `group_size` input columns.

    `weight` is the kernel's packed form when `layout` is "cpu"/"cuda", else the portable uint8 (N, K/2) nibbles.
    `state_dict()` always gives the portable form (`weight`, `scales`, `zeros`, `bias`)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, *, layout: str | None,
                 weight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = layout
        # non-persistent: _save_to_state_dict writes the checkpoint form
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)  # (G, N, 2)
        self.register_buffer("bias", bias, persistent=False)

    @staticmethod
    def quantize_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, K) float -> q uint8 (N, K) in [0, 15], scales (N, G), zeros (N, G) in w's dtype."""
        n, k = w.shape
        wg = w.float().reshape(n, k // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scales = ((hi - lo) / 15).to(w.dtype)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a constant group: q = 8, w = zero
        zeros = (lo + 8 * scales.float()).to(w.dtype)
        # quantize against the scale and zero as stored in the model dtype
        q = torch.round((wg - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
        return q.reshape(n, k).to(torch.uint8), scales, zeros

    @classmethod
    def from_stored(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, *,
                    group_size: int, device, dtype, pack: bool = True) -> "Int4WeightOnlyLinear":
        """q: uint8 (N, K) values or (N, K/2) portable nibbles; scales/zeros (N, G). Packs for `device`'s kernel
        unless `pack` is False (then it keeps the portable form: dequantize path, but free to save)."""
        device = torch.device(device)
        n = scales.shape[0]
        k = scales.shape[1] * group_size
        full = q if q.shape[1] == k else None  # (N, K) values, else (N, K/2) nibbles
        nibbles = pack_nibbles(q) if full is not None else q
        sz = torch.stack([scales, zeros], -1).transpose(0, 1).to(device, dtype).contiguous()  # (G, N, 2)
        bias = bias.to(device, dtype).contiguous() if bias is not None else None
        layout = None
        if pack and _int4_eligible(n, k, device, dtype):
            if _int4_kernel_ok(str(device), dtype, group_size, _inner_k_tiles(k) if device.type == "cuda" else 2):
                layout = device.type
            else:
                _fallback_warning("int4", device, dtype)
        if layout:
            weight = _pack_int4((full if full is not None else unpack_nibbles(nibbles)).to(device), device)
        else:
            weight = nibbles.to(device).contiguous()
        return cls(k, n, group_size, layout=layout, weight=weight, scales_and_zeros=sz, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, pack: bool = True) -> "Int4WeightOnlyLinear":
        w = linear.weight.detach()
        q, scales, zeros = cls.quantize_weight(w, group_size)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_stored(q, scales, zeros, bias, group_size=group_size, device=w.device, dtype=w.dtype,
                               pack=pack)

    def portable(self) -> torch.Tensor:
        """The uint8 (N, K/2) nibbles, whatever the in-memory layout."""
        if self.layout is None:
            return self.weight
        q = _unpack_int4(self.weight, self.out_features, self.in_features, self.group_size)
        return pack_nibbles(q)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) weight, computed in float32 (one rounding to `dtype`, as the kernels do)."""
        q = unpack_nibbles(self.portable())
        n, k, gs = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros.transpose(0, 1).float()  # (N, G, 2)
        w = (q.view(n, k // gs, gs).float() - 8) * sz[..., 0:1] + sz[..., 1:2]
        return w.reshape(n, k).to(dtype or self.scales_and_zeros.dtype)

    def forward_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if self.layout != x2.device.type:
            raise RuntimeError(f"int4 weights were packed for {self.layout}; run quantize_model / load_quantized "
                               f"with the model on {x2.device.type} instead of moving a quantized model")
        return _int4_mm(x2.contiguous(), self.weight, self.group_size, self.scales_and_zeros.to(x2.dtype))

    def forward_dequant(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.dequantize(x2.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        # the packed form is the only copy of the weight: use the kernel for every row count
        y = self.forward_kernel(x2) if self.layout is not None else self.forward_dequant(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sz = self.scales_and_zeros
        destination[prefix + "weight"] = self.portable()
        destination[prefix + "scales"] = sz[..., 0].T.contiguous()
        destination[prefix + "zeros"] = sz[..., 1].T.contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, layout={self.layout or 'portable (dequantize)'}")


# ---- the transform -------------------------------------------------------------------------------------------

def _check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantization_config(config: NVLMConfig) -> dict | None:
    """The `quantization_config` entry of a config written by `save_quantized` (None for a plain model)."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return None
    ok = (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD and qc.get("mode") in MODES
          and isinstance(qc.get("modules"), list)
          and (qc["mode"] == "int8" or qc.get("group_size") in GROUP_SIZES))
    if not ok:
        raise ValueError(f"unsupported quantization_config {str(qc)[:200]}: nvlm reads only its own "
                         f"(quant_method={QUANT_METHOD!r}, mode in {MODES}, a modules list, int4 group_size in "
                         f"{GROUP_SIZES})")
    return qc


def quantize_model(model: NVLM, mode: str, *, group_size: int = 128, include_lm_head: bool = False,
                   pack: bool = True) -> NVLM:
    """Swap the decoder's linears for weight-only `mode` ("int8" | "int4") modules, in place, on their own devices.

    Quantize a model that is already on its device(s) and in its dtype (int4 is packed for the device). Layers whose
    in_features is not a multiple of `group_size` (int4) stay as they are, with a warning. `include_lm_head` also
    quantizes the output projection; a tied head is untied (the embedding keeps the model dtype). `pack=False`
    keeps int4 weights in the portable layout, for a model that is only going to be saved (`quantize_checkpoint`).
    """
    _check_mode(mode, group_size)
    if quantization_config(model.config) is not None:
        raise ValueError("the model is already quantized")
    names = [name for name, m in model.named_modules()
             if name.startswith("language_model.model.layers.") and isinstance(m, nn.Linear)]
    if include_lm_head:
        names.append("language_model.lm_head")
    done, skipped, slow_cpu = [], [], False
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            if linear.weight.device.type == "meta":
                raise ValueError("quantize_model needs real weights; the model is on the meta device")
            if mode == "int4" and linear.in_features % group_size:
                skipped.append(name)
                continue
            slow_cpu |= pack and linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32
            new = (Int8WeightOnlyLinear.from_linear(linear) if mode == "int8"
                   else Int4WeightOnlyLinear.from_linear(linear, group_size, pack))
            _set_module(model, name, new)
            done.append(name)
    if skipped:
        warnings.warn(f"int4: {len(skipped)} layer(s) left unquantized because in_features is not a multiple of "
                      f"group_size={group_size}: {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}",
                      stacklevel=2)
    if slow_cpu:
        warnings.warn("weight-only int8/int4 on CPU is fast only with bfloat16/float16 activations (torch's CPU "
                      "kernels are not vectorised for float32); this float32 model uses dequantize-and-matmul. "
                      "Load with dtype=bfloat16 for faster decoding.", stacklevel=2)
    qc = {"quant_method": QUANT_METHOD, "mode": mode, "format": _FORMATS[mode], "modules": done}
    if mode == "int4":
        qc["group_size"] = group_size
    config = model.config
    llm = config.llm_config
    if "language_model.lm_head" in done and llm.tie_word_embeddings:
        llm = dataclasses.replace(llm, tie_word_embeddings=False)
        model.language_model.config = llm
    model.config = config.replace(llm_config=llm, extra={**config.extra, "quantization_config": qc})
    return model


# ---- checkpoints ---------------------------------------------------------------------------------------------

def save_quantized(model: NVLM, directory: str | Path, *, tokenizer=None, copy_tokenizer_from: str | Path | None = None,
                   max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
    """Write a quantized model in the official layout (atomically, via `weights.save_checkpoint`)."""
    if quantization_config(model.config) is None:
        raise ValueError("the model is not quantized; call quantize_model first (or use weights.save_checkpoint)")
    return W.save_checkpoint(model, directory, tokenizer=tokenizer, copy_tokenizer_from=copy_tokenizer_from,
                             max_shard_bytes=max_shard_bytes)


def quantize_checkpoint(src: str | Path, dst: str | Path, mode: str, *, group_size: int = 128,
                        include_lm_head: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Checkpoint directory -> quantized checkpoint directory (tokenizer files copied), on the CPU, without packing
    (so nothing is unpacked again to save). The non-quantized tensors and the scales are stored in `dtype`."""
    _check_mode(mode, group_size)
    model = W.load_checkpoint(src, dtype=dtype, device="cpu")
    quantize_model(model, mode, group_size=group_size, include_lm_head=include_lm_head, pack=False)
    return save_quantized(model, dst, copy_tokenizer_from=src)


def is_quantized_checkpoint(directory: str | Path) -> bool:
    """True when `directory/config.json` has a `quantization_config` written by nvlm."""
    try:
        qc = json.loads(Path(directory, "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def load_quantized(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                   device_map: dict | None = None) -> NVLM:
    """Read a checkpoint written by `save_quantized` into an `NVLM` (eval mode): built on `meta`, the same layers
    swapped for quantized modules (int4 packed for their device), every other tensor cast to `dtype`."""
    from .placement import device_for

    directory = Path(path)
    config = NVLMConfig.from_file(directory)
    qc = quantization_config(config)
    if qc is None:
        raise W.CheckpointError(f"{directory} is not a quantized checkpoint (no quantization_config in config.json)")
    tensors = W.checkpoint_tensors(directory)
    dummy = W._dummy_head_plan(config, tensors)
    config = config.replace(vision_config=dataclasses.replace(config.vision_config, num_dummy_heads=dummy))
    model = W.build_model(config, projector_bias="mlp1.1.bias" in tensors)
    expected = dict(model.state_dict(keep_vars=True))  # plain nn.Linear names, on meta
    if config.llm_config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)

    def dev_of(name: str) -> torch.device:
        return device_for(name, device_map) if device_map else torch.device(device)

    def read(name: str) -> torch.Tensor:
        info = tensors[name]
        with open(info.file, "rb", buffering=0) as handle:
            return W._read(info, handle)

    problems, quant_keys = [], set()
    modules = list(qc["modules"])
    for name in modules:
        linear = expected.get(name + ".weight")
        if linear is None:
            problems.append(f"{name}: quantization_config lists a module the model does not have")
            continue
        n, k = linear.shape
        has_bias = name + ".bias" in expected
        if qc["mode"] == "int8":
            want = {"weight": ((n, k), torch.int8), "scales": ((n,), None)}
        else:
            gs = int(qc["group_size"])
            want = {"weight": ((n, k // 2), torch.uint8), "scales": ((n, k // gs), None),
                    "zeros": ((n, k // gs), None)}
        if has_bias:
            want["bias"] = ((n,), None)
        for part, (shape, dt) in want.items():
            key = f"{name}.{part}"
            quant_keys.add(key)
            info = tensors.get(key)
            if info is None:
                problems.append(f"missing {key}")
            elif info.shape != shape or (dt is not None and info.dtype != dt):
                problems.append(f"{key}: checkpoint {info.dtype} {list(info.shape)} vs expected "
                                f"{dt or 'float'} {list(shape)}")
        expected.pop(name + ".weight")
        expected.pop(name + ".bias", None)
    problems += [f"missing {k}" for k in sorted(expected) if k not in tensors]
    problems += [f"unexpected {k}" for k in sorted(tensors) if k not in expected and k not in quant_keys]
    for k, p in expected.items():
        want_shape = tuple(W._pad_dummy(k, torch.empty(p.shape, device="meta"), config).shape)
        if k in tensors and tensors[k].shape != want_shape:
            problems.append(f"{k}: checkpoint {list(tensors[k].shape)} vs expected {list(want_shape)}")
    if problems:
        raise W.CheckpointError(f"{directory} does not match its config.json:\n  " + "\n  ".join(problems[:40]))

    for name in modules:
        dev = dev_of(name + ".weight")
        bias = read(name + ".bias") if name + ".bias" in quant_keys else None
        if qc["mode"] == "int8":
            new = Int8WeightOnlyLinear.from_stored(read(name + ".weight"), read(name + ".scales"), bias,
                                                   device=dev, dtype=dtype)
        else:
            new = Int4WeightOnlyLinear.from_stored(read(name + ".weight"), read(name + ".scales"),
                                                   read(name + ".zeros"), bias, group_size=int(qc["group_size"]),
                                                   device=dev, dtype=dtype)
        _set_module(model, name, new)
    state = {}
    for k in expected:
        t = read(k)
        if dummy and W._is_dummy_sliced(k):
            t = W._slice_dummy(k, t, config, config.vision_config.num_attention_heads + dummy)
        state[k] = (t.to(dtype) if t.is_floating_point() else t).to(dev_of(k)).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    if config.llm_config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model.eval()
