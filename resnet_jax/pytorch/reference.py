"""Independent PyTorch ResNets with torchvision's parameter names: a test oracle and a benchmark peer.

torchvision is not importable in the test environment, so this rebuilds its ImageNet ResNets
(ResNet, ResNeXt, Wide ResNet) from `torch.nn` alone, and adds He et al.'s CIFAR ResNets and
their plain twins, which torchvision lacks. Module and parameter names follow torchvision's
checkpoint layout (conv1, bn1, layer{s}.{b}.conv{i}/bn{i}/downsample.{0,1}, fc) so that
`state_dict()` is what `from_torchvision` expects. Bottlenecks put the stride on the 3x3 conv
(ResNet v1.5), as torchvision does, and `replace_stride_with_dilation` follows torchvision's
rules. `ReferenceR3D` is torchvision's video r3d_18 family in its own key layout.

timm's ResNet family is built here too, in timm's key layout (`TIMM_CONFIGS`): timm imports
torchvision at import time, so it cannot run here either. Its additions are the deep stem
(`conv1` a Sequential of three 3x3 convs, then `bn1`), average-pool shortcuts (`downsample.0` a
pool, `.1` conv, `.2` BN; in a dilated stage a 2x2 pool at stride 1 over the input padded by one
zero row and column), and SE modules `se.fc1`/`se.fc2` with timm's width rounding.

The tests compare these nets with our Flax models; `bench_torch` trains them as the PyTorch
side of `bench --vs-torch` for the models torchvision does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """Bias-free conv with torchvision's symmetric dilation * (k - 1) / 2 padding."""
    return nn.Conv2d(cin, cout, kernel, stride, padding=dilation * (kernel - 1) // 2, groups=groups,
                     dilation=dilation, bias=False)


def se_width(channels: int) -> int:
    """timm's SE hidden width: channels / 16 to the nearest multiple of 8 (halves up), at least 8."""
    return max(8, int(channels / 16 + 4) // 8 * 8)


class SqueezeExcite(nn.Module):
    """timm's SEModule: mean over space, biased 1x1 conv, ReLU, biased 1x1 conv, sigmoid gate."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, se_width(channels), 1)
        self.fc2 = nn.Conv2d(se_width(channels), channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class PadAvgPool(nn.Module):
    """A 2x2 average at stride 1 over the input padded with one zero row and column at the end,
    the zeros counted: timm's AvgPool2dSame(2, 1) in a dilated stage's average-pool shortcut."""

    def forward(self, x):
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 1)


class BasicBlock(nn.Module):
    """Two 3x3 convs; the stride sits on the first. residual=False drops the skip (a plain net)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, width_per_group: int = 64, dilation: int = 1, residual: bool = True,
                 se: bool = False):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError('basic blocks have no grouped or widened variant in torchvision')
        if dilation > 1:
            raise NotImplementedError('torchvision has no dilated basic blocks')
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes) if se else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.se is not None:
            h = self.se(h)
        if self.residual:
            h = h + (x if self.downsample is None else self.downsample(x))
        return self.relu(h)


