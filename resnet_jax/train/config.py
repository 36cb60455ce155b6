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
import inspect
import json
import math
import os
import re

import ml_collections
from ml_collections import config_dict

from resnet_jax.data.augment import PAD_MODES
from resnet_jax.data.sources import check_dataset_name
from resnet_jax.errors import ConfigError, check_choice, close_matches
from resnet_jax.models.design import BlockDesign
from resnet_jax.models.registry import PRESETS, get_model
from resnet_jax.train import finetune

OPTIMIZERS = ('sgd', 'lars', 'adamw')
SCHEDULES = ('piecewise', 'cosine', 'constant')
WARMUPS = ('linear', 'constant', 'linear_from_base')
DECAY_TYPES = ('l2', 'decoupled')
AUGMENTATIONS = ('none', 'cifar', 'inception')
FEEDS = ('host', 'device', 'stream')
ON_CORRUPT = ('error', 'skip')
NONFINITE = ('stop', 'skip')
BEST_MODES = ('max', 'min')
EVAL_METRICS = tuple(f'{p}/{m}' for p in ('eval', 'ema_eval', 'val', 'ema_val') for m in ('top1', 'top5', 'loss'))
NORMALIZATIONS = ('per_channel', 'per_pixel_mean')
# Fields a resumed run may change without --config.resume_allow_changes: they do not alter what
# is computed (num_steps/num_epochs extend or shorten the run, and change schedules that depend on it).
SAFE_TO_CHANGE = ('log_every_steps', 'progress_seconds', 'eval_every_steps', 'eval_batch_size',
                  'checkpoint_every_steps', 'keep_checkpoints', 'keep_best_checkpoints', 'best_metric', 'best_mode',
                  'peak_tflops_per_device', 'data.workers', 'num_steps', 'num_epochs', 'resume_allow_changes',
                  'init_from', 'init_head')
