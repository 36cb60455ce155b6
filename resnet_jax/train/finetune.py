"""Fine-tuning controls (`config.finetune`): which parameters train, at what rate, and how BatchNorm runs.

Parameters are named by their path, 'params/<module>/.../<name>' as in `mesh.param_rules`:
params/stem_conv/kernel, params/stage2_block0/norm1/scale, params/head/bias.

freeze              regexes, each matched with re.fullmatch against those paths. A frozen parameter
                    gets no gradient (stop_gradient, so the backward pass ends at the first trainable
                    layer), no update, no weight decay and no optimizer state: the optimizer is
                    `optax.partition` with `optax.set_to_zero()` for the frozen label, and the trainable
                    group's state holds an empty `optax.MaskedNode` where a frozen parameter is.
freeze_batch_stats  'none': every BatchNorm normalises with the batch's statistics and updates its running
                    averages (plain training). 'frozen': a BatchNorm whose scale and bias are both frozen
                    runs in eval mode: it normalises with its running statistics, which stay as loaded,
                    so a frozen part of the network is a fixed function. 'all': every BatchNorm does so.
layer_lr_decay      d in (0, 1]: a parameter at depth k trains at lr * d**k (Clark et al. 2020, Bao et al.
                    2022, per residual block). Depth counts blocks from the head: the head and what
                    follows the last block (a final norm) 0, the last block 1, ..., the first block L,
                    the stem L + 1. 1.0 turns it off.
linear_probe        only params/head/* trains, on features computed once (`resnet_jax.train.probe`).

`check_config` refuses a `finetune` section that cannot work on the model: a pattern that matches
no parameter, a freeze that leaves nothing to train, a probe combined with what it does not use.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import optax

from resnet_jax.errors import check_field_choice, check_field_regex, refuse
from resnet_jax.models.resnet import BatchNorm
from resnet_jax.train.state import create_state

FREEZE_BATCH_STATS = ('none', 'frozen', 'all')
HEAD = 'params/head/'
_BLOCK = re.compile(r'params/stage(\d+)_block(\d+)/')


def path_names(tree, prefix: str = 'params/') -> list[str]:
    """'params/a/b/kernel' for every leaf of a parameter tree, in tree order."""
    return [prefix + jax.tree_util.keystr(p, simple=True, separator='/')
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _map_names(fn, tree):
    """A tree like `tree` holding fn(path name) at each leaf."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), [fn(n) for n in path_names(tree)])


def frozen_fn(config):
    """path name -> whether that parameter is frozen, or None when nothing is."""
    f = config.finetune
    if f.linear_probe:
        return lambda name: not name.startswith(HEAD)
    if not f.freeze:
        return None
    patterns = [re.compile(p) for p in f.freeze]
    return lambda name: any(p.fullmatch(name) for p in patterns)


def unmatched(patterns, names: list[str]) -> list[str]:
    """The patterns that fullmatch none of `names`."""
    return [p for p in patterns if not any(re.fullmatch(p, n) for n in names)]


def depths(names: list[str]) -> dict[str, int]:
    """Each parameter's distance from the head in residual blocks (see the module docstring)."""
    blocks = sorted({tuple(map(int, m.groups())) for n in names if (m := _BLOCK.match(n))})
    rank = {b: len(blocks) - i for i, b in enumerate(blocks)}

    def depth(name):
        if m := _BLOCK.match(name):
            return rank[tuple(map(int, m.groups()))]
        return len(blocks) + 1 if name.startswith('params/stem') else 0

    return {n: depth(n) for n in names}


def lr_multipliers(params, decay: float):
    """decay ** depth for every parameter, as a tree like `params`."""
    depth = depths(path_names(params))
    return _map_names(lambda n: decay ** depth[n], params)


def wrap_optimizer(tx: optax.GradientTransformation, config) -> optax.GradientTransformation:
    """`tx` restricted to the trainable parameters, then scaled per parameter by layer_lr_decay.

    The scaling comes last, on the final update, so it multiplies the learning rate whatever
    the optimizer (momentum, Adam and decoupled decay are linear in it); it sees the whole tree,
    so depths are counted over every block, frozen or not.
    """
    frozen = frozen_fn(config)
    if frozen is not None:
        tx = optax.partition({'train': tx, 'frozen': optax.set_to_zero()},
                             lambda params: _map_names(lambda n: 'frozen' if frozen(n) else 'train', params))
    decay = config.finetune.layer_lr_decay
    if decay != 1.0:
        tx = optax.chain(tx, optax.stateless(lambda updates, params: jax.tree_util.tree_map(
            lambda u, m: u * m, updates, lr_multipliers(updates, decay))))
    return tx


