"""The README and docs/: every config key has a row, every relative link and anchor resolves, every benchmark
result cited is in the repository, every picture has the commands that made it beside it; conf/'s help texts
point to sections that exist."""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import typing
from pathlib import Path

import pytest

from detr_backbone.config import BackboneConfig, CustomBackboneConfig, CustomPositionConfig, PositionConfig
from detr_backbone.detection.registry import HEADS
from detr_backbone.training.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


# groups typed Any in Config, whose schema follows the node's _target_
GROUP_SCHEMAS = {
    "backbone": [BackboneConfig, CustomBackboneConfig],
    "position": [PositionConfig, CustomPositionConfig],
    "model": [head.schema for head in HEADS.values()],
}


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a dataclass schema, optional sub-schemas and each schema a
    group's ``_target_`` can select included (``arguments``, the user's own keys, aside)."""
    keys = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        nested = [arg for arg in typing.get_args(kind) if dataclasses.is_dataclass(arg)]
        if not prefix and field.name in GROUP_SCHEMAS:
            group = [schema_keys(each, f"{field.name}.") for each in GROUP_SCHEMAS[field.name]]
            keys += [
                key
                for key in dict.fromkeys(functools.reduce(operator.iadd, group, []))
                if not key.endswith(".arguments")
            ]
        elif dataclasses.is_dataclass(kind) or nested:
            keys += schema_keys(kind if dataclasses.is_dataclass(kind) else nested[0], f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_config_key_is_documented():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    keys = schema_keys(Config)
    assert {
        "backbone._target_",
        "backbone.levels",
        "model._target_",
        "model.num_queries",
        "callbacks.checkpoint.monitor",
        "ckpt_path",
    } <= set(keys)
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert not missing, f"docs/configuration.md has no entry for {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


CONF_PAGE = re.compile(r"\b(docs/[\w.-]+\.md)(?:#([\w-]+))?")
README_SECTION = re.compile(r"\(README: ([^)]+)\)")
RESULT_FILE = re.compile(r"\b(benchmarks/results/[\w.-]+\.json)\b")
UNTRACKED_RESULT = "latest.json"  # where a benchmark writes by default, not kept (.gitignore)


def test_config_comments_name_sections_that_exist():
    """conf/'s help texts point to docs/<page>.md#<section> (or README sections) that exist."""
    broken = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        text = path.read_text()
        for page, anchor in CONF_PAGE.findall(text):
            linked = ROOT / page
            if not linked.exists() or (anchor and anchor not in anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {page}#{anchor}")
        for section in README_SECTION.findall(text):
            if re.sub(r"[^\w\- ]", "", section.lower()).replace(" ", "-") not in anchors(ROOT / "README.md"):
                broken.append(f"{path.relative_to(ROOT)}: README: {section}")
    assert not broken, f"conf/ names sections that do not exist: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cited_benchmark_results_are_in_the_repository(page):
    cited = {name for name in RESULT_FILE.findall(page.read_text()) if not name.endswith(UNTRACKED_RESULT)}
    missing = sorted(name for name in cited if not (ROOT / name).is_file())
    assert not missing, f"{page.name} cites results that are not in the repository: {missing}"


PICTURE = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_picture_has_the_command_that_made_it_beside_it(page):
    """A picture's file is named by a shell block within a few lines of it: the commands that write it."""
    text = page.read_text()
    blocks = [(text.count("\n", 0, block.start()), block.group(1)) for block in SHELL_BLOCK.finditer(text)]
    unexplained = []
    for picture in PICTURE.finditer(text):
        line, name = text.count("\n", 0, picture.start()), Path(picture.group(1)).name
        if not any(abs(start - line) <= 12 and name in commands for start, commands in blocks):
            unexplained.append(name)
    assert not unexplained, f"{page.name}: pictures without the commands that made them beside them: {unexplained}"
