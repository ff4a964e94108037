"""HeadAttention against attention written out by hand."""
import torch

from kddetr.models.layers import HeadAttention


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def test_narrow_values_with_padding_mask_match_reference():
    """DAB-DETR cross-attention: queries/keys twice as wide as values, padded keys blocked."""
    torch.manual_seed(0)
    b, h, n, s, d = 2, 4, 7, 11, 8
    q, k = torch.randn(b, h, n, 2 * d), torch.randn(b, h, s, 2 * d)
    v = torch.randn(b, h, s, d, requires_grad=True)
    allowed = torch.ones(b, 1, 1, s, dtype=torch.bool)
    allowed[1, ..., -4:] = False
    attn = HeadAttention(h * d)
    out = attn(q, k, v, allowed)
    expected = attn.out_proj(reference_attention(q, k, v, allowed).transpose(1, 2).flatten(2))
    assert out.shape == (b, n, h * d)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad, = torch.autograd.grad(out.sum(), v)
    assert grad[1, :, -4:].abs().max() == 0  # blocked keys pass nothing back
    assert grad[0, :, -4:].abs().max() > 0
