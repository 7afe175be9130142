"""The package's layers: each module imports only from its own layer and those below it."""

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


def package_imports(path: Path) -> list[str]:
    """The modules of the package that ``path`` imports, as absolute dotted names."""
    # the package a relative import starts from: the folder, for ``__init__.py`` and plain modules alike
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names.append(target)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name == "detr_backbone" or name.startswith("detr_backbone.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


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
