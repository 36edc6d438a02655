"""kernels.hugepages: aligned, usable storage for large tables; plain tensors for small ones."""
from __future__ import annotations

import torch

from kernels.hugepages import HUGE_PAGE, empty_huge


def test_large_tensors_start_on_a_huge_page_and_behave_as_tensors():
    t = empty_huge((40 * HUGE_PAGE // 256, 128), torch.bfloat16)
    assert t.shape == (40 * HUGE_PAGE // 256, 128) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(1.5)
    t[-1] = 2
    assert float(t.float().sum()) == 1.5 * 128 * (t.shape[0] - 1) + 2 * 128


def test_small_tensors_are_plain():
    t = empty_huge((10, 3), torch.float32)
    assert t.shape == (10, 3) and t.dtype == torch.float32
