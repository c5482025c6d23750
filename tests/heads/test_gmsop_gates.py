"""GM-SOP's top-K gates: ties broken at random in training, by the lowest index in evaluation."""
import torch


def test_gmsop_training_breaks_gate_ties_at_random():
    """From the paper's constant initialisation every gate logit ties; training must still use all components."""
    from finegrained.heads import build_head

    torch.manual_seed(0)
    head = build_head("gmsop", 16, mid_channels=8, out_channels=4).train()
    selected = torch.zeros(16, dtype=torch.bool)
    for _ in range(20):
        head(torch.randn(8, 16, 5, 5).relu())
        assert (head.last_gates > 0).sum(1).eq(8).all()  # still exactly K = 8 per image
        selected |= (head.last_gates > 0).any(0)
    assert selected.all(), f"components never selected: {(~selected).nonzero().flatten().tolist()}"


def test_gmsop_evaluation_keeps_the_deterministic_tie_rule():
    from finegrained.heads import build_head

    head = build_head("gmsop", 16, mid_channels=8, out_channels=4).eval()
    x = torch.randn(4, 16, 5, 5).relu()
    head(x)
    first = head.last_gates.clone()
    head(x)
    assert torch.equal(first, head.last_gates)
    assert torch.equal((first > 0).nonzero()[:, 1].view(4, 8), torch.arange(8).expand(4, 8))  # ties -> lowest indices