class Bottleneck(nn.Module):
    """1x1 reduce, grouped (and possibly dilated) 3x3 carrying the stride (v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, width_per_group: int = 64, dilation: int = 1, se: bool = False):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride, groups, dilation), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.se = SqueezeExcite(planes * 4) if se else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        if self.se is not None:
            h = self.se(h)
        return self.relu(h + shortcut)


class ReferenceResNet(nn.Module):
    """7x7/2 stem + 3x3/2 max pool, four stages (the first at stride 1), average pool, fc.

    replace_stride_with_dilation: three flags for layers 2-4, as in torchvision: a flagged layer
    keeps stride 1 and multiplies the dilation by 2; its first block uses the previous dilation.
    timm's options: stem_type 'deep' (3x3 convs to stem_width, stem_width, 2 * stem_width),
    avg_down (average-pool shortcuts) and se (an SE module in every block).
    """

    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int = 1000,
                 groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                 stem_type: str = '', stem_width: int = 64, avg_down: bool = False, se: bool = False):
        super().__init__()
        if stem_type == 'deep':
            cin = 2 * stem_width
            self.conv1 = nn.Sequential(
                _conv(3, stem_width, 3, 2), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                _conv(stem_width, stem_width, 3), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                _conv(stem_width, cin, 3))
        else:
            cin = 64
            self.conv1 = _conv(3, cin, 7, 2)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        dilation = 1
        for s, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks, stride, previous = [], 1 if s == 1 else 2, dilation
            if s > 1 and replace_stride_with_dilation[s - 2]:
                stride, dilation = 1, dilation * stride
            for b in range(n):
                cout = planes * block.expansion
                # Projection only where the shape changes (option B), behind a pool with avg_down.
                down = None
                if (stride != 1 or cin != cout) and avg_down:
                    pool = (nn.Identity() if stride == 1 and dilation == 1 else PadAvgPool() if dilation > 1
                            else nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False))
                    down = nn.Sequential(pool, _conv(cin, cout, 1), nn.BatchNorm2d(cout))
                elif stride != 1 or cin != cout:
                    down = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                blocks.append(block(cin, planes, stride, down, groups, width_per_group,
                                    dilation=previous if b == 0 else dilation, se=se))
                cin, stride = cout, 1
            setattr(self, f'layer{s}', nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def stages(self, x) -> list[torch.Tensor]:
        """The outputs of layer1..layer4."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for s in range(1, 5):
            x = getattr(self, f'layer{s}')(x)
            outputs.append(x)
        return outputs

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.stages(x)[-1]), 1))


class ZeroPadShortcut(nn.Module):
    """Option A: every stride-th pixel, zero channels appended after the input's; no parameters.

    The zeros go last, as in our Flax model: with them first, the same weights would add the
    shortcut to other channels of the branch and compute a different function.
    """

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra_channels = stride, extra_channels

    def forward(self, x):
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra_channels))


