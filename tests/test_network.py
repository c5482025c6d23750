"""FineGrainedNetwork: a plain module (no Lightning), timm's interface, weights from one place."""
import subprocess
import sys

import pytest
import torch

from finegrained.network import FineGrainedNetwork, InferenceNetwork


def tiny_network(**kwargs):
    defaults = dict(num_classes=3, backbone="resnet18", backbone_weights=None, last_stride=1, head="isqrt",
                    head_kwargs={"reduction": 8})
    return FineGrainedNetwork(**{**defaults, **kwargs})


def test_importing_the_network_imports_no_lightning():
    code = ("import sys, finegrained.network, finegrained.network_weights, finegrained.features; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pytorch_lightning', 'lightning', "
            "'lightning_fabric', 'torchmetrics'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_forward_is_forward_head_of_forward_features():
    net = tiny_network().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = net.forward_features(x)
        assert features.shape == (2, net.num_features) == (2, 36)
        torch.testing.assert_close(net(x), net.forward_head(features))
        torch.testing.assert_close(features, net.head(net.backbone(x)))


def test_reset_classifier_gives_a_new_output_size_and_keeps_the_rest():
    net = tiny_network()
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    net.reset_classifier(7)
    assert net.num_classes == 7 and net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert all(torch.equal(v, net.head.state_dict()[k]) for k, v in head_before.items())
    with pytest.raises(ValueError, match="computes class scores itself"):
        tiny_network(head="lrbp", head_kwargs={"reduction": 8, "rank": 2}).reset_classifier(5)


def test_init_from_copies_matching_tensors_and_lists_the_others(tmp_path):
    source = tiny_network(num_classes=5)
    path = tmp_path / "fit.ckpt"
    # A checkpoint of finegrained fit: the LightningModule keeps the network as `network`.
    torch.save({"hyper_parameters": {}, "state_dict": {f"network.{k}": v for k, v in source.state_dict().items()}},
               path)
    net = tiny_network(num_classes=3, init_from=str(path))
    assert net.dropped_from_init == ["classifier.1.bias", "classifier.1.weight"]
    for name, value in net.backbone.state_dict().items():
        assert torch.equal(value, source.backbone.state_dict()[name]), name
    assert not torch.equal(net.classifier[1].weight[:3], source.classifier[1].weight[:3])


def test_init_from_reads_checkpoints_written_before_the_network_was_a_module(tmp_path):
    source = tiny_network()
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": source.state_dict()}, path)  # keys backbone..., head...
    net = tiny_network(init_from=str(path))
    assert net.dropped_from_init == []
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net.eval()(x), source.eval()(x))


def test_inference_network_averages_the_flip():
    net = tiny_network().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(InferenceNetwork(net, test_flip=True)(x),
                                   (net(x) + net(torch.flip(x, dims=[3]))) / 2)
        torch.testing.assert_close(InferenceNetwork(net, test_flip=False)(x), net(x))


def test_channels_last_changes_no_value():
    torch.manual_seed(0)
    plain = tiny_network().eval()
    torch.manual_seed(0)
    fast = tiny_network(channels_last=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_timm_interface_reset_to_no_classifier_and_pre_logits():
    net = tiny_network().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = net.forward_features(x)
        torch.testing.assert_close(net.forward_head(features, pre_logits=True), features)
        net.reset_classifier(0)  # timm: no classifier, the network returns its features
        torch.testing.assert_close(net(x), features)
    assert isinstance(net.get_classifier(), torch.nn.Identity)


def test_init_from_takes_a_networks_own_state_dict_and_refuses_other_files(tmp_path):
    source = tiny_network()
    path = tmp_path / "net.pt"
    torch.save(source.state_dict(), path)
    net = tiny_network(init_from=str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net.eval()(x), source.eval()(x))
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="neither a FineGrainedClassifier checkpoint .* nor a FineGrainedNetwork state dict"):
        tiny_network(init_from=str(other))
