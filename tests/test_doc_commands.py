"""Every command and config file the README and docs/ show works as written.

A fenced shell block's lines (``\\`` continuations joined, ``&&`` chains split) that run the project, ``python
train.py ...``, ``detr-backbone ...``, ``python -m detr_backbone ...`` or ``python -m detr_backbone.data.shapes
...`` (its options parsed), are composed and checked the way the
command itself composes them, without training or loading a model: train's overrides (each job of a ``-m``
sweep, a resume's saved overrides added) through Hydra, the schemas and the job's own checks; predict,
evaluate, export and verify through their configs and schemas; render through its options and train's config.
Any other command (``pip``, ``git``, ``cd``, ``wandb``, ...) is not the project's and is left alone. Transcripts
(plain blocks whose lines start with ``$``, shown with their output) are checked where composition alone decides
them: a command that names no file and is shown ending in ``error: ...`` must stop with that line. Paths are stood in for:
``data.*_images`` / ``data.*_annotations`` (and verify's ``images`` / ``annotations``) by a small COCO folder
this test writes, ``data.root`` by a small YOLO folder (a VOC one with ``data=voc``) of the shapes, a ``.ckpt`` by a checkpoint of the default job trained for one step, ``hydra.run.dir`` by
that checkpoint's run folder, ``--config-dir`` by the folder the files below are written to; ``...`` and
``<placeholder>`` stand for what the reader fills in.

A YAML or Python block whose leading comments name its file (``# configs/experiment/parts_r50.yaml``,
``# my_lab/backbones.py``) is written to that file exactly as shown: a config file into the user's config
folder, where its group and name compose it with train, a Python file onto ``sys.path``, where the commands
that name its classes import them. Every ``import`` of a Python block runs.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from PIL import Image

from detr_backbone.__main__ import COMMANDS
from detr_backbone.__main__ import main as cli_main
from detr_backbone.commands import render
from detr_backbone.commands.cli import (
    USER_ERRORS,
    compose_command,
    configs,
    one_line,
    split_config_dir,
    user_config_dir,
)
from detr_backbone.commands.evaluate import EvaluateConfig
from detr_backbone.commands.export import ExportConfig
from detr_backbone.commands.predict import PredictConfig
from detr_backbone.commands.verify import VerifyConfig
from detr_backbone.data.shapes import argument_parser as shapes_argument_parser
from detr_backbone.data.shapes import write_shapes
from detr_backbone.training import register_configs, validated
from detr_backbone.training.callbacks.saved_config import CommandLine
from detr_backbone.training.job import Job
from detr_backbone.training.resume import resume_command_line

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
PATH_COMMENT = re.compile(r"^#\s*(\S+\.(?:yaml|py))\b")  # "# configs/data/parts.yaml: ..." names the file shown
FILE_NAME = re.compile(r"/|\.(ckpt|pth|json|ya?ml|onnx|pt2|png|jpe?g)$")
PLACEHOLDER = re.compile(r"<([\w.-]+)>")  # outputs/<run>/..., <partition>
HYDRA_FLAGS = {"-m": 0, "--multirun": 0, "--resolve": 0, "--cfg": 1, "-c": 1, "--package": 1, "-p": 1}
COMMAND_CONFIGS = {"predict": PredictConfig, "evaluate": EvaluateConfig, "export": ExportConfig, "verify": VerifyConfig}
SHAPES_MODULE = "detr_backbone.data.shapes"  # python -m detr_backbone.data.shapes: the shapes written out as a folder
IMAGE_KEYS = ("data.train_images", "data.val_images", "images")
ANNOTATION_KEYS = ("data.train_annotations", "data.val_annotations", "annotations")
# the default job for one step: every override is one a resume may change, so the default config resumes it
ONE_STEP = (
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "trainer.accelerator=cpu",
    "test_after_fit=false",
    "data.cache=false",
    "callbacks.progress_bar=none",
    "callbacks.predictions.enabled=false",
    "callbacks.parameter_summary=false",
    "callbacks.lr_monitor=false",
    "logger.csv=false",
)


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str  # as written, continuations joined
    name: str  # train, predict, ..., or "cli" for detr-backbone's own arguments
    arguments: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def fenced_blocks(text: str, page: str) -> list[Block]:
    blocks, opened = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if opened is None:
            if fence:
                opened = (number, fence.group(1), fence.group(2), [])
        elif fence and fence.group(2) == "":
            start, indent, language, lines = opened
            blocks.append(Block(page, start, language, "\n".join(each.removeprefix(indent) for each in lines)))
            opened = None
        else:
            opened[3].append(line)
    return blocks


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(offset, line) with ``\\`` continuations joined into one line."""
    lines, pending, start = [], "", 0
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def project_command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(command, arguments) when ``tokens`` run the project; None for any other program."""
    while tokens and re.match(r"^\w+=", tokens[0]):  # VAR=value before the program
        tokens = tokens[1:]
    if tokens[:1] in (["python"], ["python3"]):
        if tokens[1:2] == ["train.py"]:
            return "train", tokens[2:]
        if tokens[1:3] == ["-m", SHAPES_MODULE]:
            return "shapes", tokens[3:]
        tokens = ["detr-backbone", *tokens[3:]] if tokens[1:3] == ["-m", "detr_backbone"] else []
    if tokens[:1] == ["detr-backbone"]:
        return (tokens[1], tokens[2:]) if tokens[1:2] and tokens[1] in COMMANDS else ("cli", tokens[1:])
    return None


def commands_of(block: Block) -> list[Command]:
    if block.language not in SHELL:
        return []
    found = []
    for offset, line in logical_lines(block.text):
        tokens = shlex.split(PLACEHOLDER.sub(r"\1", line), comments=True)
        chain = []
        for token in [*tokens, "&&"]:
            if token not in ("&&", "||", ";"):
                chain.append(token)
                continue
            command = project_command(chain)
            if command is not None:
                found.append(Command(block.page, block.line + 1 + offset, line.strip(), command[0], tuple(command[1])))
            chain = []
    return found


def shown_file(block: Block) -> str | None:
    """The path a block's leading comments name, if any."""
    if block.language not in ("yaml", "python"):
        return None
    for line in block.text.splitlines():
        if not line.startswith("#"):
            return None
        named = PATH_COMMENT.match(line)
        if named:
            return named.group(1)
    return None


