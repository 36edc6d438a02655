"""kernels.hugepages: aligned, usable storage for large tables; plain tensors for small ones; a
caller's table moved onto huge pages in place."""
from __future__ import annotations

import torch

from kernels.hugepages import HUGE_PAGE, collapse_to_huge, empty_huge


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


def _huge_kib_around(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_collapse_keeps_the_contents_and_where_it_reports_success_the_pages_are_huge():
    table = torch.randn(48 * HUGE_PAGE // 4)  # 96 MiB of float32 on plain pages: 47 whole huge pages inside
    before = table.clone()
    done = collapse_to_huge(table)
    assert torch.equal(table, before)
    if done:  # Linux 6.1+ with transparent huge pages: the aligned inside is now on huge pages
        # Most of them: one run read 40 of the 47 as huge right after a collapse that succeeded.
        assert _huge_kib_around(table.data_ptr() + table.numel() * 2) >= 24 * HUGE_PAGE // 1024


def test_collapse_leaves_small_and_strided_tensors_alone():
    assert not collapse_to_huge(torch.ones(10, 3))
    assert not collapse_to_huge(torch.ones(48 * HUGE_PAGE // 8, 2)[:, 0])
