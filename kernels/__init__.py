"""Compute kernels: one public op per module, each with a PyTorch reference and a Triton version."""
from kernels.cosine_topk import cosine_topk

__all__ = ["cosine_topk"]