def config_path(shown: str) -> Path:
    """A config file's path inside the user's config folder: what follows ``conf/`` or ``configs/``."""
    parts = Path(shown).parts
    cut = max((i for i, part in enumerate(parts) if part in ("conf", "configs")), default=-1)
    return Path(*parts[cut + 1 :])


@dataclass
class StandIns:
    images: Path
    annotations: Path
    ckpt: Path
    config_dir: Path
    python_dir: Path
    folders: dict[str, Path]  # data.root of data=yolo and data=voc


def write_coco(folder: Path) -> tuple[Path, Path]:
    images = folder / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for index in range(2):
        name = f"{index}.png"
        Image.new("RGB", (64, 48), (60 * index, 90, 150)).save(images / name)
        entries.append({"id": index + 1, "file_name": name, "width": 64, "height": 48})
        annotations.append(
            {
                "id": index + 1,
                "image_id": index + 1,
                "category_id": 1,
                "bbox": [4, 5, 20, 16],
                "area": 320,
                "iscrowd": 0,
            }
        )
    path = folder / "instances.json"
    categories = [{"id": 1, "name": "part"}]
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return images, path


def write_shown_files(blocks: list[Block], config_dir: Path, python_dir: Path) -> list[tuple[Block, Path]]:
    written: dict[Path, Block] = {}
    for block in blocks:
        shown = shown_file(block)
        if shown is None:
            continue
        path = config_dir / config_path(shown) if block.language == "yaml" else python_dir / shown
        if path in written:
            assert written[path].text == block.text, f"{block.page}:{block.line} shows {shown} unlike {written[path]}"
        written[path] = block
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text + "\n")
    return [(block, path) for path, block in written.items()]


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page.read_text(), page.name)]


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> StandIns:
    """The COCO folder, the one-step checkpoint and the files the pages show, written once for the module."""
    folder = tmp_path_factory.mktemp("doc_commands")
    images, annotations = write_coco(folder / "coco")
    folders = {layout: folder / layout for layout in ("yolo", "voc")}
    for layout, root in folders.items():
        write_shapes(root, layout, train_size=2, val_size=1, min_size=32, max_size=40)
    register_configs()
    run = folder / "outputs" / "run"
    with configs(None, "train"):
        cfg = compose(config_name="config", overrides=list(ONE_STEP))
    with warnings.catch_warnings():  # a step without validation: nothing for the checkpoint's monitor
        warnings.simplefilter("ignore")
        Job(validated(cfg, run), run, CommandLine(ONE_STEP, None)).run()
    config_dir, python_dir = folder / "configs", folder / "python"
    write_shown_files(all_blocks(), config_dir, python_dir)
    config_dir.mkdir(exist_ok=True)
    return StandIns(images, annotations, run / "checkpoints" / "last.ckpt", config_dir, python_dir, folders)


