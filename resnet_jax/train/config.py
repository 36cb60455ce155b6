"""The config tree of a run: its defaults, loading it from an experiment file, and validating it.

Experiment files under `experiments/` start from `base_config()` and change what their study
needs. Every field exists in the base (model overrides as typed placeholders), so the
command line can override any of them and an unknown or ill-typed one fails at parse time.
`validate(config, num_devices)` then refuses impossible combinations with a message naming
the field and what is allowed, before any data is loaded or anything is traced. Each subsystem
checks its own section next to the code that implements it (the choice lists live there too):

    model               resnet_jax.models.registry.check_config
    data                resnet_jax.data.sources / augment / feed .check_config
    optim (schedule)    resnet_jax.train.optim.check_config / check_schedule
    finetune            resnet_jax.train.finetune.check_config
    checkpoint, init    resnet_jax.checkpoint.check_config
    log, eval           ranges only (RANGES)
    mesh                resnet_jax.sharding.check_config

and `validate` composes them with the checks that span sections: value ranges (one table, `RANGES`),
and the batch against the mesh and the feed. The resolved config is stored with a run as JSON
(`write_resolved`, `load_resolved`; an older run's flat field names are moved into their sections,
RENAMED), and a resumed run may differ from it only in SAFE_TO_CHANGE.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os

import ml_collections
from ml_collections import config_dict

from resnet_jax import checkpoint, sharding
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import augment, sources
from resnet_jax.data import feed as feed_lib
from resnet_jax.errors import ConfigError, check_field_choice, close_matches, refuse
from resnet_jax.models import registry
from resnet_jax.models.design import BlockDesign
from resnet_jax.train import finetune, optim

NONFINITE = ('stop', 'skip')
# Fields a resumed run may change without --config.checkpoint.resume_allow_changes: they do not alter
# what is computed (num_steps/num_epochs extend or shorten the run, and change schedules that depend on it).
SAFE_TO_CHANGE = ('log.every_steps', 'log.progress_seconds', 'log.peak_tflops_per_device', 'eval.every_steps',
                  'eval.batch_size', 'checkpoint.every_steps', 'checkpoint.keep', 'checkpoint.keep_best',
                  'checkpoint.best_metric', 'checkpoint.best_mode', 'checkpoint.resume_allow_changes', 'init.source',
                  'init.head', 'data.workers', 'num_steps', 'num_epochs')
# The flat names of fields that now live in a section. A workdir written before the grouping (its
# config.json or a checkpoint's metadata) is read with them moved, so a run killed then still resumes.
RENAMED = {
    'eval_batch_size': 'eval.batch_size', 'eval_every_steps': 'eval.every_steps',
    'log_every_steps': 'log.every_steps', 'progress_seconds': 'log.progress_seconds',
    'peak_tflops_per_device': 'log.peak_tflops_per_device', 'checkpoint_every_steps': 'checkpoint.every_steps',
    'keep_checkpoints': 'checkpoint.keep', 'keep_best_checkpoints': 'checkpoint.keep_best',
    'best_metric': 'checkpoint.best_metric', 'best_mode': 'checkpoint.best_mode',
    'resume_allow_changes': 'checkpoint.resume_allow_changes', 'init_from': 'init.source',
    'init_head': 'init.head', 'nonfinite': 'optim.nonfinite',
}
# The allowed range of every numeric field that has one (for a tuple, of each element); the model's
# design fields are checked by the model itself, and every float of the config must be finite. One table
# for every section: the ranges are data, checked and phrased the same way whichever subsystem owns them.
RANGES = {
    'batch_size': '[1, inf)', 'eval.batch_size': '[1, inf)', 'num_steps': '[1, inf)', 'num_epochs': '(0, inf)',
    'seed': '[0, 2147483648)', 'log.every_steps': '[1, inf)', 'log.progress_seconds': '[0, inf)',
    'eval.every_steps': '[1, inf)', 'checkpoint.every_steps': '[1, inf)', 'checkpoint.keep': '[1, inf)',
    'checkpoint.keep_best': '[0, inf)', 'log.peak_tflops_per_device': '(0, inf)',
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
    """Every field of a run's config with its default, locked: experiment files and the command line
    start from it and may change fields, never add them."""
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
    c.optim.nonfinite = 'stop'         # a NaN/Inf loss or gradient: 'stop' the run, or 'skip' the update

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1: every device not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.param_rules = (('.*', 'replicate'),)  # (regex on 'a/b/kernel', 'replicate'|'fsdp'), first match
    c.mesh.fsdp_min_size = 2 ** 14     # smaller parameters stay replicated under 'fsdp'

    c.log = ml_collections.ConfigDict()  # what a run reports while it trains
    c.log.every_steps = 50             # training metrics to metrics.jsonl and TensorBoard
    c.log.progress_seconds = 5.0       # at most one progress line per this many seconds
    c.log.peak_tflops_per_device = config_dict.placeholder(float)  # overrides the device table for MFU

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 1000
    c.eval.batch_size = 500            # global, like batch_size

    c.checkpoint = ml_collections.ConfigDict()  # see resnet_jax/checkpoint.py
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3              # the newest K are kept ...
    c.checkpoint.keep_best = 0         # ... and the best K by checkpoint.best_metric (0: off)
    c.checkpoint.best_metric = 'eval/top1'
    c.checkpoint.best_mode = 'max'
    c.checkpoint.resume_allow_changes = ()  # fields allowed to differ from the stored config on resume

    c.init = ml_collections.ConfigDict()  # a new run's starting weights (see checkpoint.warm_start)
    c.init.source = ''                 # '': from the seed; 'checkpoint:<workdir>', 'torchvision:<file>' or 'timm:<file>'
    c.init.head = 'keep'               # the source's classifier head: 'keep' (its shape must fit) or 'replace' (fresh)

    c.finetune = ml_collections.ConfigDict()  # see resnet_jax/train/finetune.py
    c.finetune.freeze = ()             # regexes on parameter paths ('params/stem_.*', 'params/stage1_.*')
    c.finetune.freeze_batch_stats = 'none'  # BatchNorms in eval mode: 'none', 'frozen' (frozen layers), 'all'
    c.finetune.layer_lr_decay = 1.0    # lr x decay ** (blocks between a parameter and the head); 1.0: off
    c.finetune.linear_probe = False    # train only the head, on features computed once in eval mode
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


def validate(config, num_devices: int, num_train: int | None = None) -> None:
    """Refuse a config that cannot run on `num_devices` devices; cheap, before any tracing. With
    `num_train` (the training set's size) the step counts that depend on it are checked too."""
    _check_ranges(config)
    model = registry.check_config(config)
    check_field_choice('optim.nonfinite', config.optim.nonfinite, NONFINITE)
    sources.check_config(config)
    augment.check_config(config)
    feed_lib.check_config(config)
    optim.check_config(config, model)
    finetune.check_config(config, model)
    checkpoint.check_config(config)

    data, fsdp = sharding.check_config(config, num_devices)
    shards = data * fsdp
    for field in ('batch_size', 'eval.batch_size'):
        if config[field] % shards:
            refuse(field, f'{config[field]} is not divisible by the {shards} data shards '
                          f'(mesh data={data} x fsdp={fsdp}); use a multiple of {shards}')
    group, local = model.design.bn_group_size, config.batch_size // shards
    if group and (config.batch_size % group or (local % group and group % local)):
        refuse('model.bn_group_size', f'BatchNorm groups of {group} must split the batch of {config.batch_size} and '
                                      f'never straddle its {shards} data shards of {local}: use a divisor of {local}, '
                                      f'or a multiple of it that divides {config.batch_size} (groups of whole shards)')

    if num_train is not None:
        feed_lib.check_fits(config, num_train, shards)
        optim.check_schedule(config, num_train)


def _check_ranges(config) -> None:
    """Every float finite, every field of RANGES inside its range, every name in
    checkpoint.resume_allow_changes a field."""
    flat = flatten(config.to_dict())
    for field, value in flat.items():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                refuse(field, f'must be a finite number, got {value!r}')
    for field, interval in RANGES.items():
        value = flat[field]
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if v is not None and not _in_range(v, interval):
                refuse(field, f'must be {_describe(interval)}, got {value!r}')
    for field in ('optim.boundaries', 'optim.boundary_epochs'):
        if list(flat[field]) != sorted(set(flat[field])):
            refuse(field, f'must be strictly increasing, got {flat[field]!r}')
    for name in config.checkpoint.resume_allow_changes:
        if name not in flat:
            refuse('checkpoint.resume_allow_changes', f'{name!r} is not a config field.{close_matches(name, flat)}')


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


def check_resume(stored: dict, config) -> None:
    """Refuse to continue a run whose stored config (`stored`, as JSON) differs from `config` in a
    field that changes what is computed, unless config.checkpoint.resume_allow_changes lists it."""
    old, new = _regrouped(stored), flatten(json.loads(to_json(config)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    allowed = set(SAFE_TO_CHANGE) | set(config.checkpoint.resume_allow_changes)
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise ConfigError('the workdir holds checkpoints of a run with a different config: ' + '; '.join(
            f'{k} was {old.get(k)!r}, now {new.get(k)!r}' for k in refused) + '. Use another --workdir, or '
            f"continue anyway with --config.checkpoint.resume_allow_changes=\"{tuple(refused)}\"")


def flatten(tree: dict, prefix: str = '') -> dict:
    """{"a.b": leaf} of a nested dict: configs are compared and reported field by field, by dotted path."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[prefix + key] = value
    return out


def to_json(config) -> str:
    """The config as sorted, indented JSON (tuples as lists): what a run records and compares on resume."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write_resolved(config, workdir: str) -> str:
    """Record `config` as the run's config.json in `workdir`; returns the file's path."""
    workdir_lib.write_config(workdir, to_json(config))
    return os.path.join(workdir, workdir_lib.CONFIG_FILE)


def load_resolved(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded (config.json, else its newest checkpoint's), with tuples restored, for
    evaluation and resume."""
    raw, _ = workdir_lib.stored_config(workdir)
    if raw is None:
        raise workdir_lib.WorkdirError(f'{workdir} has no {workdir_lib.CONFIG_FILE} and no checkpoint: is it a '
                                       'resnet_jax.train workdir?')
    return from_resolved(raw)


def from_resolved(raw: dict) -> ml_collections.ConfigDict:
    """A resolved config written by `to_json` (of this version or an older one: RENAMED fields are moved),
    loaded back with its tuples restored."""
    config = base_config()
    for key, value in _regrouped(raw).items():
        if isinstance(value, list):  # JSON has no tuples
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        section, _, field = key.rpartition('.')
        (config[section] if section else config)[field] = value
    return config


def _regrouped(stored: dict) -> dict:
    """A stored config (JSON) as dotted names, RENAMED's flat ones moved into their sections, in the list
    of checkpoint.resume_allow_changes too: what an older run recorded, in today's fields."""
    flat = {RENAMED.get(key, key): value for key, value in flatten(stored).items()}
    allowed = 'checkpoint.resume_allow_changes'
    if allowed in flat:
        flat[allowed] = [RENAMED.get(name, name) for name in flat[allowed]]
    return flat
