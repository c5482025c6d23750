"""Loss functions: LRBP's one-vs-all hinge, values and gradient as its official code computes them."""
import pytest
import torch


def test_one_vs_all_hinge_as_in_the_lrbp_code():
    from finegrained.losses import one_vs_all_hinge

    scores = torch.tensor([[2.0, 0.5, -3.0], [0.2, -0.9, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    # image 0: true 2.0 -> 0; 0.5 -> 1.5 (not above 1.5: kept); -3 -> 0. image 1: 0.2 -> 1.2; -0.9 -> 1.9 > 1.5: 0.19;
    # 1.0 -> 2.0 > 1.5: 0.2.
    expected = (1.5 + 1.2 + 0.19 + 0.2) / 2
    loss = one_vs_all_hinge(scores, labels)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert scores.grad.flatten().tolist() == pytest.approx([0.0, 0.5, 0.0, 0.5, -0.05, 0.05])
