"""Every head stays finite, forward and backward, under bf16 and fp16 autocast at extreme feature scales."""
import pytest
import torch

from finegrained.heads import build_head


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1e-8), (torch.bfloat16, 1.0), (torch.bfloat16, 1e8),
                                         (torch.float16, 1e-8), (torch.float16, 1.0), (torch.float16, 1e3)])
def test_every_head_finite_under_autocast(dtype, scale):
    # fp16 cannot hold features at 1e8 (its largest value is 65,504): a backbone in fp16 would have
    # overflowed before the head; bf16 has float32's range and is tested there.
    from tests.heads.test_heads import ALL_HEADS, SMALL

    for name in ALL_HEADS:
        head = build_head(name, 8, **SMALL[name])
        x = (torch.randn(2, 8, 4, 4).relu() * scale).requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            out = head(x)
        (out.float() * torch.randn_like(out.float())).sum().backward()
        assert torch.isfinite(out).all(), (name, dtype, scale)
        assert torch.isfinite(x.grad).all(), (name, dtype, scale)
