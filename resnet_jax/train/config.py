"""The config tree of a run: defaults, derived values, and the checks made before compiling.

Experiment files under `experiments/` start from `base_config()` and change what their study
needs. Every field exists in the base (model overrides as typed placeholders), so the
command line can override any of them and an unknown or ill-typed one fails at parse time.
`validate(config, num_devices)` then refuses impossible combinations with a message naming
the field and what is allowed, before any data is loaded or anything is traced.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

import ml_collections
from ml_collections import config_dict

from resnet_jax.data.sources import check_dataset_name
from resnet_jax.models.design import BlockDesign, check_choice
from resnet_jax.models.registry import PRESETS, close_matches, get_model
from resnet_jax.train import finetune

OPTIMIZERS = ('sgd', 'lars', 'adamw')
SCHEDULES = ('piecewise', 'cosine', 'constant')
WARMUPS = ('linear', 'constant')
DECAY_TYPES = ('l2', 'decoupled')
AUGMENTATIONS = ('none', 'cifar', 'inception')
FEEDS = ('host', 'device', 'stream')
ON_CORRUPT = ('error', 'skip')
NONFINITE = ('stop', 'skip')
BEST_MODES = ('max', 'min')
EVAL_METRICS = ('eval/top1', 'eval/top5', 'eval/loss', 'ema_eval/top1', 'ema_eval/top5', 'ema_eval/loss')
# Fields a resumed run may change without --config.resume_allow_changes: they do not alter what
# is computed (num_steps/num_epochs extend or shorten the run, and change schedules that depend on it).
SAFE_TO_CHANGE = ('log_every_steps', 'progress_seconds', 'eval_every_steps', 'eval_batch_size',
                  'checkpoint_every_steps', 'keep_checkpoints', 'keep_best_checkpoints', 'best_metric', 'best_mode',
                  'peak_tflops_per_device', 'data.workers', 'num_steps', 'num_epochs', 'resume_allow_changes',
                  'init_from', 'init_head')
PARAM_RULES = ('replicate', 'fsdp')
INIT_HEADS = ('keep', 'replace')


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what is allowed."""


