"""The package's layers: every flowmap module imports only its own layer and the layers below it.

Order (bottom first): the math core (io, paths, protocols, flowmap, ode, oracles, in that order),
teachers, nets, losses, presets, data, metrics, training, apps. A new arrow pointing back up fails here.
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
    "flowmap.nets",
    "flowmap.teachers",  # a foreign teacher's student adapts its network (nets.adapter)
    "flowmap.losses",
    "flowmap.presets",
    "flowmap.data",
    "flowmap.metrics",
    "flowmap.training",
    "flowmap.apps",
]


def _layer(module: str) -> int:
    """The index of ``module``'s layer in :data:`LAYERS`, -1 if it has none."""
    found = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(found, default=-1)


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowmap."):
            out.append((node.module, node.lineno))
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
