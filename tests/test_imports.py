"""The package's house rules, read from its source with `ast` (nothing is imported, so this runs in a second).

1. No import circles between the modules of resnet_jax/ (imports inside functions count: a circle hidden in a
   function is still two modules that cannot be read, tested or moved one without the other).
2. Imports flow down the layers, lowest first:

       base       errors, sharding, distributed, workdir (and the package's own __init__)
       models     models/*                        the networks, their design space and weight import
       data       data/*                          datasets, augmentation and the feed
       train      train/*, checkpoint             one training run as a library
       commands   cli, evaluate, export, bench/*, sweep/*, analyze/*, pytorch/*, every __main__ module
       launchers  launch/*                        where runs start

   A module may import its own layer or a lower one; so a command may use another (sweep.results reads the
   sweep's record). The one dynamic import allowed is the sweep's `importlib.import_module` of the launcher it
   is asked for (resnet_jax.launch.<name>): the sweep hands its runs to a launcher chosen on the command line,
   and the launchers, a layer above, take `RunSpec`s only as values.
3. No import inside a function, except of an optional or heavy dependency that only some paths need, which
   stays lazy so that the other paths neither need it installed nor pay for importing it (LAZY).
4. Every public function and class, and every public method of a public class, has a docstring (a framework's
   hooks, HOOKS, are documented by their class).

Each test lists every problem as 'path:line: what (why)'.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'resnet_jax'

LAYERS = ('base', 'models', 'data', 'train', 'commands', 'launchers')
# Module name (or package prefix) -> layer; the longest match wins, and every __main__ module is a command.
PLACES = {
    'resnet_jax': 'base',
    'resnet_jax.errors': 'base',
    'resnet_jax.sharding': 'base',
    'resnet_jax.distributed': 'base',
    'resnet_jax.workdir': 'base',
    'resnet_jax.models': 'models',
    'resnet_jax.data': 'data',
    'resnet_jax.train': 'train',
    'resnet_jax.checkpoint': 'train',
    'resnet_jax.cli': 'commands',
    'resnet_jax.evaluate': 'commands',
    'resnet_jax.export': 'commands',
    'resnet_jax.bench': 'commands',
    'resnet_jax.sweep': 'commands',
    'resnet_jax.analyze': 'commands',
    'resnet_jax.pytorch': 'commands',
    'resnet_jax.launch': 'launchers',
}
# Dependencies imported inside the function that needs them, and why each may be.
LAZY = {
    'torch': 'optional: the test-time reference ([test] extra)',
    'torchvision': 'optional: weight import and the PyTorch reference only',
    'timm': 'optional: timm weight import only',
    'tensorflow': 'optional: only to build TFDS datasets ([tf] extra)',
    'tensorflow_datasets': 'heavy; only TFDS datasets read it',
    'grain': 'heavy (seconds to import); only the streaming feed uses it',
    'matplotlib': 'heavy; only the plots use it',
    'tensorboardX': 'heavy (seconds to import); only TensorBoard logging uses it',
    'resnet_jax.pytorch': 'imports torch at its top: the torch-only code, loaded for --vs_torch alone',
}
# Methods a framework calls, documented by their class: torch.nn.Module.forward, flax.linen.Module.setup.
HOOKS = ('forward', 'setup')
# The dynamic imports allowed: module -> the name prefix it may import by a computed name.
DYNAMIC = {'resnet_jax.sweep': 'resnet_jax.launch.'}


def _modules() -> dict[str, Path]:
    """{dotted module name: path} of every module of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob('*.py')):
        parts = list(path.relative_to(ROOT).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        found['.'.join(parts)] = path
    return found


MODULES = _modules()


def _where(module: str, node: ast.AST) -> str:
    return f'{MODULES[module].relative_to(ROOT)}:{node.lineno}'


def layer(module: str) -> str | None:
    """The layer of `module` (PLACES; every __main__ module is a command), None where it has no place."""
    if module.endswith('.__main__'):
        return 'commands'
    prefixes = [p for p in PLACES if module == p or module.startswith(p + '.')]
    return PLACES[max(prefixes, key=len)] if prefixes else None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_function(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return True
    return False


def _target(name: str) -> str:
    """The package module that importing `name` runs: `name` itself, else its nearest enclosing module."""
    while name not in MODULES:
        name = name.rpartition('.')[0]
    return name


def _imports(module: str, tree: ast.AST):
    """(import statement, the module it names, the package modules it runs) for each import in `tree`."""
    package = module if MODULES[module].name == '__init__.py' else module.rpartition('.')[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                internal = alias.name == PACKAGE or alias.name.startswith(PACKAGE + '.')
                yield node, alias.name, [_target(alias.name)] if internal else []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base != PACKAGE and not base.startswith(PACKAGE + '.'):
                yield node, base, []
                continue
            # Each name is a submodule, else a name defined in `base`.
            names = [f'{base}.{alias.name}' for alias in node.names]
            yield node, base, sorted({name if name in MODULES else _target(base) for name in names})


def _parsed() -> dict[str, ast.Module]:
    return {module: ast.parse(path.read_text(), str(path)) for module, path in MODULES.items()}


TREES = _parsed()


def _edges() -> list[tuple[str, str, ast.AST]]:
    """(importer, imported, node) for every import of one package module by another."""
    edges = []
    for module, tree in TREES.items():
        for node, _, targets in _imports(module, tree):
            edges += [(module, target, node) for target in targets if target != module]
    return edges


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` (iterative, so depth is no concern)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _report(problems: list[str], rule: str) -> str:
    """Every problem on its own line, in file and line order."""
    def order(problem: str):
        path, line, _ = problem.split(':', 2)
        return path, int(line)
    return f'{len(problems)} {rule}:\n' + '\n'.join(sorted(problems, key=order))


def test_every_module_has_a_layer():
    problems = [f'{path.relative_to(ROOT)}:1: {module} is in no layer (add it to PLACES in tests/test_imports.py and '
                'to docs/architecture.md, so that its imports can be checked)'
                for module, path in MODULES.items() if layer(module) is None]
    assert not problems, _report(problems, 'modules without a layer')


def test_no_import_circles():
    graph = {module: set() for module in MODULES}
    for importer, imported, _ in _edges():
        graph[importer].add(imported)
    problems = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        for importer, imported, node in _edges():
            if importer in members and imported in members:
                problems.append(f'{_where(importer, node)}: {importer} imports {imported}, in the circle of '
                                f'{", ".join(component)} (modules in a circle cannot be read, tested or moved one '
                                'without the others; move what they share into one of them or a lower module)')
    assert not problems, _report(problems, 'imports in circles')


def test_imports_flow_down_the_layers():
    problems = []
    for importer, imported, node in _edges():
        low, high = layer(importer), layer(imported)
        if low and high and LAYERS.index(high) > LAYERS.index(low):
            problems.append(f'{_where(importer, node)}: {importer} ({low}) imports {imported} ({high}), a higher '
                            f'layer (a module may import only its own layer or lower ones: {" -> ".join(LAYERS)})')
    assert not problems, _report(problems, 'imports against the layers')


def _computed_imports(tree: ast.AST):
    """(call, the constant start of the name) for each `import_module(...)` / `__import__(...)` in `tree`."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        if name in ('import_module', '__import__'):
            argument = node.args[0] if node.args else None
            text = argument.values[0] if isinstance(argument, ast.JoinedStr) and argument.values else argument
            yield node, text.value if isinstance(text, ast.Constant) and isinstance(text.value, str) else ''


def test_imports_by_computed_name_only_where_allowed():
    problems = [f'{_where(module, node)}: {module} imports a module by a computed name (only the sweep\'s choice of '
                f'launcher may: {DYNAMIC}; import by name so the layers can be checked)'
                for module, tree in TREES.items() for node, prefix in _computed_imports(tree)
                if not (module in DYNAMIC and prefix.startswith(DYNAMIC[module]))]
    assert not problems, _report(problems, 'imports by a computed name')


def test_no_imports_inside_functions():
    problems = []
    for module, tree in TREES.items():
        parents = _parents(tree)
        for node, name, targets in _imports(module, tree):
            lazy = any(name == dep or name.startswith(dep + '.') for dep in LAZY)
            if not lazy and _in_function(node, parents):
                name = ', '.join(targets) or name
                problems.append(f'{_where(module, node)}: {module} imports {name} inside a function (import it at '
                                'the top of the module; only optional or heavy dependencies stay lazy: '
                                f'{", ".join(LAZY)})')
    assert not problems, _report(problems, 'imports inside functions')


def _public(name: str) -> bool:
    return not name.startswith('_')


def test_public_definitions_have_docstrings():
    problems = []
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for module, tree in TREES.items():
        for node in tree.body:
            if not isinstance(node, kinds) or not _public(node.name):
                continue
            if ast.get_docstring(node) is None:
                kind = 'class' if isinstance(node, ast.ClassDef) else 'function'
                problems.append(f'{_where(module, node)}: {kind} {module}.{node.name} has no docstring')
            if isinstance(node, ast.ClassDef):
                for method in node.body:
                    if (isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(method.name)
                            and method.name not in HOOKS and ast.get_docstring(method) is None):
                        problems.append(f'{_where(module, method)}: method {module}.{node.name}.{method.name} has no '
                                        'docstring')
    why = 'public definitions without a docstring (one or two sentences that say why it exists)'
    assert not problems, _report(problems, why)


def test_the_architecture_page_names_every_module():
    """docs/architecture.md has one line per module, so a module added, moved or removed without the page
    (or the page without the code) fails here."""
    page = (ROOT / 'docs' / 'architecture.md').read_text()
    listed = set(re.findall(r'^\| `([\w/]+\.py)` \|', page, re.MULTILINE))
    actual = {str(path.relative_to(ROOT / 'resnet_jax')) for path in (ROOT / 'resnet_jax').rglob('*.py')}
    assert listed == actual, (f'missing from the page: {sorted(actual - listed)}; '
                              f'not in the code: {sorted(listed - actual)}')
