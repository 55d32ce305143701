"""The key convolution against a plain per-token reference: packed sequences, halos, gradients, and
the widths it refuses."""

import pytest
import torch

from moba_megatron.ops.key_conv import (
    check_key_conv_width,
    identity_key_conv_weight,
    key_conv,
    sequence_positions,
)


def reference(k, weight, cu):
    """``k'[t] = sum_j w[..., j] k[t - j]`` token by token, stopping at each sequence's start."""
    out = torch.zeros_like(k)
    for s0, s1 in zip(cu[:-1], cu[1:]):
        for t in range(s0, s1):
            for j in range(weight.shape[-1]):
                if t - j >= s0:
                    out[t] += weight[..., j] * k[t - j]
    return out


@pytest.mark.parametrize("width", [2, 3, 5])
@pytest.mark.parametrize("cu", [[0, 9], [0, 1, 7, 7, 12], [0, 2, 3]])
def test_conv_matches_the_reference_and_keeps_sequences_apart(width, cu):
    g = torch.Generator().manual_seed(width)
    k = torch.randn(cu[-1], 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, width, generator=g, dtype=torch.float64, requires_grad=True)
    out = key_conv(k, weight, sequence_positions(cu))
    want = reference(k, weight, cu)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (k, weight), dout)
    want_grads = torch.autograd.grad(want, (k, weight), dout)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)
    # a sequence's keys do not reach into the next one
    if len(cu) > 2:
        moved = k.detach().clone()
        moved[: cu[1]] += 100
        changed = (key_conv(moved, weight, sequence_positions(cu)) - out).abs().sum(dim=(1, 2, 3)) > 0
        assert changed[: cu[1]].all() and not changed[cu[1] :].any()


def test_gradients_against_finite_differences():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(7, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    positions = sequence_positions([0, 4, 7])
    assert torch.autograd.gradcheck(lambda k, w: key_conv(k, w, positions), (k, weight))


def test_identity_start_leaves_the_keys_unchanged():
    k = torch.randn(10, 2, 3, 8)
    out = key_conv(k, identity_key_conv_weight(3, 8, 4), sequence_positions([0, 6, 10]))
    assert torch.equal(out, k)


def test_a_halo_continues_the_sequence_across_a_split():
    """A chunk given the keys before it (its halo) gets what the unsplit sequence gets there."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(16, 1, 2, 4, generator=g)
    weight = torch.randn(2, 4, 3, generator=g)
    whole = key_conv(k, weight, torch.arange(16))
    tail = key_conv(k[10:], weight, torch.arange(10, 16), halo=k[8:10])
    torch.testing.assert_close(tail, whole[10:])
    assert not torch.allclose(key_conv(k[10:], weight, torch.arange(10, 16)), whole[10:])  # without it: wrong


@pytest.mark.parametrize("width,chunk,match", [
    (1, 8, "0 \\(off\\) or a width >= 2, got 1"),
    (-2, 8, "0 \\(off\\) or a width >= 2, got -2"),
    (2.0, 8, "got 2.0"),
    (9, 8, "moba_key_conv 9 is wider than moba_chunk_size 8"),
])
def test_bad_widths_are_refused(width, chunk, match):
    with pytest.raises(ValueError, match=match):
        check_key_conv_width(width, chunk)
    assert check_key_conv_width(0, 8) == 0 and check_key_conv_width(8, 8) == 8