def _model_section() -> ml_collections.ConfigDict:
    """model.name plus every ResNet/BlockDesign field as an unset, typed override."""
    model = ml_collections.ConfigDict({'name': 'resnet20'})
    for field in dataclasses.fields(BlockDesign):
        model[field.name] = config_dict.placeholder(type(field.default))
    model.num_classes = config_dict.placeholder(int)
    model.stage_sizes = config_dict.placeholder(tuple)
    model.widths = config_dict.placeholder(tuple)
    model.stem = config_dict.placeholder(str)
    model.stem_width = config_dict.placeholder(int)
    model.width_multiplier = config_dict.placeholder(int)
    model.remat = config_dict.placeholder(bool)
    model.output_stride = config_dict.placeholder(int)  # None: natural; smaller dilates the last stages
    return model


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = _model_section()

    c.data = ml_collections.ConfigDict()
    c.data.dataset = 'shapes'          # 'shapes', 'synthetic', 'folder:<path>', 'tfds:<name>[:<version>]'
    c.data.tfds_data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.image_size = 32
    c.data.train_split = 'train'       # TFDS slicing works for tfds: datasets ('train[:90%]')
    c.data.eval_split = 'test'
    c.data.train_subset = 0            # > 0: train on a fixed random subset of this many examples
    c.data.feed = 'host'               # 'host': decoded in host memory; 'device': the whole set on device;
                                       # 'stream': decoded and augmented per step by Grain workers
    c.data.augment = 'cifar'           # 'cifar': pad 4, crop, flip; 'inception': random-resized crop, flip
                                       # (stream feed); 'none'
    c.data.eval_crop_fraction = 0.875  # 'inception' evaluation: resize to size / 0.875, centre crop
    c.data.mixup_alpha = 0.0           # > 0: mixup with lam ~ Beta(alpha, alpha), on device
    c.data.cutmix_alpha = 0.0          # > 0: CutMix; with both set, each batch uses one of them
    c.data.mean = config_dict.placeholder(tuple)  # per-channel, in [0, 1]; None: measured on the data
    c.data.std = config_dict.placeholder(tuple)
    c.data.workers = 0                 # 'stream' feed: Grain worker processes (0: threads of this process)
    c.data.on_corrupt = 'error'        # an unreadable image: 'error' names it, 'skip' leaves it out and counts it
    c.data.num_train = 10_000          # sizes of the generated 'shapes' and 'synthetic' sets
    c.data.num_eval = 2_000

    c.batch_size = 128                 # global, over all processes and devices
    c.eval_batch_size = 500
    c.num_steps = config_dict.placeholder(int)
    c.num_epochs = config_dict.placeholder(float)
    c.seed = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'sgd'
    c.optim.lr = 0.1                   # at batch 256 when scale_lr_by_batch, else as given
    c.optim.scale_lr_by_batch = False  # Goyal et al.: lr = lr * batch_size / 256
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.lars_trust_coefficient = 0.001
    c.optim.weight_decay = 1e-4
    c.optim.decay_type = 'l2'          # 'l2': added to the gradient as in the papers; 'decoupled'
    c.optim.decay_norm_and_bias = True # False excludes norm scales/biases, biases and scalars
    c.optim.schedule = 'piecewise'
    c.optim.boundaries = ()            # steps where piecewise multiplies lr by decay_factor
    c.optim.boundary_epochs = ()       # the same in epochs (the papers' units); use one of the two
    c.optim.decay_factor = 0.1
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0.0
    c.optim.warmup = 'linear'          # 'linear' from 0, or 'constant' at lr * warmup_factor (ResNet-110)
    c.optim.warmup_factor = 0.1
    c.optim.label_smoothing = 0.0
    c.optim.grad_clip_norm = 0.0       # 0 = off
    c.optim.ema_decay = 0.0            # 0 = off; else EMA parameters are evaluated as 'ema_eval/*'

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1: every device not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.param_rules = (('.*', 'replicate'),)  # (regex on 'a/b/kernel', 'replicate'|'fsdp'), first match
    c.mesh.fsdp_min_size = 2 ** 14     # smaller parameters stay replicated under 'fsdp'

    c.log_every_steps = 50
    c.progress_seconds = 5.0
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3             # the newest K are kept ...
    c.keep_best_checkpoints = 0        # ... and the best K by best_metric (0: off)
    c.best_metric = 'eval/top1'
    c.best_mode = 'max'
    c.nonfinite = 'stop'               # a NaN/Inf loss or gradient: 'stop' the run, or 'skip' the update
    c.resume_allow_changes = ()        # fields allowed to differ from the stored config on resume
    c.init_from = ''                   # a new run starts from 'checkpoint:<workdir>' or 'torchvision:<file>'
    c.init_head = 'keep'               # init_from's classifier head: 'keep' (its shape must fit) or 'replace' (fresh)
    c.finetune = ml_collections.ConfigDict()  # see resnet_jax/train/finetune.py
    c.finetune.freeze = ()             # regexes on parameter paths ('params/stem_.*', 'params/stage1_.*')
    c.finetune.freeze_batch_stats = 'none'  # BatchNorms in eval mode: 'none', 'frozen' (frozen layers), 'all'
    c.finetune.layer_lr_decay = 1.0    # lr x decay ** (blocks between a parameter and the head); 1.0: off
    c.finetune.linear_probe = False    # train only the head, on features computed once in eval mode
    c.peak_tflops_per_device = config_dict.placeholder(float)  # overrides the device table for MFU
    c.lock()  # experiment files and the command line may change fields, never invent them
    return c


def config_module(path: str):
    """The experiment file at `path` as a module (its get_config, and get_sweep where it has one)."""
    module_spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def from_file(spec: str) -> ml_collections.ConfigDict:
    """The config named by 'path/to/file.py[:arg]', loaded as --config=... loads it."""
    path, _, arg = spec.partition(':')
    module = config_module(path)
    return module.get_config(arg) if arg else module.get_config()


