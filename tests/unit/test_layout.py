"""The package's layout is its architecture: each module's imports point down the layers only, and
no module grows past what one reading holds."""

from __future__ import annotations

import ast
from pathlib import Path

import timmserve

PACKAGE = Path(timmserve.__file__).parent
# Bottom to top. A module may import from its own layer and the layers below it, never above.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "logs", "supervision"),  # shared by every layer
    ("settings",),  # the typed config and the machine it resolves against
    ("model",),  # loading, backends, decoding, the batch function
    ("http",),  # the HTTP and OIP contract of every engine
    ("engines",),  # LitServe (engines/litserve/) and Ray Serve (engines/ray.py)
    ("cli", "client", "bench", "__main__", "__init__"),  # commands and tools on top
]
MAX_LINES = 400


def layer_of(module: str) -> int:
    """The layer of `timmserve.a.b` (its first part after the package)."""
    first = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if first in names)


def timmserve_imports(path: Path) -> set[str]:
    """Every timmserve module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "timmserve":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "timmserve")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "timmserve")
    return {name for name in found if name != "timmserve.__version__"}


def modules() -> dict[str, Path]:
    return {
        "timmserve." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_module_is_in_a_layer():
    for name in modules():
        if name != "timmserve":
            layer_of(name)  # StopIteration names the module left out


def test_imports_point_down_the_layers_only():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})"
        for name, path in modules().items()
        if name != "timmserve"
        for imported in timmserve_imports(path)
        if imported != "timmserve" and layer_of(imported) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_the_engines_do_not_import_each_other():
    ray_imports = timmserve_imports(PACKAGE / "engines" / "ray.py")
    assert not [m for m in ray_imports if m.startswith("timmserve.engines.litserve")], ray_imports
    litserve_imports = set().union(*(timmserve_imports(p) for p in (PACKAGE / "engines" / "litserve").glob("*.py")))
    assert "timmserve.engines.ray" not in litserve_imports


def test_no_module_is_longer_than_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
