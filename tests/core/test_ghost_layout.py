"""Ghost views: all whole chunks in one strided view (one kernel call, no loop over
chunks), a shorter last chunk in a second view, no copies."""

from __future__ import annotations

import torch

from batchnorm.core.layout import channel_view, ghost_views


def test_whole_chunks_form_one_view_sharing_the_inputs_memory():
    x = torch.randn(12, 3, 5)
    view = channel_view(x, 1)
    (chunks,) = ghost_views(view, 4)
    assert chunks.x.shape == (3, 4, 3, 5)
    assert chunks.reduce_dims == (1, 3) and chunks.param_shape == (1, 1, 3, 1)
    assert chunks.x.data_ptr() == x.data_ptr()
    torch.testing.assert_close(chunks.x[1], x[4:8], rtol=0, atol=0)


def test_uneven_batch_adds_one_view_for_the_shorter_last_chunk():
    x = torch.randn(10, 2, 3, 3).to(memory_format=torch.channels_last)
    view = channel_view(x, 1)  # (N*H*W, C) rows, 9 per sample
    whole, rest = ghost_views(view, 4 * 9)
    assert whole.x.shape == (2, 36, 2) and rest.x.shape == (1, 18, 2)
    assert whole.x.data_ptr() == x.data_ptr()
    assert rest.x.data_ptr() == x.data_ptr() + 72 * 2 * x.element_size()
    restored = torch.cat([whole.restore(whole.x), rest.restore(rest.x)])
    torch.testing.assert_close(view.restore(restored), x, rtol=0, atol=0)
