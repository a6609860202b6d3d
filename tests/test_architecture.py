"""docs/architecture.md's import flow, checked: no module imports one from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "gptlab"
# lowest first; a module may import from its own layer and the ones below (the order of docs/architecture.md)
LAYERS = [
    ("errors", "progress", "safe_pickle", "threads"),
    ("config", "config_names"),
    ("tokenizers", "chat"),
    ("data",),
    ("model", "lora", "quantize", "decode"),
    ("interop.hf", "interop.names"),
    ("train.checkpoint", "train.distributed"),
    ("train", "generate", "evaluate", "plot"),
    ("interop", "serve", "jax"),
    ("cli", "__main__"),
]


def layer_of(module: str) -> int:
    """The layer of a dotted module name under gptlab (the most specific entry wins)."""
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    assert best is not None, f"{module} is in no layer of the import flow"
    return best[0]


def gptlab_imports(path: Path) -> set[str]:
    """Every gptlab module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptlab"):
            found.add(node.module.removeprefix("gptlab").lstrip("."))
            for alias in node.names:  # `from gptlab.data import shards` imports the module gptlab.data.shards
                if (
                    SRC / node.module.removeprefix("gptlab").lstrip(".").replace(".", "/") / f"{alias.name}.py"
                ).is_file():
                    found.add(f"{node.module.removeprefix('gptlab').lstrip('.')}.{alias.name}".lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("gptlab.") for a in node.names if a.name.startswith("gptlab.")}
    return {m for m in found if m}


def test_imports_flow_one_way():
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if module == "__init__":
            continue
        for imported in gptlab_imports(path):
            if layer_of(imported) > layer_of(module):
                violations.append(f"{module} imports {imported}")
    assert violations == []
