"""Populations: M small runs trained by one compiled step.

A CIFAR-sized network leaves an accelerator mostly idle (its step is bound by kernel launches, not
arithmetic), and separate processes only time-slice the chip. A population trains M members at once:
each has its own parameters, BatchNorm statistics, optimizer state, random stream, data order and
hyperparameters, and one `jax.vmap`-ed train step does every member's work in each kernel.

Members may differ in what changes no shape and no control flow (`MEMBER_CONFIG_FIELDS`): the seed
(initialisation, data order, augmentation, dropout), the optimizer hyperparameters that `optim.make_optimizer`
takes as traced values, and the design fields of `models.design.MEMBER_FIELDS` (numeric ones, and skip
'identity' vs 'none' with option A shortcuts: a plain net is its ResNet twin with the shortcut times 0,
which is exact). Everything else must be equal; `check_population` refuses a mixed population naming the
field, before anything is compiled. The member axis is laid over devices (`member_mesh`): each device
trains whole members, so that axis needs no communication; devices left over split each member's batch.
`population_loop.train_population` trains a population as M runs, each in its own workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.data import feed as feed_lib
from resnet_jax.data import pipeline
from resnet_jax.errors import ConfigError, UserError, refuse
from resnet_jax.models import cpu_conv, registry
from resnet_jax.models.design import MEMBER_FIELDS, split_member
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import optim
from resnet_jax.train import state as state_lib
from resnet_jax.train import step as step_lib

# The optimizer fields a member may set (warm-up in steps or epochs: it becomes steps either way).
MEMBER_OPTIM_FIELDS = ('lr', 'momentum', 'weight_decay', 'label_smoothing', 'warmup_steps', 'warmup_epochs',
                       'decay_factor', 'ema_decay')
# The data fields a member may set: passed to the step only where the members differ.
MEMBER_DATA_FIELDS = ('mixup_alpha', 'cutmix_alpha')
# Every config field that may differ between the members of one population.
MEMBER_CONFIG_FIELDS = ('seed',) + tuple(f'optim.{f}' for f in MEMBER_OPTIM_FIELDS) + tuple(
    f'model.{f}' for f in MEMBER_FIELDS) + tuple(f'data.{f}' for f in MEMBER_DATA_FIELDS)
AXES = ('member', 'data')


def _same(field: str, values: list, why: str) -> None:
    """Refuse a field whose value is not the same in every member, naming the first member that differs."""
    first = next((i for i, v in enumerate(values) if v != values[0]), None)
    if first is not None:
        refuse(field, f'differs between the members of a population ({values[0]!r} in member 0, {values[first]!r} '
                      f'in member {first}); {why}. Members may differ only in: {", ".join(MEMBER_CONFIG_FIELDS)} '
                      "(model.skip only between 'identity' and 'none' with model.shortcut='A')")


def check_population(configs) -> tuple:
    """(the network every member computes, each member's values for its `member` hook): refuses, before
    anything is traced, configs that cannot share one compiled step, naming the first field that differs.

    Model fields are compared on the networks the configs build, after `split_member` has moved each member's
    own values out of the design, so that resnet20 and plain20 (option A) share one network."""
    if not configs:
        raise ConfigError('a population needs at least one member config')
    flats = [config_lib.flatten(json.loads(config_lib.to_json(c))) for c in configs]
    for field in flats[0]:
        if not field.startswith('model.') and field not in MEMBER_CONFIG_FIELDS:
            _same(field, [f.get(field) for f in flats], 'it changes shapes, control flow or what every member shares')
    models = [registry.check_config(c) for c in configs]
    splits = [split_member(m.design) for m in models]
    shape = 'it changes the parameters or the computation of the shared network'
    for field in registry.NETWORK_FIELDS:
        _same(f'model.{field}', [getattr(m, field) for m in models], shape)
    for field in registry.DESIGN_FIELDS:
        _same(f'model.{field}', [getattr(shared, field) for shared, _ in splits],
              'the skip modes differ in parameters or control flow' if field == 'skip' else shape)
    return _fold_constants(models[0], splits[0][0], [values for _, values in splits])


def _fold_constants(model, shared, values: list[dict]):
    """(model, member values) with the values that every member shares put back into the design, so that
    the population runs what a standalone run runs where nothing differs (no dropout at rate 0, no shortcut
    multiplied by 1)."""
    constant = {k: v for k, v in values[0].items() if all(m[k] == v for m in values)}
    fields = {k: v for k, v in constant.items() if k != 'skip_gain'}
    if 'skip_gain' in constant:
        fields['skip'] = 'identity' if constant['skip_gain'] else 'none'
    design = dataclasses.replace(shared, **fields)
    return model.clone(design=design), [{k: v for k, v in m.items() if k not in constant} for m in values]


def check_supported(config) -> None:
    """Refuse what this version of populations cannot train (the host feed only, mesh.fsdp=1, no warm start,
    no linear probe), naming the field: a sweep trains such runs on their own instead."""
    if config.data.feed != 'host':
        refuse('data.feed', f"{config.data.feed!r} is not supported by populations yet; use 'host'")
    if config.mesh.fsdp != 1:
        refuse('mesh.fsdp', f'{config.mesh.fsdp}: a population lays its members over the devices and '
                            'replicates nothing, so it takes mesh.fsdp=1')
    if config.init.source:
        refuse('init.source', f"{config.init.source!r}: members start from their seeds only; use '' (or train "
                              'fine-tuning runs on their own)')
    if config.finetune.linear_probe:
        refuse('finetune.linear_probe', 'True is not supported by populations; use False')


def check_limits(configs, devices) -> tuple:
    """`check_population`, then `check_supported`, one process, and every member's own `config_lib.validate`
    on its share of `devices`: all cheap, before any data is read or any workdir touched."""
    checked = check_population(configs)
    check_supported(configs[0])
    if jax.process_count() != 1:
        raise UserError(f'a population trains in one process; this run has {jax.process_count()} '
                        '(launch it without --num_processes, or as separate runs)')
    for c in configs:
        config_lib.validate(c, member_mesh(len(configs), devices).shape['data'])
    return checked


def member_values(configs, model_values: list[dict], num_train: int) -> dict:
    """{'model': {key: (M,) array}, 'optim': {key: (M,) array}, 'data': {key: (M,) array}}: what each member's
    step reads as traced scalars, in member order ('data': only the alphas that differ between members, so
    that members that share them run the standalone program)."""
    def optim_values(c):
        o = c.optim
        return {'lr': o.lr, 'momentum': o.momentum, 'weight_decay': o.weight_decay,
                'label_smoothing': o.label_smoothing, 'warmup_steps': optim.schedule_steps(c, num_train)[1],
                'decay_factor': o.decay_factor, 'ema_decay': o.ema_decay}

    def stack(dicts):
        return {k: np.asarray([d[k] for d in dicts], np.int32 if k == 'warmup_steps' else np.float32)
                for k in dicts[0]}

    data = {f: [c.data[f] for c in configs] for f in MEMBER_DATA_FIELDS}
    return {'model': stack(model_values), 'optim': stack([optim_values(c) for c in configs]),
            'data': {f: np.asarray(v, np.float32) for f, v in data.items() if len(set(v)) > 1}}


def member_mesh(size: int, devices) -> Mesh:
    """The ('member', 'data') mesh for `size` members: the members split over as many devices as divide both
    counts, each member's batch over the devices that leaves (1 when there are more members than devices)."""
    members = math.gcd(size, len(devices))
    return Mesh(np.asarray(devices).reshape(members, len(devices) // members), AXES)


class Population:
    """M member configs built into one network, M stacked train states and one compiled step.

    `vmap_step(states, batches, rngs, values)` is the vmapped step, `loop_step` the same members run by a
    Python loop inside one jit; both donate the states and return (states, metrics) with a leading member
    axis. `train_step`, the one a training uses, is the loop on the CPU backend (XLA:CPU runs the vmapped,
    grouped convolutions 5-7x slower than M plain ones: `bench --population`, docs/populations.md) and the
    vmapped step elsewhere. Member i is what the standalone run of configs[i] computes, to float32 rounding.
    `evaluate(states)` evaluates every member with one eval step, `eval_step`: `loop_eval` when the members
    share one CPU device (the vmapped `vmap_eval` measured 8x slower there), `vmap_eval` otherwise. Limits:
    `check_limits`.
    """

    def __init__(self, configs, devices=None):
        devices = jax.devices() if devices is None else devices
        self.configs = list(configs)
        self.size = len(self.configs)
        model, model_values = check_limits(self.configs, devices)
        lead = self.configs[0]
        self.mesh = member_mesh(self.size, devices)
        self.train_data = pipeline.open_split(lead, lead.data.train_split)
        self.eval_data = pipeline.open_split(lead, lead.data.eval_split)
        self.val_data = pipeline.open_split(lead, lead.data.train_split, held_out=True) \
            if lead.data.validation_split else None
        num_train = len(self.train_data)
        for c in self.configs:
            config_lib.validate(c, self.mesh.shape['data'], num_train)
        classes = lead.model.num_classes or self.train_data.num_classes
        if classes != self.train_data.num_classes:
            refuse('model.num_classes', f'{classes} differs from the {self.train_data.num_classes} classes of '
                                        f'{lead.data.dataset}')
        self.model = model.clone(num_classes=classes)
        self.num_steps = optim.total_steps(lead, num_train)
        self.values = member_values(self.configs, model_values, num_train)
        self.mean, self.std = pipeline.normalization(lead, self.train_data)
        ema = any(c.optim.ema_decay > 0 for c in self.configs)
        to_batch = feed_lib.make(lead, self.mesh).to_batch  # the host feed's: the batch as it is

        def init(rng, values):
            optimizer = optim.make_optimizer(lead, num_train, values['optim'])
            return state_lib.create_state(self.model, optimizer, rng, lead.data.image_size, ema, values['model'])

        def member_step(state, batch, rng, values):
            optimizer = optim.make_optimizer(lead, num_train, values['optim'])
            return step_lib.train_step(state, batch, rng, model=self.model, optimizer=optimizer, config=lead,
                                       mean=self.mean, std=self.std, to_batch=to_batch, member=values)

        self.member_sharding = NamedSharding(self.mesh, P('member'))
        self.batch_sharding = NamedSharding(self.mesh, P(*AXES))
        member = self.member_sharding
        self._init = jax.jit(jax.vmap(init), in_shardings=member, out_shardings=member)
        shardings = dict(in_shardings=(member, self.batch_sharding, member, member), out_shardings=member,
                         donate_argnums=0)
        local = self.size // self.mesh.shape['member']  # members per member shard
        self.vmap_step = jax.jit(self._per_shard(jax.vmap(member_step)), **shardings)
        self.loop_step = jax.jit(self._per_shard(cpu_conv.looped(member_step, local)), **shardings)
        on_cpu = devices[0].platform == 'cpu'
        self.train_step = self.loop_step if on_cpu else self.vmap_step

        def eval_members(stack):
            def eval_step(states, batch, values, use_ema: bool):
                def member_eval(state, values):
                    return step_lib.eval_step(state, batch, use_ema, model=self.model, mean=self.mean,
                                              std=self.std, member=values['model'])
                return stack(member_eval)(states, values)
            return jax.jit(eval_step, static_argnums=3)

        self.vmap_eval = eval_members(jax.vmap)
        self.loop_eval = eval_members(lambda fn: cpu_conv.looped(fn, self.size))
        # The vmapped eval measured 8x slower on one CPU device; spread over several, the members stay vmapped.
        self.eval_step = self.loop_eval if on_cpu and self.mesh.shape['member'] == 1 else self.vmap_eval

    def _per_shard(self, fn):
        """fn on each member shard's own members (manual over 'member', automatic over 'data'): left to
        itself, the compiler splits the grouped convolutions of a vmapped backward pass across the member
        axis and gathers their inputs; this way no member's data leaves its devices. (check_vma is off: the
        CPU convolution's backward pass, models.cpu_conv, transposes with abstract values that do not carry
        the member axis, and nothing here communicates over that axis.)"""
        return jax.shard_map(fn, mesh=self.mesh, in_specs=P('member'), out_specs=P('member'),
                             axis_names={'member'}, check_vma=False)

    @property
    def seeds(self) -> jax.Array:
        """Each member's config.seed, in member order."""
        return jnp.asarray([c.seed for c in self.configs], jnp.int32)

    def initial_states(self):
        """Every member's fresh state, from its seed as a standalone run draws it (`run.Run.initial_state`)."""
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), -1 % 2 ** 31))(self.seeds)
        return self._init(keys, self.device_values())

    def rngs(self) -> jax.Array:
        """Each member's train-step key, a standalone run's jax.random.key(seed)."""
        return jax.device_put(jax.vmap(jax.random.key)(self.seeds), self.member_sharding)

    def device_values(self) -> dict:
        """The member values on the mesh, split like the states."""
        return jax.device_put(self.values, self.member_sharding)

    def data_iterators(self, start_step: int = 0) -> list:
        """Each member's `pipeline.BatchIterator` of its own data order from `start_step` on (get_state and
        set_state save and restore its position)."""
        return [pipeline.train_iterator(c, self.train_data, None, start_step) for c in self.configs]

    def train_inputs(self, start_step: int = 0, iterators=None):
        """A function returning the next (M, batch, ...) batches: member i's batch of its own data order, from
        `iterators` (`data_iterators`) or fresh ones at `start_step`."""
        iterators = self.data_iterators(start_step) if iterators is None else iterators

        def next_batches():
            batches = [next(it) for it in iterators]
            return jax.device_put({k: np.stack([b[k] for b in batches]) for k in batches[0]}, self.batch_sharding)

        return next_batches

    def evaluate(self, states) -> list[dict[str, float]]:
        """Each member's `run.Run.evaluate`: 'eval/*' and 'val/*', and for a member with EMA 'ema_eval/*' and
        'ema_val/*', every member's batch computed by one `eval_step`."""
        results = [{} for _ in self.configs]
        values, ema = self.device_values(), [c.optim.ema_decay > 0 for c in self.configs]
        for prefix, data in (('eval', self.eval_data), ('val', self.val_data)):
            if data is None:
                continue
            for use_ema in (False, True) if any(ema) else (False,):
                totals = None
                for batch in pipeline.eval_batches(self.configs[0], data, 0, 1):
                    out = self.eval_step(states, batch, values, use_ema)
                    totals = out if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, out)
                totals = jax.device_get(totals)
                for i, result in enumerate(results):
                    if ema[i] or not use_ema:
                        result.update(metrics_lib.means(member(totals, i), ('ema_' if use_ema else '') + prefix))
        return results


def member(tree, i: int):
    """Member i's slice of a tree with a leading member axis."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _by_path(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def to_standalone(state, abstract):
    """A member's state (`member(states, i)`) in the tree of its standalone run's state (`abstract`): the leaves
    a population keeps for every member but that member's standalone run has not (the momentum of a member at
    momentum 0, the EMA of a member without one) are left out, so that its checkpoint is a standalone one."""
    leaves = _by_path(state)
    return jax.tree_util.tree_map_with_path(lambda p, _: leaves[jax.tree_util.keystr(p)], abstract)


def from_standalone(state, abstract):
    """The inverse of `to_standalone`: a standalone state in the tree of a member's state (`abstract`), the
    leaves it lacks zero (they change nothing: a momentum trace at momentum 0 is the gradient of each step, an
    EMA at decay 0 the parameters of each step)."""
    leaves = _by_path(state)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: leaves.get(jax.tree_util.keystr(p), np.zeros(a.shape, a.dtype)), abstract)
