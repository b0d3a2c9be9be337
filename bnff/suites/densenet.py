"""DenseNet-121, -169 and -201 (Huang et al. 2017; torchvision's densenet121/169/201): growth
32, blocks 6-12-24-16, 6-12-32-32 and 6-12-48-32, bottleneck width 4x growth, compression
0.5. Each dense layer is BN-ReLU-conv1x1(128)-BN-ReLU-conv3x3(32) on the concatenation of the
block input and all earlier layers' outputs; transitions are BN-ReLU-conv1x1-avgpool 2x2/2."""
from __future__ import annotations

from bnff.suites.graph import Builder, Graph

BLOCKS = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32),
          "densenet201": (6, 12, 48, 32)}


def densenet(name="densenet121", growth=32, blocks=None, stem=64, bn_size=4,
             compression=0.5, classes=1000) -> Graph:
    """A built-in name, or (any name) the given growth, blocks and stem."""
    blocks = blocks or BLOCKS[name]
    b = Builder(name, 3)
    x = b.add("conv0", "conv2d", "input", out_channels=stem, kernel=7, stride=2, padding=3)
    x = b.add("norm0", "batchnorm", x)
    x = b.add("relu0", "relu", x)
    x = b.add("pool0", "maxpool2d", x, kernel=3, stride=2, padding=1)
    channels = stem
    for bi, layers in enumerate(blocks, 1):
        features = [x]
        for li in range(1, layers + 1):
            p = f"block{bi}.layer{li}"
            h = features[0] if len(features) == 1 else b.add(f"{p}.cat", "concat", features)
            h = b.add(f"{p}.norm1", "batchnorm", h)
            h = b.add(f"{p}.relu1", "relu", h)
            h = b.add(f"{p}.conv1", "conv2d", h, out_channels=bn_size * growth, kernel=1)
            h = b.add(f"{p}.norm2", "batchnorm", h)
            h = b.add(f"{p}.relu2", "relu", h)
            features.append(b.add(f"{p}.conv2", "conv2d", h, out_channels=growth, kernel=3,
                                  padding=1))
        x = b.add(f"block{bi}.cat", "concat", features)
        channels += layers * growth
        if bi < len(blocks):
            p = f"trans{bi}"
            channels = int(channels * compression)
            x = b.add(f"{p}.norm", "batchnorm", x)
            x = b.add(f"{p}.relu", "relu", x)
            x = b.add(f"{p}.conv", "conv2d", x, out_channels=channels, kernel=1)
            x = b.add(f"{p}.pool", "avgpool2d", x, kernel=2, stride=2)
    x = b.add("norm5", "batchnorm", x)
    x = b.add("relu5", "relu", x)
    x = b.add("pool5", "global_avgpool", x)
    return b.graph(b.add("classifier", "linear", x, out_features=classes))