def model_overrides(config) -> dict:
    """The model fields that a config sets, for `get_model(config.model.name, **overrides)`."""
    return {k: v for k, v in config.model.items() if k != 'name' and v is not None}


def _fail(field: str, message: str):
    raise ConfigError(f'config.{field}: {message}')


def steps_per_epoch(config, num_train: int) -> float:
    return num_train / config.batch_size


def total_steps(config, num_train: int) -> int:
    if config.num_steps is not None:
        return config.num_steps
    return max(1, round(config.num_epochs * steps_per_epoch(config, num_train)))


def schedule_steps(config, num_train: int) -> tuple[list[int], int]:
    """(lr boundaries, warm-up length) in steps, whether the config gives them in steps or epochs."""
    o, per_epoch = config.optim, steps_per_epoch(config, num_train)
    boundaries = [int(b) for b in o.boundaries] or [round(e * per_epoch) for e in o.boundary_epochs]
    return boundaries, round(o.warmup_steps or o.warmup_epochs * per_epoch)


def validate(config, num_devices: int, num_train: int | None = None) -> None:
    """Refuse a config that cannot run on `num_devices` devices; cheap, before any tracing."""
    if config.model.name not in PRESETS:
        _fail('model.name', f'unknown model {config.model.name!r}.{close_matches(config.model.name, PRESETS)}'
                            ' Run python -m resnet_jax.models.summary for the list.')
    try:
        model = get_model(config.model.name, **model_overrides(config))
    except ValueError as e:
        _fail('model', str(e))
    if model.spatial_dims != 2:
        _fail('model.name', f'{config.model.name!r} is a video network (NTHWC clips) and the data pipelines '
                            'feed images; use it from Python (resnet_jax.models.get_model) with video input')

    _check_choice('optim.name', config.optim.name, OPTIMIZERS)
    _check_choice('optim.schedule', config.optim.schedule, SCHEDULES)
    _check_choice('optim.warmup', config.optim.warmup, WARMUPS)
    _check_choice('optim.decay_type', config.optim.decay_type, DECAY_TYPES)
    _check_choice('data.augment', config.data.augment, AUGMENTATIONS)
    _check_choice('data.feed', config.data.feed, FEEDS)
    _check_choice('nonfinite', config.nonfinite, NONFINITE)
    _check_choice('best_mode', config.best_mode, BEST_MODES)
    _check_choice('best_metric', config.best_metric, EVAL_METRICS)
    if config.best_metric.startswith('ema_') and not config.optim.ema_decay:
        _fail('best_metric', f'{config.best_metric} needs EMA parameters (optim.ema_decay > 0)')
    if config.init_from and not config.init_from.startswith(('checkpoint:', 'torchvision:')):
        _fail('init_from', f"{config.init_from!r}: use 'checkpoint:<workdir or step dir>' or "
                           "'torchvision:<file.pth or .safetensors>'")
    if config.init_from and not os.path.exists(config.init_from.partition(':')[2]):
        _fail('init_from', f'{config.init_from.partition(":")[2]} does not exist')
    if config.keep_best_checkpoints < 0:
        _fail('keep_best_checkpoints', f'must be >= 0, got {config.keep_best_checkpoints}')
    _check_data(config.data)
    _check_finetune(config)
    for pattern, rule in config.mesh.param_rules:
        _check_choice('mesh.param_rules', rule, PARAM_RULES)
        try:
            re.compile(pattern)
        except re.error as e:
            _fail('mesh.param_rules', f'{pattern!r} is not a regular expression: {e}')
    if config.optim.name == 'lars' and config.optim.decay_type != 'l2':
        _fail('optim.decay_type', "LARS applies weight decay inside its trust ratio; use decay_type='l2'")

    if (config.num_steps is None) == (config.num_epochs is None):
        _fail('num_steps', 'set exactly one of num_steps and num_epochs '
                           f'(got num_steps={config.num_steps}, num_epochs={config.num_epochs})')
    for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_steps',
                  'checkpoint_every_steps', 'keep_checkpoints'):
        if config[field] < 1:
            _fail(field, f'must be a positive integer, got {config[field]}')
    if (config.num_steps or 1) < 1 or (config.num_epochs or 1) <= 0:
        _fail('num_steps', 'training length must be positive')
    if config.optim.boundaries and config.optim.boundary_epochs:
        _fail('optim.boundaries', 'give schedule boundaries in steps or in epochs (optim.boundary_epochs), not both')
    if config.optim.warmup_steps and config.optim.warmup_epochs:
        _fail('optim.warmup_steps', 'give the warm-up in steps or in epochs (optim.warmup_epochs), not both')

    fsdp, data = config.mesh.fsdp, config.mesh.data
    if fsdp < 1 or num_devices % fsdp:
        _fail('mesh.fsdp', f'{fsdp} must be a positive divisor of the {num_devices} devices')
    data = num_devices // fsdp if data == -1 else data
    if data < 1 or data * fsdp != num_devices:
        _fail('mesh.data', f'mesh data={config.mesh.data} x fsdp={fsdp} does not fit the {num_devices} '
                           f'devices; use data=-1 or data={num_devices // fsdp}')
    shards = data * fsdp
    for field in ('batch_size', 'eval_batch_size'):
        if config[field] % shards:
            _fail(field, f'{config[field]} is not divisible by the {shards} data shards '
                         f'(mesh data={data} x fsdp={fsdp}); use a multiple of {shards}')

    if num_train is not None:
        if config.data.feed == 'device' and config.batch_size > num_train // shards * shards:
            _fail('batch_size', f"{config.batch_size} exceeds the {num_train // shards * shards} examples that "
                                f"data.feed='device' holds over {shards} shards; use a smaller batch or data.feed='host'")
        steps = total_steps(config, num_train)
        boundaries, warmup = schedule_steps(config, num_train)
        for b in boundaries if config.optim.schedule == 'piecewise' else []:
            if not warmup < b < steps:
                _fail('optim.boundaries', f'boundary at step {b} is outside the run after warm-up '
                                          f'({warmup + 1}..{steps - 1}); training has {steps} steps')
        if warmup >= steps:
            _fail('optim.warmup_steps', f'warm-up of {warmup} steps does not end before the {steps} training steps')


