"""The package's layers: each module imports only from its own layer and those below it, and no modules import
each other in a circle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detr_backbone"
# lowest first; the root's own modules are the backbone library
LAYERS = ("", "detection", "data", "inference", "training", "commands")


def layer_of(module: str) -> int:
    """The layer of a dotted module name inside the package (``detr_backbone.data.coco`` -> 2)."""
    parts = module.split(".")[1:]
    if parts and parts[0] in LAYERS:
        return LAYERS.index(parts[0])
    if parts == ["__main__"]:
        return len(LAYERS) - 1
    return 0


MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


NAMES = {module_name(path) for path in MODULES}


def package_imports(path: Path) -> list[str]:
    """The modules of the package that ``path`` imports, as absolute dotted names, imports inside functions
    included; ``from package import name`` counts as importing the submodule ``package.name`` where there is one."""
    # the package a relative import starts from: the folder, for ``__init__.py`` and plain modules alike
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names.extend(
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in NAMES else target for alias in node.names
            )
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name == "detr_backbone" or name.startswith("detr_backbone.")]


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (``package_imports``). A package's own
    ``__init__`` counts where it is named; its parents, which Python runs first, do not: every module of a
    package would otherwise sit in a circle with the package's ``__init__``."""
    graph = {}
    for path in MODULES:
        own = module_name(path)
        graph[own] = {name for name in package_imports(path) if name in NAMES and name != own}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for following in sorted(graph.get(node, ())):
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in on_stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_modules_import_each_other_in_a_circle():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other in a circle: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_function_local_and_relative_imports():
    """The graph holds imports inside functions and resolves ``from .. import`` and ``from . import name``, and the
    search finds a circle of three, so the test above can fail."""
    graph = import_graph()
    assert "detr_backbone.detection.registry" in graph["detr_backbone.detection"]
    assert "detr_backbone.detection.head" in graph["detr_backbone.detection.building"]
    assert "detr_backbone.training.module" in graph["detr_backbone.training.job"]
    local = "detr_backbone.data.datamodule"  # the DataModule's names are imported on first use
    assert local in graph["detr_backbone.data"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    upward = [name for name in package_imports(path) if layer_of(name) > layer_of(own)]
    assert not upward, f"{own} (layer {LAYERS[layer_of(own)] or 'root'}) imports {upward}"


def test_the_layer_check_sees_relative_imports():
    """The walker resolves ``from ..x import`` the way Python does, so the test above can fail."""
    imports = package_imports(PACKAGE / "training" / "callbacks" / "prediction_grid.py")
    assert "detr_backbone.detection.boxes" in imports
    assert "detr_backbone.data.visualize" in imports
    assert (
        layer_of("detr_backbone.commands.render")
        > layer_of("detr_backbone.training.job")
        > layer_of("detr_backbone.joiner")
    )
    assert layer_of("detr_backbone.training.module") > layer_of("detr_backbone.inference.checkpoint")


@pytest.mark.slow
def test_the_root_stays_the_backbone_library():
    """Importing the backbone library loads neither the detector, the training job nor Lightning's Trainer."""
    loaded = loaded_modules("detr_backbone")
    assert "pytorch_lightning" not in loaded and "detr_backbone.training" not in loaded
    assert "detr_backbone.detection" not in loaded and "detr_backbone.joiner" in loaded


def loaded_modules(module: str) -> str:
    """The package's and Lightning's modules that importing ``module`` loads, in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.startswith(('detr_backbone.', 'pytorch_lightning', 'lightning'))))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_inference_runs_without_lightning():
    """Serving code imports the inference layer: it loads neither Lightning nor the training job."""
    loaded = loaded_modules("detr_backbone.inference")
    assert "detr_backbone.inference.checkpoint" in loaded and "detr_backbone.detection.registry" in loaded
    assert "pytorch_lightning" not in loaded and "lightning" not in loaded
    assert "detr_backbone.training" not in loaded and "detr_backbone.commands" not in loaded


def test_shared_helpers_sit_below_their_users():
    """File writing and box colours are imported by several layers, so they live below all of them."""
    users = {
        "detr_backbone.file_writes": ["inference/export.py", "training/checkpoint_io.py", "commands/predict.py"],
        "detr_backbone.data.visualize": ["training/callbacks/prediction_grid.py", "commands/predict.py"],
    }
    for helper, paths in users.items():
        for path in paths:
            assert helper in package_imports(PACKAGE / path), f"{path} does not import {helper}"
            assert layer_of(helper) < layer_of(f"detr_backbone.{path.partition('/')[0]}")


@pytest.mark.parametrize(
    "module, names",
    [
        ("detr_backbone", ["Joiner", "build_backbone", "NestedTensor", "FrozenBatchNorm2d", "load_checkpoint"]),
        (
            "detr_backbone.detection",
            ["DETR", "Transformer", "HungarianMatcher", "SetCriterion", "PostProcess", "DetectorConfig", "HEADS"],
        ),
        ("detr_backbone.detection.deformable", ["DeformableDETR", "DeformableDetrConfig", "TopKPostProcess"]),
        ("detr_backbone.detection.dino", ["DINO", "DinoConfig", "DenoisingQueries", "contrastive_denoising"]),
        ("detr_backbone.data", ["build_datamodule", "ShapesDataset", "CocoDetection"]),
        ("detr_backbone.training", ["DetrModule", "Job", "Config", "register_configs", "validated"]),
        (
            "detr_backbone.training.callbacks",
            ["LastCheckpoint", "NonFiniteLossGuard", "PredictionGrid", "ParameterSummary"],
        ),
        (
            "detr_backbone.inference",
            ["Predictor", "Detections", "load_detector", "export_detector", "load_exported", "coco_metrics"],
        ),
    ],
)
def test_public_names_import_from_their_layer(module, names):
    loaded = importlib.import_module(module)
    assert set(names) <= set(loaded.__all__)
    assert all(hasattr(loaded, name) for name in names)


def listed_modules(page: Path) -> set[str]:
    """The modules the tree in ``page`` lists: one per name, by the folders its indentation puts it in."""
    block = page.read_text().split("```\n", 2)[1]
    folders: list[str] = []
    listed = set()
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 4
        names = line.strip().split("  ")[0]
        if not names or depth > len(folders):
            continue  # a description carried onto the next line
        folders = folders[:depth]
        for name in (part.strip() for part in names.split(",")):
            if name.endswith("/"):
                folders.append(name)
            elif name.endswith(".py"):
                listed.add("".join(folders) + name)
    return listed


def test_the_layout_page_lists_every_module():
    existing = {
        "detr_backbone/" + str(path.relative_to(PACKAGE))
        for path in MODULES
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    listed = {
        name for name in listed_modules(PACKAGE.parent / "docs" / "layout.md") if name.startswith("detr_backbone/")
    }
    assert sorted(existing - listed) == [], "modules docs/layout.md does not list"
    assert sorted(listed - existing) == [], "modules docs/layout.md lists that do not exist"
