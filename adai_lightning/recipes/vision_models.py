"""torchvision ResNets and DenseNet-121 for the paper's vision recipes, with the CIFAR variant's stem.

On 32x32 CIFAR images the paper's models (like most CIFAR code) replace the ImageNet stem (7x7
stride-2 convolution and a 3x3 max-pool, which shrink 32x32 to 8x8 before the first block) by a 3x3
stride-1 convolution and no pooling. ``small_inputs=False`` keeps torchvision's ImageNet model.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

RESNET_LAYOUTS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
                  101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}


def _cifar_stem(out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)


class ResNetBackbone(ResNet):
    """torchvision's ResNet-``depth`` (18, 34, 50, 101, 152); ``small_inputs`` selects the 32x32 stem."""

    def __init__(self, depth: int = 18, num_classes: int = 10, small_inputs: bool = True) -> None:
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"Invalid depth: {depth}; it must be one of {sorted(RESNET_LAYOUTS)}")
        block, layers = RESNET_LAYOUTS[depth]
        super().__init__(block, layers, num_classes=num_classes)
        if small_inputs:
            self.conv1 = _cifar_stem(64)
            self.maxpool = nn.Identity()


class DenseNet121Backbone(DenseNet):
    """torchvision's DenseNet-121 (growth 32, blocks 6-12-24-16); ``small_inputs`` selects the 32x32 stem."""

    def __init__(self, num_classes: int = 10, small_inputs: bool = True) -> None:
        super().__init__(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                         num_classes=num_classes)
        if small_inputs:
            self.features.conv0 = _cifar_stem(64)
            self.features.pool0 = nn.Identity()