def stand_ins(arguments: tuple[str, ...], paths: StandIns) -> list[str]:
    """The arguments with the reader's paths replaced by the test's files."""
    replaced, arguments = [], list(arguments)
    while arguments:
        argument = arguments.pop(0)
        key, equals, value = argument.partition("=")
        key = key.lstrip("+~")
        if argument == "...":
            continue
        if key in ("--config-dir", "-cd"):
            if not equals:
                arguments.pop(0)
            replaced += [key, str(paths.config_dir)]
        elif equals and key in IMAGE_KEYS:
            replaced.append(f"{key}={paths.images}")
        elif equals and key in ANNOTATION_KEYS:
            replaced.append(f"{key}={paths.annotations}")
        elif equals and key == "data.root":
            replaced.append(f"{key}={paths.folders['voc' if 'data=voc' in arguments + replaced else 'yolo']}")
        elif equals and key in ("ckpt_path", "init_from") and value.endswith(".ckpt"):
            replaced.append(f"{key}={paths.ckpt}")
        elif equals and key == "hydra.run.dir":
            replaced.append(f"{key}={paths.ckpt.parents[1]}")
        else:
            replaced.append(argument)
    return replaced


def compose_train(arguments: list[str]) -> int:
    """train's composition of ``arguments`` as ``python train.py`` does it, up to training; the number of jobs."""
    config_dir, overrides = split_config_dir(arguments)
    multirun = bool({"-m", "--multirun"} & set(overrides))
    kept = []
    while overrides:
        argument = overrides.pop(0)
        if argument in HYDRA_FLAGS:
            del overrides[: HYDRA_FLAGS[argument]]
        else:
            kept.append(argument)
    command_line = resume_command_line(CommandLine(tuple(kept), config_dir and str(user_config_dir(config_dir))))
    parsed = OverridesParser.create().parse_overrides(list(command_line.overrides))
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert multirun or len(jobs) == 1, "a sweep needs -m"
    for job in jobs:
        with configs(command_line.config_dir, "train"):
            cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
        run_dir = Path(cfg.hydra.run.dir)
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # a launcher's interpolations of the job's keys
        with open_dict(cfg):
            del cfg["hydra"]
        validated(cfg, run_dir)
    return len(jobs)


def run_composition(command: Command, paths: StandIns) -> None:
    arguments = stand_ins(command.arguments, paths)
    try:
        if command.name == "train":
            compose_train(arguments)
        elif command.name in COMMAND_CONFIGS:
            compose_command(command.name, COMMAND_CONFIGS[command.name], arguments)
        elif command.name == "render":
            _, overrides, config_dir = render.parse_args(arguments)
            render.compose_config(overrides, config_dir)
        elif command.name == "shapes":
            shapes_argument_parser().parse_args(arguments)
        elif command.name == "cli":
            cli_main(arguments)
        else:
            raise AssertionError(f"no composition for {command.name}")
    except SystemExit as exit:  # --help prints and exits 0
        assert exit.code in (0, None), exit.code