PARAM_RULES = ('replicate', 'fsdp')
INIT_HEADS = ('keep', 'replace')
# The allowed range of every numeric field that has one (for a tuple, of each element); the model's
# design fields are checked by the model itself, and every float of the config must be finite.
RANGES = {
    'batch_size': '[1, inf)', 'eval_batch_size': '[1, inf)', 'num_steps': '[1, inf)', 'num_epochs': '(0, inf)',
    'seed': '[0, 2147483648)', 'log_every_steps': '[1, inf)', 'progress_seconds': '[0, inf)',
    'eval_every_steps': '[1, inf)', 'checkpoint_every_steps': '[1, inf)', 'keep_checkpoints': '[1, inf)',
    'keep_best_checkpoints': '[0, inf)', 'peak_tflops_per_device': '(0, inf)',
    'data.image_size': '[1, inf)', 'data.train_subset': '[0, inf)', 'data.eval_crop_fraction': '(0, 1]',
    'data.mixup_alpha': '[0, inf)', 'data.cutmix_alpha': '[0, inf)', 'data.mean': '[0, 1]', 'data.std': '(0, inf)',
    'data.workers': '[0, inf)', 'data.validation_split': '[0, inf)', 'data.num_train': '[1, inf)', 'data.num_eval': '[1, inf)',
    'optim.lr': '(0, inf)', 'optim.momentum': '[0, 1)', 'optim.b1': '[0, 1)', 'optim.b2': '[0, 1)',
    'optim.eps': '(0, inf)', 'optim.lars_trust_coefficient': '(0, inf)', 'optim.weight_decay': '[0, inf)',
    'optim.boundaries': '[1, inf)', 'optim.boundary_epochs': '(0, inf)', 'optim.decay_factor': '(0, inf)',
    'optim.warmup_steps': '[0, inf)', 'optim.warmup_epochs': '[0, inf)', 'optim.warmup_factor': '[0, 1]',
    'optim.label_smoothing': '[0, 1)', 'optim.grad_clip_norm': '[0, inf)', 'optim.ema_decay': '[0, 1)',
    'mesh.fsdp_min_size': '[0, inf)', 'finetune.layer_lr_decay': '(0, 1]',
    'model.num_classes': '[2, inf)',  # one class is no classification
    'model.head_init_std': '(0, inf)',
}


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
    model.head_init_std = config_dict.placeholder(float)  # > 0: classifier kernel ~ N(0, std^2) (Goyal et al.: 0.01)
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
    c.data.normalize = 'per_channel'   # 'per_channel': (x - mean) / std; 'per_pixel_mean': x minus the mean
                                       # training image (He et al. 2016; in-memory feeds)
    c.data.pad_mode = 'zero'           # the 'cifar' crop's padding: 'zero' or 'reflect' (numpy.pad's modes)
    c.data.pad_after_normalize = False # True: normalise, then pad (zero = the mean; fb.resnet.torch); in-memory feeds
    c.data.validation_split = 0        # > 0: hold out this many training examples, evaluated as 'val/*'
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
    c.optim.decay_exclude = ()         # regexes on parameter paths ('params/.*norm[0-9]*/(scale|bias)'): no decay
    c.optim.schedule = 'piecewise'
    c.optim.boundaries = ()            # steps where piecewise multiplies lr by decay_factor
    c.optim.boundary_epochs = ()       # the same in epochs (the papers' units); use one of the two
    c.optim.decay_factor = 0.1
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0.0
    c.optim.warmup = 'linear'          # 'linear' from 0, 'constant' at lr * warmup_factor (ResNet-110), or
                                       # 'linear_from_base' from the unscaled optim.lr (Goyal et al.)
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
    c.init_from = ''                   # a new run starts from 'checkpoint:<workdir>', 'torchvision:<file>' or 'timm:<file>'
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
    """The experiment file at `path` as a module (its get_config, and get_sweep where it has one);
    a missing file or one that fails to run is a ConfigError naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path} does not exist' if not os.path.exists(path)
                          else f'config file {path} is not a file')
    module_spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file raises, the user must fix the file
        where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
        raise ConfigError(f'config file {path}{where} fails to load: {type(e).__name__}: {e}') from e
    return module


def from_file(spec: str) -> ml_collections.ConfigDict:
    """The config named by 'path/to/file.py[:arg]', loaded as --config=... loads it (get_config(arg)
    when a ':' is given); a file without get_config, an argument it does not take, or a get_config
    that refuses its argument is a ConfigError naming the file."""
    path, colon, arg = spec.partition(':')
    module = config_module(path)
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
        raise ConfigError(f'{path} defines no get_config(); an experiment file returns its config from '
                          'get_config() or get_config(arg)')
    params = list(inspect.signature(get_config).parameters.values())
    if colon and not params:
        raise ConfigError(f'{path}: get_config() takes no argument, and {spec!r} gives it {arg!r}; use --config={path}')
    if not colon and params and params[0].default is inspect.Parameter.empty:
        raise ConfigError(f'{path}: get_config({params[0].name}) needs an argument: --config={path}:<{params[0].name}>')
    try:
        config = get_config(arg) if colon else get_config()
    except Exception as e:  # noqa: BLE001 - a refused argument, or a bug in the file: both named
        what = f'get_config({arg!r})' if colon else 'get_config()'
        raise ConfigError(f'{path}: {what} failed: {e}') from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f'{path}: get_config() returned {type(config).__name__}, not a ConfigDict')
    return config


def check_config_args(args: list[str], flag: str = 'config') -> None:
    """Check the config file of `--<flag>=<spec>` in `args` and the fields its `--<flag>.<field>=<value>`
    overrides name, so that a command line with a bad file or a typo'd field gets a one-line error."""
    spec = next((a.partition('=')[2] for a in args if a.startswith(f'--{flag}=')), None)
    if spec is None and f'--{flag}' in args[:-1]:
        spec = args[args.index(f'--{flag}') + 1]
    if not spec:
        return  # absl reports a missing required flag
    config = from_file(spec)
    for arg in args:
        if arg.startswith(f'--{flag}.'):
            check_field(config, arg[len(f'--{flag}.'):].partition('=')[0], f'--{flag}.')


def check_field(config, name: str, prefix: str = 'config.') -> None:
    """Refuse a dotted field `name` that `config` does not have, suggesting the close ones."""
    node, done = config, []
    for part in name.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = f'config.{".".join(done)}' if done else 'the config'
            fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f'{prefix}{name}: {where} has no field {part!r}.{close_matches(part, fields)}')
        node, done = node[part], done + [part]


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


