"""``finegrained bench step``: training-step images/s of backbone + head against backbone + GAP.

One SGD step (forward, cross-entropy, backward, update) on random images, for each backbone and each head
beside GAP on the same backbone, interleaved in rounds; the ratio is the head's step time over GAP's. On
CUDA it runs as published GPU training does: channels_last and bf16 autocast (matrix functions in float32).
Transformers from timm hand their class token to the heads that use it (SoT), as in training.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

from finegrained.bench.timing import interleaved_medians

DEFAULT_BACKBONES = ("resnet50", "timm/convnext_tiny", "timm/vit_small_patch16_224")
DEFAULT_HEADS = ("isqrt", "sot")


def published_last_stride(backbone: str) -> int:
    """1 where the fine-grained recipes remove the last down-sampling (torchvision ResNets, ...), else 2: VGG
    already ends at relu5_3 (stride 16), and timm models keep their own stride (ViTs cannot change it)."""
    return 2 if backbone.startswith(("vgg", "timm/")) else 1


def bench_step(device: torch.device, backbone: str = "resnet50", heads: Union[str, Sequence[str]] = DEFAULT_HEADS,
               size: int = 448, batch: int = 2, repeats: int = 3, autocast: bool = False) -> List[dict]:
    from finegrained.backbones import build_backbone
    from finegrained.network import FineGrainedNetwork

    heads = [heads] if isinstance(heads, str) else list(heads)
    rows = []
    net = build_backbone(backbone, weights=None, last_stride=published_last_stride(backbone)).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    if device.type == "cuda":  # the published GPU setting: channels_last, bf16 autocast
        net = net.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    steps = {}
    for name in ["gap"] + [h for h in heads if h != "gap"]:
        # The network fit trains, one per head around the one backbone (built once: the heads are timed interleaved).
        network = FineGrainedNetwork(10, backbone=net, backbone_weights=None, head=name).to(device)
        opt = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
        class_token = net.return_class_token

        def step(network=network, opt=opt, class_token=class_token):
            net.return_class_token = class_token
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = network(images)
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            opt.step()

        steps[name] = step
    timings = interleaved_medians(steps, device, repeats, warmup=1)
    net.return_class_token = False
    for name in steps:
        rows.append({"backbone": backbone, "head": name, "size": size, "batch": batch,
                     "precision": "bf16 autocast" if autocast else "float32",
                     "images_per_s": batch / timings[name], "overhead_vs_gap": timings[name] / timings["gap"]})
    return rows
