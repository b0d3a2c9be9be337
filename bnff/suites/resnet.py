"""ResNets (He et al. 2016) as torchvision builds them (v1.5: the stride in the 3x3 conv).

Bottleneck blocks (resnet50, resnet101, resnet152): conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-
conv1x1(4x)-BN; basic blocks (resnet18, resnet34): conv3x3(stride)-BN-ReLU-conv3x3-BN. Then the
shortcut (identity, or a strided 1x1 projection conv with BN where the stride or the width
changes: each stage's first block, except resnet18/34's first stage), add, ReLU. Widths
64-128-256-512 per stage; 7x7/2 stem, 3x3/2 max-pool, global average pool, linear."""
from __future__ import annotations

from bnff.suites.graph import Builder, Graph

STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
          "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
BOTTLENECK = {"resnet18": False, "resnet34": False, "resnet50": True, "resnet101": True,
              "resnet152": True}


def resnet(name="resnet50", stages=None, widths=(64, 128, 256, 512), bottleneck=None,
           classes=1000) -> Graph:
    """A built-in name, or (any name) the given stages, widths and block kind."""
    stages = stages or STAGES[name]
    bottleneck = BOTTLENECK.get(name, True) if bottleneck is None else bottleneck
    expansion = 4 if bottleneck else 1
    b = Builder(name, 3)
    x = b.add("conv1", "conv2d", "input", out_channels=64, kernel=7, stride=2, padding=3)
    x = b.add("bn1", "batchnorm", x)
    x = b.add("relu", "relu", x)
    x = b.add("maxpool", "maxpool2d", x, kernel=3, stride=2, padding=1)
    channels = 64
    for si, (blocks, width) in enumerate(zip(stages, widths), 1):
        for bi in range(blocks):
            p = f"layer{si}.{bi}"
            stride = 2 if bi == 0 and si > 1 else 1
            if bottleneck:
                h = b.add(f"{p}.conv1", "conv2d", x, out_channels=width, kernel=1)
                h = b.add(f"{p}.bn1", "batchnorm", h)
                h = b.add(f"{p}.relu1", "relu", h)
                h = b.add(f"{p}.conv2", "conv2d", h, out_channels=width, kernel=3,
                          stride=stride, padding=1)
                h = b.add(f"{p}.bn2", "batchnorm", h)
                h = b.add(f"{p}.relu2", "relu", h)
                h = b.add(f"{p}.conv3", "conv2d", h, out_channels=width * expansion, kernel=1)
                h = b.add(f"{p}.bn3", "batchnorm", h)
            else:
                h = b.add(f"{p}.conv1", "conv2d", x, out_channels=width, kernel=3,
                          stride=stride, padding=1)
                h = b.add(f"{p}.bn1", "batchnorm", h)
                h = b.add(f"{p}.relu1", "relu", h)
                h = b.add(f"{p}.conv2", "conv2d", h, out_channels=width, kernel=3, padding=1)
                h = b.add(f"{p}.bn2", "batchnorm", h)
            shortcut = x
            if stride != 1 or channels != width * expansion:
                shortcut = b.add(f"{p}.downsample.conv", "conv2d", x,
                                 out_channels=width * expansion, kernel=1, stride=stride)
                shortcut = b.add(f"{p}.downsample.bn", "batchnorm", shortcut)
            channels = width * expansion
            h = b.add(f"{p}.add", "add", [h, shortcut])
            x = b.add(f"{p}.relu{3 if bottleneck else 2}", "relu", h)
    x = b.add("avgpool", "global_avgpool", x)
    return b.graph(b.add("fc", "linear", x, out_features=classes))