def _check_ranges(config) -> None:
    """Every float finite, every field of RANGES inside its range, every name in
    resume_allow_changes a field."""
    flat = _flatten(config.to_dict())
    for field, value in flat.items():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                _fail(field, f'must be a finite number, got {value!r}')
    for field, interval in RANGES.items():
        value = flat[field]
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if v is not None and not _in_range(v, interval):
                _fail(field, f'must be {_describe(interval)}, got {value!r}')
    for field in ('optim.boundaries', 'optim.boundary_epochs'):
        if list(flat[field]) != sorted(set(flat[field])):
            _fail(field, f'must be strictly increasing, got {flat[field]!r}')
    for name in config.resume_allow_changes:
        if name not in flat:
            _fail('resume_allow_changes', f'{name!r} is not a config field.{close_matches(name, flat)}')


def _in_range(value, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(', '))
    return ((low < value if interval[0] == '(' else low <= value) and
            (value < high if interval[-1] == ')' else value <= high))


def _describe(interval: str) -> str:
    if interval == '[1, inf)':
        return 'a positive integer'
    if interval.endswith(', inf)'):
        return f'{">" if interval[0] == "(" else ">="} {interval[1:].split(",")[0]}'
    return f'in {interval}'


def validate(config, num_devices: int, num_train: int | None = None) -> None:
    """Refuse a config that cannot run on `num_devices` devices; cheap, before any tracing."""
    _check_ranges(config)
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
    if config.init_from and not config.init_from.startswith(('checkpoint:', 'torchvision:', 'timm:')):
        _fail('init_from', f"{config.init_from!r}: use 'checkpoint:<workdir or step dir>', "
                           "'torchvision:<file.pth or .safetensors>' or 'timm:<file.pth or .safetensors>'")
    if config.init_from and not os.path.exists(config.init_from.partition(':')[2]):
        _fail('init_from', f'{config.init_from.partition(":")[2]} does not exist')
    _check_data(config.data)
    if config.best_metric.split('/')[0] in ('val', 'ema_val') and not config.data.validation_split:
        _fail('best_metric', f'{config.best_metric} needs held-out examples (data.validation_split > 0)')
    _check_decay_exclude(config)
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
    group, local = model.design.bn_group_size, config.batch_size // shards
    if group and (config.batch_size % group or (local % group and group % local)):
        _fail('model.bn_group_size', f'BatchNorm groups of {group} must split the batch of {config.batch_size} and '
                                     f'never straddle its {shards} data shards of {local}: use a divisor of {local}, '
                                     f'or a multiple of it that divides {config.batch_size} (groups of whole shards)')

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
    if (d.mean is None) != (d.std is None):
        _fail('data.mean', 'set both data.mean and data.std, or neither')
    for field in ('mean', 'std'):
        if d[field] is not None and len(d[field]) != 3:
            _fail(f'data.{field}', f'needs one value per RGB channel, got {d[field]}')
    _check_choice('data.normalize', d.normalize, NORMALIZATIONS)
    _check_choice('data.pad_mode', d.pad_mode, tuple(PAD_MODES))
    in_memory = "needs an in-memory feed (data.feed 'host' or 'device'); the 'stream' feed"
    if d.normalize == 'per_pixel_mean':
        if d.feed == 'stream':
            _fail('data.normalize', f"'per_pixel_mean' {in_memory} would have to read every training image first")
        if d.mean is not None:
            _fail('data.mean', "data.mean/data.std are per-channel values for data.normalize='per_channel'")
    if (d.pad_mode != 'zero' or d.pad_after_normalize) and d.augment != 'cifar':
        _fail('data.pad_mode', f"pad_mode and pad_after_normalize set the 'cifar' crop; data.augment is {d.augment!r}")
    if d.pad_after_normalize and d.feed == 'stream':
        _fail('data.pad_after_normalize', f'{in_memory} crops uint8 images on the host, before normalising')


def _check_decay_exclude(config) -> None:
    """optim.decay_exclude: regular expressions, each matching some parameter of the model."""
    patterns = config.optim.decay_exclude
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail('optim.decay_exclude', f'{pattern!r} is not a regular expression: {e}')
    if not patterns:
        return
    params = finetune.variable_names(get_model(config.model.name, **model_overrides(config)),
                                     config.data.image_size)['params']
    for pattern in finetune.unmatched(patterns, params):
        _fail('optim.decay_exclude', f'{pattern!r} matches no parameter of {config.model.name}. Patterns are '
                                     f'fullmatched against paths such as {", ".join(params[:3])}, {params[-1]}')


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

