"""The package's layers: every flowmap module imports only its own layer and the layers below it,
no module imports itself back through others (no import circle, function-level imports included),
and no module or function outgrows what a reader can hold.

Order (bottom first): the math core (io, paths, protocols, conditioning, flowmap, ode, oracles, in
that order), nets, teachers, losses, presets, data, codecs, metrics, training, apps. A new arrow pointing
back up fails here.
"""

import ast
from pathlib import Path

import flowmap

ROOT = Path(flowmap.__file__).resolve().parent
LAYERS = [
    "flowmap.io",
    "flowmap.paths",
    "flowmap.protocols",
    "flowmap.conditioning",
    "flowmap.flowmap",
    "flowmap.ode",
    "flowmap.oracles",
    "flowmap.reflow",
    "flowmap.nets",
    "flowmap.teachers",  # a foreign teacher's student adapts its network (nets.adapter)
    "flowmap.losses",
    "flowmap.presets",
    "flowmap.data",
    "flowmap.codecs",  # latent data: a pixel data module through a codec (teachers.spec builds it)
    "flowmap.metrics",
    "flowmap.steering",  # rewards use the digits classifier (metrics); RewardLoss is a loss
    "flowmap.training",
    "flowmap.apps",
]


def _layer(module: str) -> int:
    """The index of ``module``'s layer in :data:`LAYERS`, -1 if it has none."""
    found = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(found, default=-1)


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowmap."):
            # `from flowmap.apps import report` imports the module report, not a name of apps
            subs = [f"{node.module}.{a.name}" for a in node.names]
            subs = [m for m in subs if _is_module(m)]
            if len(subs) < len(node.names):
                out.append((node.module, node.lineno))
            out += [(m, node.lineno) for m in subs]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("flowmap.")]
    return out


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "flowmap":  # the front door re-exports from every layer
            yield name, path


def test_imports_point_down_the_layers():
    upward = [
        f"{name}:{line} imports {target}"
        for name, path in _modules()
        for target, line in _imports(path)
        if _layer(target) > _layer(name)
    ]
    assert not upward, upward


def test_every_module_belongs_to_a_layer():
    for name, _ in _modules():
        assert _layer(name) >= 0, name


def test_the_front_door_lists_a_small_documented_api():
    assert 8 <= len(flowmap.__all__) <= 16
    for name in flowmap.__all__:
        obj = getattr(flowmap, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
        assert name in flowmap.__doc__, name
    assert flowmap.__version__


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _graph() -> dict[str, set[str]]:
    """Module → the flowmap modules it imports (at any depth of its code). A package's
    ``__init__`` counts only where named: importing ``flowmap.a.b`` runs ``flowmap.a`` too, but
    the arrow that matters is to ``b``."""
    names = {name for name, _ in _modules()}
    return {
        name: {t for t, _ in _imports(path) if t in names and t != name}
        for name, path in _modules()
    }


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere():
    assert not _circles(_graph())


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for name, path in _modules():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