class ReferenceCifarResNet(nn.Module):
    """He et al. 2016, CIFAR: 3x3 stem of width 16 (no max pool), three stages of n basic blocks
    at widths 16/32/64 (the later two at stride 2), average pool, fc. Shortcuts use option A;
    residual=False gives the plain twin, with no skip at all."""

    def __init__(self, n: int, num_classes: int = 10, residual: bool = True):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 16, 3), nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        cin = 16
        for s, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(n):
                stride = 2 if s > 1 and b == 0 else 1
                down = (ZeroPadShortcut(stride, planes - cin)
                        if residual and (stride != 1 or cin != planes) else None)
                blocks.append(BasicBlock(cin, planes, stride, down, residual=residual))
                cin = planes
            setattr(self, f'layer{s}', nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ReferenceR3D(nn.Module):
    """torchvision's video ResNet with Conv3DSimple (r3d_18 for layers (2, 2, 2, 2)), in its key layout:
    `stem.{0,1}` (a (3,7,7) conv at stride (1,2,2), BN), `layer{s}.{b}.conv{i}.{0,1}` (3x3x3 conv, BN),
    `downsample.{0,1}` (1x1x1 conv at stride 2 on every axis, BN), `fc`. Input NCTHW."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 400):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
                                  nn.BatchNorm3d(64), nn.ReLU(inplace=True))
        cin = 64
        for s, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks = []
            for b in range(n):
                stride = 2 if s > 1 and b == 0 else 1
                block = nn.Module()
                block.conv1 = nn.Sequential(nn.Conv3d(cin, planes, 3, stride, 1, bias=False),
                                            nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
                block.conv2 = nn.Sequential(nn.Conv3d(planes, planes, 3, 1, 1, bias=False),
                                            nn.BatchNorm3d(planes))
                block.downsample = (nn.Sequential(nn.Conv3d(cin, planes, 1, stride, bias=False),
                                                  nn.BatchNorm3d(planes))
                                    if stride != 1 or cin != planes else None)
                blocks.append(block)
                cin = planes
            setattr(self, f'layer{s}', nn.ModuleList(blocks))
        self.fc = nn.Linear(cin, num_classes)

    def stages(self, x) -> list[torch.Tensor]:
        """The outputs of layer1..layer4."""
        x, outputs = self.stem(x), []
        for s in range(1, 5):
            for block in getattr(self, f'layer{s}'):
                shortcut = x if block.downsample is None else block.downsample(x)
                x = F.relu(block.conv2(block.conv1(x)) + shortcut)
            outputs.append(x)
        return outputs

    def forward(self, x):
        return self.fc(self.stages(x)[-1].mean(dim=(2, 3, 4)))


# torchvision's layer counts and block shapes: (block, layers, groups, width_per_group).
CONFIGS = {
    'resnet18': (BasicBlock, (2, 2, 2, 2), 1, 64),
    'resnet34': (BasicBlock, (3, 4, 6, 3), 1, 64),
    'resnet50': (Bottleneck, (3, 4, 6, 3), 1, 64),
    'resnet101': (Bottleneck, (3, 4, 23, 3), 1, 64),
    'resnext50_32x4d': (Bottleneck, (3, 4, 6, 3), 32, 4),
    'wide_resnet50_2': (Bottleneck, (3, 4, 6, 3), 1, 128),
}


# timm's names for the nets above with its options: (block, layers, groups, width_per_group, options).
DEEP_D = dict(stem_type='deep', stem_width=32, avg_down=True)
TIMM_CONFIGS = {
    'resnet50': (Bottleneck, (3, 4, 6, 3), 1, 64, {}),
    'resnet26d': (Bottleneck, (2, 2, 2, 2), 1, 64, DEEP_D),
    'resnet50d': (Bottleneck, (3, 4, 6, 3), 1, 64, DEEP_D),
    'seresnet18': (BasicBlock, (2, 2, 2, 2), 1, 64, dict(se=True)),
    'seresnet50': (Bottleneck, (3, 4, 6, 3), 1, 64, dict(se=True)),
    'seresnext50_32x4d': (Bottleneck, (3, 4, 6, 3), 32, 4, dict(se=True)),
}


# He et al.'s CIFAR nets, depth 6n + 2: (blocks per stage n, whether blocks have a skip).
CIFAR_CONFIGS = {
    **{f'resnet{6 * n + 2}': (n, True) for n in (3, 5, 7, 9, 18, 200)},
    **{f'plain{6 * n + 2}': (n, False) for n in (3, 5, 7, 9, 18)},
}


def reference_resnet(name: str, num_classes: int | None = None) -> nn.Module:
    """The torchvision-named reference for `name` (a key of CONFIGS or CIFAR_CONFIGS), in eval
    mode, with torch's default init; num_classes defaults to 1000 (ImageNet) or 10 (CIFAR)."""
    if name in CIFAR_CONFIGS:
        n, residual = CIFAR_CONFIGS[name]
        return ReferenceCifarResNet(n, 10 if num_classes is None else num_classes, residual).eval()
    if name not in CONFIGS:
        raise ValueError(f'torch_reference has no model {name!r}; it builds: '
                         + ', '.join(sorted(CONFIGS) + sorted(CIFAR_CONFIGS)))
    block, layers, groups, width = CONFIGS[name]
    return ReferenceResNet(block, layers, 1000 if num_classes is None else num_classes, groups, width).eval()


def reference_timm(name: str, num_classes: int = 1000, output_stride: int = 32) -> nn.Module:
    """The timm-named reference for `name` (a key of TIMM_CONFIGS), in eval mode, with torch's
    default init; output_stride 16 or 8 dilates the last one or two stages, as timm does."""
    if name not in TIMM_CONFIGS:
        raise ValueError(f'torch_reference has no timm model {name!r}; it builds: {", ".join(TIMM_CONFIGS)}')
    block, layers, groups, width, options = TIMM_CONFIGS[name]
    dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
    return ReferenceResNet(block, layers, num_classes, groups, width, dilate, **options).eval()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BatchNorm statistic a random value, in place.

    With default init (BN weight 1, bias 0, mean 0, var 1) a mistake such as swapping scale
    and bias, or mean and variance, would go unnoticed; random values make each one count.
    Conv weights are He-scaled and BN gains stay near 1 so activations stay O(1) through
    the depth and the logits are informative rather than huge or zero.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, low, high):
        return torch.rand(shape, generator=g) * (high - low) + low

    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(rand(m.running_var.shape, 0.5, 2.0))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module
