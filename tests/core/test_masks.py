"""Additive-mask helpers: which keys a Hugging Face mask hides, in every float dtype."""

import pytest
import torch

from nvformer.core.masks import hidden, key_padding_from_bias


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_hidden_reads_hugging_face_masks(dtype):
    lo = torch.finfo(dtype).min  # what Hugging Face writes for a hidden key
    bias = torch.tensor([[0.0, lo, -1e3, float("-inf"), lo / 4]], dtype=dtype)
    assert hidden(bias).tolist() == [[False, True, False, True, False]]


def test_key_padding_is_what_every_query_hides():
    lo = torch.finfo(torch.float32).min
    bias = torch.zeros(2, 1, 3, 4)
    bias[0, ..., 3] = lo  # row 0: key 3 padded
    bias[1, :, :2, 1] = lo  # row 1: key 1 hidden from two queries only: not padding
    assert key_padding_from_bias(bias, 2, 4).tolist() == [[False, False, False, True], [False, False, False, False]]
