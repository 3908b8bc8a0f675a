"""Small hand-written CNNs with BatchNorm for the folding tests (torchvision is not importable here).

`randomize_batchnorms` gives every BatchNorm random statistics and affine so a wrong fold shows up;
default BN statistics (mean 0, var 1, γ 1, β 0) make BN nearly the identity and hide mistakes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                n = module.num_features
                if module.affine:
                    module.weight.copy_(torch.randn(n, generator=generator) * 0.5 + 1.0)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
                if not module.track_running_stats:
                    continue
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2.0 + 0.2)
    return model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + identity (or a 1x1 conv-BN downsample), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """stem → two basic blocks (the second downsamples) → global average pool → linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))  # [B, 16, H/2, W/2]
        return self.fc(torch.flatten(self.pool(x), 1))  # [B, classes]


class TinyMobileNet(nn.Module):
    """Depthwise-separable and grouped convs, a grouped ConvTranspose, and BN1d after a Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16))
        # ConvTranspose weight is [in, out/groups, k, k]: groups=2 catches a fold along the wrong axis
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 12, 2, stride=2, groups=2), nn.BatchNorm2d(12), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(12, 24)
        self.bn_fc = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))  # [B, 16, H/2, W/2]
        x = self.up(torch.relu(self.grouped(x)))  # [B, 12, H, W]
        x = torch.flatten(self.pool(x), 1)  # [B, 12]
        return self.fc2(torch.relu(self.bn_fc(self.fc1(x))))  # [B, classes]


class PreActHead(nn.Module):
    """BN in pre position: BN2d → unpadded conv, and BN1d → Linear (nothing to fold into before them)."""

    def __init__(self, classes: int = 10, padding: int = 0, padding_mode: str = "zeros"):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=padding, padding_mode=padding_mode, groups=1)
        self.bn_mid = nn.BatchNorm2d(8)
        self.conv_grouped = nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False)
        self.bn_feat = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(self.bn_in(x)))  # [B, 8, H', W']
        x = self.conv_grouped(self.bn_mid(torch.tanh(x)))  # [B, 8, H'', W'']
        x = x.mean(dim=(2, 3))  # [B, 8]
        return self.fc(self.bn_feat(x))


class SharedProducer(nn.Module):
    """conv → BN, but the conv's output is also read by a second branch: the fold must refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y