def train_apply(model, config):
    """`model.apply` for the train step: frozen parameters behind stop_gradient, and BatchNorms in
    eval mode as finetune.freeze_batch_stats says; plain `model.apply` when nothing is frozen."""
    frozen, mode = frozen_fn(config), config.finetune.freeze_batch_stats
    if frozen is None and mode == 'none':
        return model.apply

    def eval_mode(context) -> bool:
        if mode == 'all':
            return True
        prefix = 'params/' + '/'.join(context.module.path) + '/'
        return mode == 'frozen' and frozen(prefix + 'scale') and frozen(prefix + 'bias')

    def batch_norm(next_fun, args, kwargs, context):
        """A training-mode BatchNorm to freeze runs as its eval-mode twin on the same variables."""
        module = context.module
        if isinstance(module, BatchNorm) and context.method_name == '__call__' and \
                not module.use_running_average and eval_mode(context):
            twin = module.clone(parent=None, use_running_average=True)
            return twin.apply({k: module.variables[k] for k in ('params', 'batch_stats')}, *args, **kwargs)
        return next_fun(*args, **kwargs)

    def apply(variables, *args, **kwargs):
        params = variables['params']
        if frozen is not None:
            params = jax.tree_util.tree_map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                                            _map_names(frozen, params))
        with nn.intercept_methods(batch_norm):
            return model.apply(dict(variables, params=params), *args, **kwargs)

    return apply


@functools.lru_cache(maxsize=8)
def variable_names(model, image_size: int) -> dict[str, list[str]]:
    """{'params': [...], 'batch_stats': [...]} path names of `model`'s variables, from an abstract
    init (no compilation), for checking a config against the parameters it names."""
    state = jax.eval_shape(functools.partial(create_state, model, optax.identity(), image_size=image_size,
                                             ema=False), jax.random.key(0))
    return {'params': path_names(state.params), 'batch_stats': path_names(state.batch_stats, 'batch_stats/')}


def check_config(config, model) -> None:
    """Refuse fine-tuning fields that cannot work on `model`; patterns are checked against its parameter
    paths, from an abstract init (nothing is compiled)."""
    f = config.finetune
    check_field_choice('finetune.freeze_batch_stats', f.freeze_batch_stats, FREEZE_BATCH_STATS)
    if f.linear_probe:
        for field, off in (('finetune.freeze', ()), ('finetune.freeze_batch_stats', 'none'),
                           ('finetune.layer_lr_decay', 1.0), ('optim.ema_decay', 0.0), ('data.mixup_alpha', 0.0),
                           ('data.cutmix_alpha', 0.0)):
            if config[field] != off:
                refuse(field, f'{config[field]!r} does not apply to finetune.linear_probe, which trains only the '
                              f'head, without augmentation, on features computed once in eval mode; leave it at {off!r}')
    for pattern in f.freeze:
        check_field_regex('finetune.freeze', pattern)
    if not f.freeze and f.freeze_batch_stats == 'none':
        return
    names = variable_names(model, config.data.image_size)
    params = names['params']
    if f.freeze_batch_stats != 'none' and not names['batch_stats']:
        refuse('finetune.freeze_batch_stats', f'{f.freeze_batch_stats!r} needs BatchNorm layers, and this model has '
                                              "none; use 'none'")
    for pattern in unmatched(f.freeze, params):
        tops = sorted({n.split('/')[1] for n in params})
        refuse('finetune.freeze', f'{pattern!r} matches no parameter of {config.model.name}. Patterns are '
                                  f'fullmatched against paths such as {", ".join(params[:3])}, {params[-1]}; '
                                  f'the top-level modules are {", ".join(tops)}')
    frozen = frozen_fn(config) or (lambda name: False)
    if f.freeze and all(frozen(n) for n in params):
        refuse('finetune.freeze', f'{tuple(f.freeze)} freezes every parameter; nothing would train')
    if f.freeze_batch_stats == 'frozen':
        norms = {n.rsplit('/', 1)[0].replace('batch_stats/', 'params/', 1) for n in names['batch_stats']}
        if not any(frozen(f'{n}/scale') and frozen(f'{n}/bias') for n in norms):
            refuse('finetune.freeze_batch_stats', "'frozen' puts the BatchNorms whose scale and bias are frozen "
                                                  f'in eval mode, and finetune.freeze={tuple(f.freeze)} freezes none')
