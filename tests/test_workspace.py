"""Scratch buffers of the CPU path and the in-place activations that write into them."""

import threading

import pytest
import torch

from moe import workspace
from moe.activations import ActivationSpec, expert_activation, expert_activation_
from moe.backends import loop_ffn
from moe.config import Activation
from moe.workspace import release_scratch, scratch


def test_scratch_reuses_one_buffer_per_name_and_grows():
    release_scratch()
    a = scratch("t.a", (4, 8))
    assert a.shape == (4, 8) and a.is_contiguous()
    assert scratch("t.a", (2, 3)).data_ptr() == a.data_ptr()  # smaller: same memory
    assert scratch("t.b", (4, 8)).data_ptr() != a.data_ptr()  # another name: its own buffer
    assert scratch("t.a", (4, 8), dtype=torch.float64).data_ptr() != a.data_ptr()
    bigger = scratch("t.a", (40, 8))
    assert bigger.shape == (40, 8)
    assert scratch("t.a", (40, 8)).data_ptr() == bigger.data_ptr()
    release_scratch()
    assert not workspace._local.__dict__.get("buffers")  # nothing held any more


def test_scratch_is_per_thread():
    release_scratch()
    mine = scratch("t.thread", (16,))
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(scratch("t.thread", (16,)).data_ptr()))
    worker.start()
    worker.join()
    assert theirs and theirs[0] != mine.data_ptr()
    release_scratch()


def test_scratch_made_under_inference_mode_is_not_reused_outside_it():
    release_scratch()
    with torch.inference_mode():
        inside = scratch("t.mode", (4, 8))
        assert inside.is_inference()
    outside = scratch("t.mode", (4, 8))
    assert not outside.is_inference() and outside.data_ptr() != inside.data_ptr()
    outside += 1  # an inference tensor would refuse this in-place update
    release_scratch()


@pytest.mark.parametrize("activation", list(Activation))
def test_inplace_activation_equals_the_out_of_place_one(activation):
    h = 4 * torch.randn(9, 14 if activation.gated else 7)  # +-4: past gpt-oss' clamp limit of 7 after scaling
    h[0, 0], h[1, -1] = 9.0, -9.0
    expected = expert_activation(h.clone(), activation)
    got = expert_activation_(h, activation)
    assert torch.equal(got, expected)
    assert got.data_ptr() == h.data_ptr()  # a view of the input: nothing new allocated for the result


def test_block_path_results_do_not_alias_the_scratch_buffer():
    """Two calls in a row through the scratch-backed grouped path: the first result survives the second."""
    torch.manual_seed(0)
    counts = torch.tensor([60, 0, 90, 51])  # mean rows per expert past BLOCK_GEMM_MIN_ROWS: the block GEMM
    w13, w2 = 0.2 * torch.randn(4, 48, 40), 0.2 * torch.randn(4, 40, 24)
    x1, x2 = torch.randn(201, 40), torch.randn(201, 40)
    y1 = loop_ffn(x1, counts, w13, w2, ActivationSpec())
    kept = y1.clone()
    y2 = loop_ffn(x2, counts, w13, w2, ActivationSpec())
    assert torch.equal(y1, kept)
    assert not torch.equal(y1, y2)
