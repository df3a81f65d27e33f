"""README's "Bring your own data" examples are presets that load: each YAML block, merged over
params.yaml with its files present, validates like any preset (the formats, the sampler / rewriter
start-up checks), and there is one per data source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from searchrl.config import deep_merge, load_yaml, validate

ROOT = Path(__file__).resolve().parents[2]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def yaml_blocks(text: str) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def input_paths(preset: dict) -> list[str]:
    prepare = preset["prepare"]
    source = prepare.get(prepare["source"], {})
    groups = [source.get(k) or [] for k in ("train", "eval", "corpus")]
    return [spec["path"] for group in groups for spec in group]


def test_there_is_one_example_per_source():
    sources = [b["prepare"]["source"] for b in yaml_blocks(section("Bring your own data"))]
    assert sorted(sources) == ["hf", "jsonl", "knowledge_world"]


@pytest.mark.parametrize("preset", yaml_blocks(section("Bring your own data")),
                         ids=lambda b: b["prepare"]["source"])
def test_each_example_validates_as_a_preset(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHRL_ROOT", str(tmp_path))  # relative input paths resolve here
    for path in input_paths(preset):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    params = validate(deep_merge(load_yaml(ROOT / "params.yaml"), preset), "README example")
    assert params.prepare.source == preset["prepare"]["source"]


def test_every_file_and_entry_point_readme_names_exists():
    """Issue 7/11 item 9: README's figures point at files under bench/results/, its commands at presets,
    scripts and modules; each one it names is in the repository (generated outputs excepted)."""
    import importlib.util

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w/.])((?:bench|configs|docker|scripts|tests)/[\w./-]+\.(?:json|md|png|py|yaml|csv))",
                           text))
    assert len(paths) >= 20
    examples = {"configs/mine.yaml"}  # the user's own preset in "Bring your own data"
    missing = sorted(p for p in paths - examples if not (ROOT / p).exists())
    assert not missing, f"README names files that are not in the repository: {missing}"
    modules = set(re.findall(r"python -m ((?:searchrl|tasks|flows)(?:\.\w+)+)", text))
    assert len(modules) >= 5
    absent = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not absent, f"README runs modules that do not exist: {absent}"