def _check_finetune(config) -> None:
    """The fine-tuning fields; patterns are checked against the model's parameter paths (an abstract init)."""
    f = config.finetune
    _check_choice('init_head', config.init_head, INIT_HEADS)
    _check_choice('finetune.freeze_batch_stats', f.freeze_batch_stats, finetune.FREEZE_BATCH_STATS)
    if not 0 < f.layer_lr_decay <= 1:
        _fail('finetune.layer_lr_decay', f'must be in (0, 1] (1.0 turns it off), got {f.layer_lr_decay}')
    if f.linear_probe:
        for field, off in (('finetune.freeze', ()), ('finetune.freeze_batch_stats', 'none'),
                           ('finetune.layer_lr_decay', 1.0), ('optim.ema_decay', 0.0), ('data.mixup_alpha', 0.0),
                           ('data.cutmix_alpha', 0.0)):
            if config[field] != off:
                _fail(field, f'{config[field]!r} does not apply to finetune.linear_probe, which trains only the '
                             f'head, without augmentation, on features computed once in eval mode; leave it at {off!r}')
    for pattern in f.freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail('finetune.freeze', f'{pattern!r} is not a regular expression: {e}')
    if not f.freeze and f.freeze_batch_stats == 'none':
        return
    names = finetune.variable_names(get_model(config.model.name, **model_overrides(config)), config.data.image_size)
    params = names['params']
    if f.freeze_batch_stats != 'none' and not names['batch_stats']:
        _fail('finetune.freeze_batch_stats', f'{f.freeze_batch_stats!r} needs BatchNorm layers, and this model has '
                                             "none; use 'none'")
    for pattern in finetune.unmatched(f.freeze, params):
        tops = sorted({n.split('/')[1] for n in params})
        _fail('finetune.freeze', f'{pattern!r} matches no parameter of {config.model.name}. Patterns are '
                                 f'fullmatched against paths such as {", ".join(params[:3])}, {params[-1]}; '
                                 f'the top-level modules are {", ".join(tops)}')
    frozen = finetune.frozen_fn(config) or (lambda name: False)
    if f.freeze and all(frozen(n) for n in params):
        _fail('finetune.freeze', f'{tuple(f.freeze)} freezes every parameter; nothing would train')
    if f.freeze_batch_stats == 'frozen':
        norms = {n.rsplit('/', 1)[0].replace('batch_stats/', 'params/', 1) for n in names['batch_stats']}
        if not any(frozen(f'{n}/scale') and frozen(f'{n}/bias') for n in norms):
            _fail('finetune.freeze_batch_stats', "'frozen' puts the BatchNorms whose scale and bias are frozen "
                                                 f'in eval mode, and finetune.freeze={tuple(f.freeze)} freezes none')


