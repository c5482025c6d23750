"""``finegrained bench step``: training-step images/s of backbone + head against backbone + GAP."""
from __future__ import annotations

from typing import List

import torch

from finegrained.bench.timing import interleaved_medians


def bench_step(device: torch.device, backbone: str = "resnet50", head: str = "isqrt", size: int = 448,
               batch: int = 2, repeats: int = 3, autocast: bool = False) -> List[dict]:
    from finegrained.backbones import build_backbone
    from finegrained.heads import build_head

    rows = []
    last_stride = 2 if backbone.startswith("vgg") else 1  # VGG already ends at relu5_3 (stride 16)
    net = build_backbone(backbone, weights=None, last_stride=last_stride).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    if device.type == "cuda":  # the published GPU setting: channels_last, bf16 autocast
        net = net.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    steps = {}
    for name in ("gap", head):
        pool = build_head(name, net.out_channels).to(device)
        fc = torch.nn.Linear(pool.output_dim, 10).to(device)
        opt = torch.optim.SGD(list(net.parameters()) + list(pool.parameters()) + list(fc.parameters()),
                              lr=1e-3, momentum=0.9)

        def step(pool=pool, fc=fc, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = fc(pool(net(images)))
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            opt.step()

        steps[name] = step
    timings = interleaved_medians(steps, device, repeats, warmup=1)
    for name in steps:
        rows.append({"backbone": backbone, "head": name, "size": size, "batch": batch,
                     "images_per_s": batch / timings[name], "overhead_vs_gap": timings[name] / timings["gap"]})
    return rows
