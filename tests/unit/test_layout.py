"""The package's layout: no module imports, at load time, one that imports it back (directly or around a loop)."""

import ast
from pathlib import Path

import ds_contrastive

PACKAGE = Path(ds_contrastive.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules its top-level relative imports load."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle():
    graph = module_imports()
    assert {"ds_contrastive.run.train", "ds_contrastive.hf.train_hf", "ds_contrastive.run.setup"} <= graph.keys()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name not in done:
            for dep in graph[name]:
                visit(dep, path + [name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_the_scripts_share_their_setup_and_do_not_import_each_other():
    graph = module_imports()
    assert "ds_contrastive.run.setup" in graph["ds_contrastive.hf.train_hf"]
    assert "ds_contrastive.run.setup" in graph["ds_contrastive.run.train"]
    assert "ds_contrastive.run.train" not in graph["ds_contrastive.hf.train_hf"]
    assert not any(m.startswith("ds_contrastive.hf") for m in graph["ds_contrastive.run.train"])
