"""Optimisation: learning rate and weight decay per part and head parameter, stage-1 weight decay, cached features."""
import pytest
import torch


def test_weight_decay_and_learning_rate_per_part_and_per_head_parameter():
    from finegrained.model import FineGrainedClassifier
    from finegrained.optim import OptimSettings

    optim = OptimSettings(lr=1e-3, lr_mult={"classifier": 1000.0}, weight_decay=5e-4,
                          weight_decay_mult={"classifier": 0.0})
    model = FineGrainedClassifier(num_classes=3, backbone="vgg16", backbone_weights=None, head="hihca",
                                  head_kwargs={"filters": 16}, backbone_layers=["relu5_2", "relu5_3"], optim=optim)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["head.layer_scales"]["lr"] == pytest.approx(1e-2) and groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["classifier"]["lr"] == pytest.approx(1.0) and groups["classifier"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == pytest.approx(5e-4)
    assert sum(len(g["params"]) for g in groups.values()) == len([p for p in model.parameters() if p.requires_grad])
    assert model.head.layer_scales.tolist() == [0.5, 1.0]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_stage1_weight_decay_applies_in_stage_1_only():
    from finegrained.optim import stage_weight_decay

    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 5e-4}], lr=0.1)
    stage_weight_decay(opt, True, 0.0)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    stage_weight_decay(opt, False, 0.0)
    assert opt.param_groups[0]["weight_decay"] == 5e-4


def test_train_on_cached_features_learns_a_separable_problem():
    from finegrained.losses import loss_function
    from finegrained.optim import train_on_cached_features

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    features = (torch.eye(3)[labels] * 4 + torch.randn(60, 3, generator=g)).half()
    classifier = torch.nn.Linear(3, 3)
    first = loss_function("cross_entropy")(classifier(features.float()), labels).item()
    last = train_on_cached_features(classifier, features, labels, loss_function("cross_entropy"), epochs=30, lr=0.5,
                                    weight_decay=0.0, batch_size=16)
    assert last < 0.1 < first and (classifier(features.float()).argmax(1) == labels).float().mean() > 0.95
