"""nvlm: NVIDIA NVLM-D (InternViT + pixel shuffle + MLP projector + Qwen2) as a clean PyTorch package."""

__version__ = "0.1.0"
