"""Activation-gradient clipping clamps the gradients of layer outputs, not those of the parameters."""
import torch


def test_activation_gradients_are_clamped_not_parameter_gradients():
    from finegrained.callbacks.activation_clipping import clip_activation_gradients

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    clip_activation_gradients(net, 1.0)
    seen = {}

    def record(module, inputs, output):
        output.register_hook(lambda g: seen.setdefault("grad", g.clone()))

    net[0].register_forward_hook(record)
    x = 100 * torch.ones(1, 2)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].weight.fill_(10.0)
    (net(x) * 100).sum().backward()
    assert seen["grad"].abs().max() <= 1.0  # the layer output's derivative (1000 unclipped) arrives clamped
    # d loss / d W1 = (clamped derivative 1) × (layer-0 output 200): parameter gradients are not clipped
    assert net[1].weight.grad.abs().max() > 100.0
