"""ResNet-50 v1.5 (He et al. 2016; torchvision's resnet50): bottleneck blocks
conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN, plus the shortcut (identity, or a
strided 1x1 projection conv with BN in each stage's first block), add, ReLU; stages 3-4-6-3
with widths 64-128-256-512; 7x7/2 stem, 3x3/2 max-pool, global average pool, linear."""
from __future__ import annotations

from bnff.suites.graph import Builder, Graph


def resnet(name="resnet50", stages=(3, 4, 6, 3), widths=(64, 128, 256, 512), expansion=4,
           classes=1000) -> Graph:
    b = Builder(name, 3)
    x = b.add("conv1", "conv2d", "input", out_channels=64, kernel=7, stride=2, padding=3)
    x = b.add("bn1", "batchnorm", x)
    x = b.add("relu", "relu", x)
    x = b.add("maxpool", "maxpool2d", x, kernel=3, stride=2, padding=1)
    for si, (blocks, width) in enumerate(zip(stages, widths), 1):
        for bi in range(blocks):
            p = f"layer{si}.{bi}"
            stride = 2 if bi == 0 and si > 1 else 1
            h = b.add(f"{p}.conv1", "conv2d", x, out_channels=width, kernel=1)
            h = b.add(f"{p}.bn1", "batchnorm", h)
            h = b.add(f"{p}.relu1", "relu", h)
            h = b.add(f"{p}.conv2", "conv2d", h, out_channels=width, kernel=3, stride=stride,
                      padding=1)
            h = b.add(f"{p}.bn2", "batchnorm", h)
            h = b.add(f"{p}.relu2", "relu", h)
            h = b.add(f"{p}.conv3", "conv2d", h, out_channels=width * expansion, kernel=1)
            h = b.add(f"{p}.bn3", "batchnorm", h)
            shortcut = x
            if bi == 0:
                shortcut = b.add(f"{p}.downsample.conv", "conv2d", x,
                                 out_channels=width * expansion, kernel=1, stride=stride)
                shortcut = b.add(f"{p}.downsample.bn", "batchnorm", shortcut)
            h = b.add(f"{p}.add", "add", [h, shortcut])
            x = b.add(f"{p}.relu3", "relu", h)
    x = b.add("avgpool", "global_avgpool", x)
    return b.graph(b.add("fc", "linear", x, out_features=classes))
