"""The package's layers (docs/architecture.md): each module imports only its own layer and
the layers below, counting imports inside functions too (a deferred import hides a cycle or
an upward dependency from Python, not from a reader); and there are no import cycles."""

import ast
import fnmatch
import os

from tests.support import REPO as ROOT

PACKAGE = "mfuser_jax"


def _modules():
    mods = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name, path, mods):
    """The package modules `name` imports (a package's own submodules excluded)."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                       for a in node.names]
        for t in targets:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in mods and t != name and not (is_package and t.startswith(name + ".")):
                found.add(t)
    return found


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


# The layers, lowest first, as docs/architecture.md's table lists them (module patterns).
LAYERS = [
    ("base", ["mfuser_jax", "mfuser_jax.errors", "mfuser_jax.files"]),
    ("ops", ["mfuser_jax.ops", "mfuser_jax.ops.*"]),
    ("building blocks", ["mfuser_jax.nn", "mfuser_jax.nn.*"]),
    ("weight files", ["mfuser_jax.weights", "mfuser_jax.weights.*"]),
    ("data", ["mfuser_jax.data", "mfuser_jax.data.*"]),
    ("towers", ["mfuser_jax.towers", "mfuser_jax.towers.spec", "mfuser_jax.towers.*.config",
                "mfuser_jax.towers.*.model",
                "mfuser_jax.towers.*.convert", "mfuser_jax.towers.*.tokenizer",
                "mfuser_jax.towers.clip", "mfuser_jax.towers.eva02", "mfuser_jax.towers.siglip",
                "mfuser_jax.towers.dinov2", "mfuser_jax.towers.dinov3"]),
    ("model parts", ["mfuser_jax.model", "mfuser_jax.model.backbone", "mfuser_jax.model.mvfuser",
                     "mfuser_jax.model.text_enhancer", "mfuser_jax.model.pixel_decoder",
                     "mfuser_jax.model.mask_decoder", "mfuser_jax.model.losses"]),
    ("fused backbones", ["mfuser_jax.towers.*.fusion"]),
    ("tower registry", ["mfuser_jax.towers.*.spec", "mfuser_jax.towers.registry"]),
    ("composition", ["mfuser_jax.model.config", "mfuser_jax.model.variants",
                     "mfuser_jax.model.factory", "mfuser_jax.model.pretrained",
                     "mfuser_jax.model.mfuser"]),
    ("running parts", ["mfuser_jax.sharding", "mfuser_jax.workdir", "mfuser_jax.optim",
                       "mfuser_jax.model_state", "mfuser_jax.trainer", "mfuser_jax.checkpoints",
                       "mfuser_jax.monitoring", "mfuser_jax.process"]),
    ("programs", ["mfuser_jax.run", "mfuser_jax.run.*"]),
]


def layer_of(module):
    """The index of the layer ``module`` belongs to (the most specific pattern wins: a
    tower's ``spec``/``fusion`` before its folder's ``towers.*`` patterns)."""
    matches = [(len(pattern), i) for i, (_, patterns) in enumerate(LAYERS)
               for pattern in patterns if fnmatch.fnmatchcase(module, pattern)
               and (pattern.count(".") == module.count(".") or pattern == module)]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and to "
                             "docs/architecture.md")
    return max(matches)[1]


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_imports_only_its_layer_and_those_below():
    graph = _graph()
    assert len(graph) > 60
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets)
              if layer_of(t) > layer_of(m)]
    assert upward == [], "\n".join(upward)


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mfuser_jax.run import train\n")
    mods = {"mfuser_jax.ops.m": str(module), "mfuser_jax.run.train": "train.py"}
    found = _imports("mfuser_jax.ops.m", str(module), mods)
    assert found == {"mfuser_jax.run.train"}
    assert layer_of("mfuser_jax.run.train") > layer_of("mfuser_jax.ops.m")


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_prediction_and_export_never_import_training():
    # neither the training job nor the train step: they restore into model_state.SplitModel
    graph = _graph()
    for program in ("mfuser_jax.run.predict", "mfuser_jax.run.export", "mfuser_jax.run.app",
                    "mfuser_jax.run.restore", "mfuser_jax.run.evaluate"):
        reached = _reach(graph, program)
        assert "mfuser_jax.run.train" not in reached, program
        assert "mfuser_jax.trainer" not in reached, program


def test_no_import_cycles():
    graph = _graph()
    assert "mfuser_jax.model.factory" in graph["mfuser_jax.run.train"]
    # deferred imports count: predict imports restore_model inside functions
    assert "mfuser_jax.run.restore" in graph["mfuser_jax.run.predict"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