def transcript_errors(block: Block) -> list[tuple[Command, str]]:
    """(command, its ``error: ...`` line) of a transcript's commands that name no file, which composition decides."""
    if block.language:
        return []
    lines, found = block.text.splitlines(), []
    for offset, (line, output) in enumerate(zip(lines, [*lines[1:], ""])):
        if not (line.startswith("$ ") and output.startswith("error: ")):
            continue
        command = project_command(shlex.split(line[2:]))
        if command is None or any(FILE_NAME.search(argument.partition("=")[2]) for argument in command[1]):
            continue  # a file's name: what it holds decides the error, not composition
        where = Command(block.page, block.line + 1 + offset, line[2:], command[0], tuple(command[1]))
        found.append((where, output))
    return found


def page_commands() -> list[Command]:
    """Each command once, where it is first written."""
    first: dict[tuple[str, tuple[str, ...]], Command] = {}
    for command in (command for block in all_blocks() for command in commands_of(block)):
        first.setdefault((command.name, command.arguments), command)
    return list(first.values())


def test_the_pages_show_commands_of_every_kind():
    names = {command.name for command in page_commands()}
    assert {"train", "predict", "evaluate", "export", "render", "verify"} <= names, names


@pytest.mark.parametrize("command", page_commands(), ids=str)
def test_command_composes(command, shown, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(shown.python_dir))
    run_composition(command, shown)


@pytest.mark.parametrize(
    "command, error", [each for block in all_blocks() for each in transcript_errors(block)], ids=lambda c: str(c)
)
def test_transcript_error_is_the_commands(command, error, shown):
    with pytest.raises(USER_ERRORS) as stopped:
        run_composition(command, shown)
    assert one_line(stopped.value) == error


def test_every_yaml_example_names_its_file():
    unnamed = [f"{b.page}:{b.line}" for b in all_blocks() if b.language == "yaml" and shown_file(b) is None]
    assert not unnamed, f"YAML examples without a leading '# <folder>/<group>/<name>.yaml' comment: {unnamed}"


@pytest.mark.parametrize("block", [b for b in all_blocks() if shown_file(b)], ids=lambda b: f"{b.page}:{b.line}")
def test_shown_file_is_used_as_written(block, shown, monkeypatch):
    """A config file composes train with its group and name; a Python file imports."""
    monkeypatch.syspath_prepend(str(shown.python_dir))
    name = shown_file(block)
    if block.language == "python":
        module = Path(name).with_suffix("").as_posix().replace("/", ".")
        __import__(module)
        return
    relative = config_path(name)
    assert (shown.config_dir / relative).read_text() == block.text + "\n"
    group = relative.parent.as_posix()
    option = f"{group}={relative.stem}" if group != "." else None
    compose_train(stand_ins(("--config-dir", "configs", *([option] if option else [])), shown))


@pytest.mark.parametrize(
    "block", [b for b in all_blocks() if b.language == "python"], ids=lambda b: f"{b.page}:{b.line}"
)
def test_python_imports_run(block, shown, monkeypatch):
    monkeypatch.syspath_prepend(str(shown.python_dir))
    tree = ast.parse(block.text)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=imports, type_ignores=[]), f"{block.page}:{block.line}", "exec"), {})


MISSPELT = """
```bash
python train.py backbone=resnet50 dilaton=true
```

```yaml
# @package _global_
# configs/experiment/misspelt.yaml
defaults:
  - override /backbone: resnet50
backbone:
  dilaton: true
```
"""


def test_a_misspelt_key_fails(shown, tmp_path):
    blocks = fenced_blocks(MISSPELT, "misspelt.md")
    (command,) = commands_of(blocks[0])
    assert command.arguments == ("backbone=resnet50", "dilaton=true")
    with pytest.raises(Exception, match="dilaton"):
        run_composition(command, shown)
    config_dir = tmp_path / "configs"
    (_, path), *_ = write_shown_files(blocks, config_dir, tmp_path / "python")
    assert path == config_dir / "experiment" / "misspelt.yaml"
    with pytest.raises(Exception, match="dilaton"):
        compose_train(["--config-dir", str(config_dir), "experiment=misspelt"])
