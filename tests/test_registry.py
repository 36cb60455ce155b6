"""The registry's names, overrides, and the errors bad input gets before any tracing."""

import pytest

from resnet_jax.models import BlockDesign, ResNet, get_model, list_models

REQUIRED = """
resnet18 resnet34 resnet50 resnet101 resnet152 resnet200 resnext50_32x4d resnext101_32x8d
resnext101_64x4d wide_resnet50_2 wide_resnet101_2 resnet50_d plain18 plain34
resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202 plain20 plain32 plain44 plain56 plain110
preact_resnet110 preact_resnet164 preact_resnet1001 wrn16_8 wrn28_10 wrn40_4
resnext29_8x64d resnext29_16x64d
""".split()


def test_every_required_preset_is_registered():
    assert set(REQUIRED) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_overrides_reach_network_and_design_fields():
    model = get_model('resnet56', num_classes=100, skip='none', widths=[32, 64, 128], placement='preact')
    assert isinstance(model, ResNet)
    assert model.num_classes == 100 and model.widths == (32, 64, 128)
    assert model.design == BlockDesign(skip='none', shortcut='A', placement='preact')


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'.*Did you mean: .*resnet50"):
        get_model('resnet5O')


def test_unknown_field_lists_close_matches_and_allowed_fields():
    with pytest.raises(ValueError, match=r"unknown model field 'skp'.*Did you mean: skip.*Allowed fields:"):
        get_model('resnet20', skp='none')


@pytest.mark.parametrize('overrides, message', [
    (dict(shortcut='E'), r"shortcut='E' is not allowed; choose one of: 'A', 'B', 'C', 'D'"),
    (dict(skip='gated'), r"skip='gated' is not allowed; choose one of: 'identity', 'none'"),
    (dict(placement='pre'), r"placement='pre' is not allowed; choose one of: 'post'"),
    (dict(branch_init='zero'), r"branch_init='zero' is not allowed; choose one of: 'standard', 'zero_gamma'"),
    (dict(norm='layer'), r"norm='layer' is not allowed; choose one of: 'batch', 'group', 'none'"),
    (dict(activation='swish2'), r"activation='swish2' is not allowed; choose one of: 'relu'"),
    (dict(dtype='float8'), r"dtype='float8' is not allowed; choose one of: 'float32', 'bfloat16'"),
    (dict(block='triple'), r"block='triple' is not allowed; choose one of: 'basic', 'bottleneck'"),
    (dict(stem='vit'), r"stem='vit' is not allowed; choose one of: 'imagenet', 'deep', 'cifar'"),
    (dict(drop_path_rate=1.0), r'drop_path_rate=1.0 is outside the allowed range \[0, 1\)'),
    (dict(drop_path_rate=-0.1), r'drop_path_rate=-0.1 is outside the allowed range \[0, 1\)'),
    (dict(dropout_rate=1.5), r'dropout_rate=1.5 is outside the allowed range \[0, 1\)'),
    (dict(skip='dropout', skip_dropout=1.0), r'skip_dropout=1.0 is outside the allowed range \[0, 1\)'),
    (dict(cardinality=3), r'cardinality=3 does not divide the width of a grouped conv in stage 1, block 0 \(16 -> 16'),
    (dict(cardinality=0), r'cardinality=0 must be a positive integer'),
    (dict(norm='group'), r'norm_groups=32 does not divide the stem width 16'),
    (dict(norm='group', norm_groups=12, stem_width=24, shortcut='B'), r'norm_groups=12 does not divide the 16 channels'),
    (dict(branch_init='fixup'), r"branch_init='fixup' .* needs norm='none' and placement='post'"),
    (dict(skip_scale=0.5), r"skip_scale/branch_scale are only used with skip='scale'"),
    (dict(gate_bias_init=-6.0), r"gate_bias_init is only used with skip='exclusive_gate'"),
    (dict(se_ratio=-0.25), r'se_ratio=-0.25 must be >= 0'),
    (dict(widths=(16, 32)), r'must be non-empty and of the same length'),
    (dict(stage_sizes=(3, 0, 3)), r'must hold positive integers'),
    (dict(num_classes=0), r'num_classes=0 must be a positive integer'),
    (dict(widths=(8, 16, 32)), r"shortcut='A' zero-pads channels and cannot narrow 16 -> 8 channels in stage 1, block 0"),
])
def test_impossible_combinations_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_model('resnet20', **overrides)


def test_fractional_bottleneck_width_is_refused():
    with pytest.raises(ValueError, match=r'base_width=6 gives a fractional bottleneck width 16 \* 6 / 64'):
        get_model('preact_resnet164', base_width=6)


def test_grouped_basic_blocks_are_allowed_when_the_cardinality_divides():
    assert get_model('resnet20', cardinality=4).design.cardinality == 4
