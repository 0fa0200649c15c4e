"""Per-thread scratch buffers (nvformer.core.scratch)."""

from __future__ import annotations

import threading

import torch

from nvformer.core import scratch as sc


def test_scratch_views_are_shaped_disjoint_and_reused():
    a, b = sc.scratch("test", [(2, 3), (4,)], torch.float32, "cpu")
    assert a.shape == (2, 3) and b.shape == (4,) and a.is_contiguous()
    assert a.data_ptr() + 6 * 4 == b.data_ptr()  # one buffer, one after the other
    again = sc.scratch("test", [(2, 3), (4,)], torch.float32, "cpu")
    assert again[0].data_ptr() == a.data_ptr()  # reused, not reallocated
    other = sc.scratch("other", [(2, 3)], torch.float32, "cpu")[0]
    assert other.data_ptr() != a.data_ptr()  # each user its own buffer
    wide = sc.scratch("test", [(2, 3)], torch.float64, "cpu")[0]
    assert wide.dtype == torch.float64 and wide.data_ptr() != a.data_ptr()


def test_scratch_is_per_thread():
    here = sc.scratch("test", [(1000,)], torch.float32, "cpu")[0]
    there = []
    t = threading.Thread(target=lambda: there.append(sc.scratch("test", [(1000,)], torch.float32, "cpu")[0]))
    t.start()
    t.join()
    assert there[0].data_ptr() != here.data_ptr()


def test_scratch_is_cpu_only_and_capped(monkeypatch):
    assert sc.scratch("test", [(10,)], torch.float32, "meta") is None
    assert sc.scratch("test", [(0,)], torch.float32, "cpu") is None
    monkeypatch.setattr(sc, "MAX_BYTES", 1000 * 4 - 1)
    assert sc.scratch("test", [(1000,)], torch.float32, "cpu") is None
    assert sc.scratch("test", [(999,)], torch.float32, "cpu") is not None


def test_release_frees_only_this_threads_buffers():
    sc.release()
    assert sc.held_bytes() == 0
    a = sc.scratch("test", [(256,)], torch.float32, "cpu")[0]
    sc.scratch("other", [(16,)], torch.float64, "cpu")
    assert sc.held_bytes() == 256 * 4 + 16 * 8
    there = []

    def elsewhere():
        sc.scratch("test", [(8,)], torch.float32, "cpu")
        sc.release()
        there.append(sc.held_bytes())

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert there == [0] and sc.held_bytes() == 256 * 4 + 16 * 8  # the other thread's release left ours
    a.fill_(1.0)
    sc.release()
    assert sc.held_bytes() == 0 and bool((a == 1.0).all())  # a view the caller holds keeps its memory
