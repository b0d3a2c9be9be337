"""VGG-16 with batch normalization (Simonyan and Zisserman 2015; torchvision's vgg16_bn):
thirteen 3x3 convs (with bias) each followed by BN and ReLU, in five stages of 64-128-256-512-
512 channels closed by 2x2/2 max-pools, then the classifier on the flattened 512x7x7 map:
linear 4096, ReLU, linear 4096, ReLU, linear 1000.

Differences from torchvision, neither changing parameters or FLOPs: its AdaptiveAvgPool2d(7)
is the identity at 224x224 and is left out, so `flatten` takes a 7x7 map (images of 224 to
255 pixels); its two Dropout layers are left out (deterministic iterations here)."""
from __future__ import annotations

from bnff.suites.graph import Builder, Graph

CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
          "M")


def vgg(name="vgg16_bn", config=CONFIG, classes=1000, hidden=4096, size=7) -> Graph:
    b = Builder(name, 3)
    x, i = "input", 0
    for v in config:
        if v == "M":
            x = b.add(f"features.{i}", "maxpool2d", x, kernel=2, stride=2)
            i += 1
            continue
        x = b.add(f"features.{i}", "conv2d", x, out_channels=v, kernel=3, padding=1, bias=True)
        x = b.add(f"features.{i + 1}", "batchnorm", x)
        x = b.add(f"features.{i + 2}", "relu", x)
        i += 3
    x = b.add("flatten", "flatten", x, size=size)
    x = b.add("classifier.0", "linear", x, out_features=hidden)
    x = b.add("classifier.1", "relu", x)
    x = b.add("classifier.3", "linear", x, out_features=hidden)
    x = b.add("classifier.4", "relu", x)
    return b.graph(b.add("classifier.6", "linear", x, out_features=classes))
