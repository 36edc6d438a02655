"""Compute kernels: one public op per module, each with a PyTorch reference and a Triton version."""
from kernels.cosine_topk import cosine_topk, prepare_table

__all__ = ["cosine_topk", "prepare_table"]
