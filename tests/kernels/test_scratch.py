"""kernels.scratch: per-thread reusable buffers."""
from __future__ import annotations

import threading

import torch

from kernels.scratch import drop_scratch, scratch, scratch_bytes


def test_a_buffer_is_reused_and_grows_on_demand():
    drop_scratch()
    first = scratch("test-buffer", (4, 8), torch.float32)
    again = scratch("test-buffer", (2, 8), torch.float32)
    assert again.data_ptr() == first.data_ptr()  # the same storage, viewed smaller
    bigger = scratch("test-buffer", (100, 8), torch.float32)
    assert bigger.shape == (100, 8) and bigger.is_contiguous()
    assert scratch_bytes() == 100 * 8 * 4
    assert scratch("test-buffer", (4, 8), torch.float32).data_ptr() == bigger.data_ptr()


def test_buffers_are_kept_per_name_dtype_and_thread():
    drop_scratch()
    floats = scratch("test-buffer", (16,), torch.float32)
    ints = scratch("test-buffer", (16,), torch.int64)
    other = scratch("test-other", (16,), torch.float32)
    assert len({floats.data_ptr(), ints.data_ptr(), other.data_ptr()}) == 3
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(ptr=scratch("test-buffer", (16,), torch.float32).data_ptr()))
    worker.start()
    worker.join()
    assert seen["ptr"] != floats.data_ptr()
    drop_scratch()
    assert scratch_bytes() == 0


def test_a_buffer_made_in_inference_mode_stays_writable_outside_it():
    drop_scratch()
    with torch.inference_mode():
        made = scratch("test-buffer", (8,), torch.float32)
    scratch("test-buffer", (8,), torch.float32).fill_(1.0)  # would raise for an inference tensor
    assert made.data_ptr() == scratch("test-buffer", (8,), torch.float32).data_ptr()


def test_the_view_of_the_last_shape_is_handed_out_again():
    drop_scratch()
    first = scratch("test-buffer", (4, 8), torch.float32)
    assert scratch("test-buffer", (4, 8), torch.float32) is first
    smaller = scratch("test-buffer", (2, 8), torch.float32)
    assert smaller.shape == (2, 8) and smaller.data_ptr() == first.data_ptr()
    grown = scratch("test-buffer", (64, 8), torch.float32)
    assert grown.shape == (64, 8) and scratch("test-buffer", (64, 8), torch.float32) is grown
    assert scratch("test-buffer", (4, 8), torch.float32).data_ptr() == grown.data_ptr()  # views of the grown one now
