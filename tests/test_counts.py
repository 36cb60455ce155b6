"""Parameter and MAC counts against torchvision, timm and closed forms derived from the papers."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from resnet_jax.models import PRESETS, get_model, native_resolution, param_count
from resnet_jax.models.summary import count_macs, counts, input_shape, table

# torchvision V1 weights (docs/reference_numbers.md): parameters and GMACs at 224x224.
TORCHVISION = {
    'resnet18': (11_689_512, 1.814),
    'resnet34': (21_797_672, 3.664),
    'resnet50': (25_557_032, 4.089),
    'resnet101': (44_549_160, 7.801),
    'resnet152': (60_192_808, 11.514),
    'resnext50_32x4d': (25_028_904, 4.23),
    'resnext101_32x8d': (88_791_336, 16.414),
    'wide_resnet50_2': (68_883_240, 11.398),
    'wide_resnet101_2': (126_886_696, 22.753),
}


def params_of(name, **overrides):
    model = get_model(name, **overrides)
    x = jnp.zeros(input_shape(model, native_resolution(model)))
    return param_count(jax.eval_shape(model.init, jax.random.key(0), x)['params'])


@pytest.mark.parametrize('name', sorted(TORCHVISION))
def test_torchvision_parameter_and_mac_counts(name):
    params, gmacs = TORCHVISION[name]
    counted_params, macs = counts(get_model(name), 224)  # one trace gives both
    assert counted_params == params
    assert round(macs / 1e9, 3) == pytest.approx(gmacs, abs=1e-9)


def test_timm_counts_for_presets_torchvision_lacks():
    # timm 1.0.31's resnet50d, resnet18d, resnet26d, resnet200d and its SE nets have these exact counts;
    # SE-ResNet-18/34 need timm's SE width rounding, make_divisible(channels / 16, 8).
    assert params_of('resnet50_d') == 25_576_264
    assert params_of('resnet18_d') == 11_708_744
    assert params_of('resnet26_d') == 16_014_408
    assert params_of('resnet200_d') == 64_693_064
    assert params_of('se_resnet18') == 11_779_624
    assert params_of('se_resnet34') == 21_960_416
    assert params_of('se_resnet50') == 28_088_024
    assert params_of('se_resnext50_32x4d') == 27_559_896
    assert params_of('resnext101_64x4d') == 83_455_272  # torchvision resnext101_64x4d


def test_se_width_rounding():
    """timm's make_divisible(v, 8) with round_limit 0: nearest multiple of 8, halves up, at least 8;
    divisor 1 rounds to the nearest integer."""
    widths = {c: get_model('resnet18', se_ratio=1 / 16, se_divisor=8).design.se_width(c) for c in (64, 128, 192, 320)}
    assert widths == {64: 8, 128: 8, 192: 16, 320: 24}
    assert get_model('resnet18', se_ratio=1 / 16).design.se_width(64) == 4
    assert params_of('resnet18', se_ratio=1 / 16) == 11_778_592  # the counts before timm's rule


def test_resnet50_v1_puts_the_stride_on_the_1x1_and_costs_the_papers_3_8_gmacs():
    params_v1, macs_v1 = counts(get_model('resnet50_v1'), 224)
    params, macs = counts(get_model('resnet50'), 224)
    assert params_v1 == params
    assert 3.8 <= macs_v1 / 1e9 < 3.9
    assert macs / 1e9 == pytest.approx(4.089, abs=5e-4)


# Closed forms, counted by hand from the papers' layer descriptions (conv kernels have no
# bias; each norm has a scale and a bias per channel; the head is a biased linear layer).

def cifar_option_a(n, classes=10):
    """He et al. CIFAR 6n+2: 3x3 stem to 16, three stages of n basic blocks, option A."""
    total, cin = 27 * 16 + 2 * 16, 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += 9 * cin * width + 2 * width + 9 * width * width + 2 * width
            cin = width
    return total + 64 * classes + classes


def preact_cifar(n, bottleneck, k=1, classes=10):
    """Pre-activation CIFAR nets: BN before every conv, a bare 1x1 conv on reshaping
    shortcuts, a final BN; basic blocks for ResNet-110 and WRNs, bottlenecks for 164/1001."""
    total, cin = 27 * 16, 16
    for planes in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            if bottleneck:
                out = 4 * planes
                total += 2 * cin + cin * planes + 2 * planes + 9 * planes * planes + 2 * planes + planes * out
            else:
                out = planes
                total += 2 * cin + 9 * cin * planes + 2 * planes + 9 * planes * planes
            total += cin * out if cin != out else 0
            cin = out
    return total + 2 * cin + cin * classes + classes


def resnext29(cardinality, base_width, classes=10):
    """Xie et al. CIFAR ResNeXt-29: 64-wide 3x3 stem, 3 stages of 3 bottlenecks, B shortcuts."""
    total, cin = 27 * 64 + 2 * 64, 64
    for planes in (64, 128, 256):
        width, out = planes * base_width // 64 * cardinality, 4 * planes
        for block in range(3):
            total += cin * width + 2 * width + 9 * width * width // cardinality + 2 * width + width * out + 2 * out
            if block == 0:
                total += cin * out + 2 * out
            cin = out
    return total + cin * classes + classes


def millions(n, digits):
    return round(n / 1e6, digits)


@pytest.mark.parametrize('depth, paper', [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7), (1202, 19.4)])
def test_cifar_resnets_have_the_papers_parameter_counts(depth, paper):
    n = (depth - 2) // 6
    count = params_of(f'resnet{depth}')
    assert count == cifar_option_a(n)
    assert millions(count, 2 if paper < 1 else 1) == paper


def test_resnet20_is_exactly_269722():
    assert cifar_option_a(3) == 269_722
    assert params_of('resnet20') == 269_722
    assert params_of('resnet20', num_classes=100) == cifar_option_a(3, classes=100)


@pytest.mark.parametrize('depth', [20, 32, 44, 56, 110])
def test_plain_twins_have_exactly_the_option_a_parameters(depth):
    assert params_of(f'plain{depth}') == params_of(f'resnet{depth}')


@pytest.mark.parametrize('name, n, bottleneck, k, paper', [
    ('preact_resnet110', 18, False, 1, 1.7),
    ('preact_resnet164', 18, True, 1, 1.7),
    ('preact_resnet1001', 111, True, 1, 10.3),  # the paper rounds 10,327,706 to "10.2M"
    ('wrn16_8', 2, False, 8, 11.0),
    ('wrn28_10', 4, False, 10, 36.5),
    ('wrn40_4', 6, False, 4, 8.9),
])
def test_preactivation_and_wide_resnets(name, n, bottleneck, k, paper):
    count = params_of(name)
    assert count == preact_cifar(n, bottleneck, k)
    assert millions(count, 1) == paper


@pytest.mark.parametrize('cardinality, paper', [(8, 34.4), (16, 68.2)])
def test_resnext29(cardinality, paper):
    count = params_of(f'resnext29_{cardinality}x64d')
    assert count == resnext29(cardinality, 64)
    # Xie et al. print 68.1M for 16x64d; the architecture they describe has 68,155,210.
    assert millions(count, 1) == paper


def r3d(layers, classes=400):
    """Tran et al.'s R3D: a 3x7x7 stem conv to 64, stages of basic blocks of two 3x3x3 convs at widths
    64..512, a 1x1x1 projection + BN where the shape changes, a biased linear head."""
    total, cin = 3 * 7 * 7 * 3 * 64 + 2 * 64, 64
    for planes, n in zip((64, 128, 256, 512), layers):
        for _ in range(n):
            total += 27 * cin * planes + 2 * planes + 27 * planes * planes + 2 * planes
            total += cin * planes + 2 * planes if cin != planes else 0
            cin = planes
    return total + cin * classes + classes


def test_r3d_counts_equal_torchvision_and_the_closed_form():
    # torchvision's r3d_18 (R3D_18_Weights.KINETICS400_V1): 33,371,472 parameters, 40.697 GMACs
    # at 16x112x112.
    assert params_of('r3d_18') == r3d((2, 2, 2, 2)) == 33_371_472
    assert round(count_macs(get_model('r3d_18'), 112, frames=16) / 1e9, 3) == 40.697
    assert params_of('r3d_34') == r3d((3, 4, 6, 3))
    assert params_of('r3d_18', num_classes=101) == r3d((2, 2, 2, 2), classes=101)


def test_wrn_dropout_and_drop_path_add_no_parameters():
    assert params_of('wrn28_10', dropout_rate=0.3, drop_path_rate=0.2) == params_of('wrn28_10')


@pytest.mark.slow
def test_readme_preset_table_is_generated_from_the_registry():
    readme = (Path(__file__).parents[1] / 'docs' / 'models.md').read_text()
    block = re.search(r'<!-- presets:begin -->\n(.*?)\n<!-- presets:end -->', readme, re.S)
    assert block, 'docs/models.md lost its preset table markers'
    assert block[1].strip() == table(list(PRESETS)).strip(), (
        'docs/models.md preset table is stale: regenerate it with python -m resnet_jax.models')