def _check_data(d) -> None:
    try:
        check_dataset_name(d.dataset)
    except ValueError as e:
        _fail('data.dataset', str(e))
    _check_choice('data.on_corrupt', d.on_corrupt, ON_CORRUPT)
    if d.augment == 'inception' and d.feed != 'stream':
        _fail('data.augment', "'inception' crops variable-size images on the host; it needs data.feed='stream'")
    if d.feed == 'stream' and importlib.util.find_spec('grain') is None:
        _fail('data.feed', "'stream' reads through Grain, which is not installed: pip install grain")
    for field in ('mixup_alpha', 'cutmix_alpha', 'workers', 'train_subset'):
        if d[field] < 0:
            _fail(f'data.{field}', f'must be >= 0, got {d[field]}')
    if not 0 < d.eval_crop_fraction <= 1:
        _fail('data.eval_crop_fraction', f'must be in (0, 1], got {d.eval_crop_fraction}')
    if (d.mean is None) != (d.std is None):
        _fail('data.mean', 'set both data.mean and data.std, or neither')
    for field in ('mean', 'std'):
        if d[field] is not None and len(d[field]) != 3:
            _fail(f'data.{field}', f'needs one value per RGB channel, got {d[field]}')


def _check_choice(field, value, allowed):
    try:
        check_choice(field.split('.')[-1], value, allowed)
    except ValueError as e:
        raise ConfigError(f'config.{field}: {e}') from None


def check_resume(stored: dict, config) -> None:
    """Refuse to continue a run whose stored config (`stored`, as JSON) differs from `config` in a
    field that changes what is computed, unless config.resume_allow_changes lists it."""
    old, new = _flatten(stored), _flatten(json.loads(to_json(config)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    allowed = set(SAFE_TO_CHANGE) | set(config.resume_allow_changes)
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise ConfigError('the workdir holds checkpoints of a run with a different config: ' + '; '.join(
            f'{k} was {old.get(k)!r}, now {new.get(k)!r}' for k in refused) + '. Use another --workdir, or '
            f"continue anyway with --config.resume_allow_changes=\"{tuple(refused)}\"")


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[prefix + key] = value
    return out


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write_resolved(config, workdir: str) -> str:
    from resnet_jax import workdir as workdir_lib
    workdir_lib.write_config(workdir, to_json(config))
    return os.path.join(workdir, workdir_lib.CONFIG_FILE)


def load_resolved(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded (config.json, else its newest checkpoint's), with tuples restored, for
    evaluation and resume."""
    from resnet_jax import workdir as workdir_lib
    raw, _ = workdir_lib.stored_config(workdir)
    if raw is None:
        raise workdir_lib.WorkdirError(f'{workdir} has no {workdir_lib.CONFIG_FILE} and no checkpoint: is it a '
                                       'resnet_jax.train workdir?')
    config = base_config()
    _update(config, raw)
    return config


def _update(config, raw: dict, prefix: str = '') -> None:
    for key, value in raw.items():
        if isinstance(value, dict):
            _update(config[key], value, f'{prefix}{key}.')
        elif isinstance(value, list):
            config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            config[key] = value

