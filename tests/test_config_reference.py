"""README's config reference is generated from the dataclasses and must match the code."""
from __future__ import annotations

import dataclasses
import os

from ctrkit.config import Config
from ctrkit.config_reference import END, START, generate, replace_section

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_every_config_key_is_documented():
    reference = generate()
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            assert f"### `{section.name}`" in reference
            for f in dataclasses.fields(value):
                assert f"| `{f.name}` |" in reference, f"{section.name}.{f.name} missing from the reference"


def test_readme_reference_is_current():
    text = open(README, encoding="utf-8").read()
    assert START in text and END in text, "README.md lacks the config reference markers"
    assert replace_section(text, generate()) == text, (
        "README.md's config reference is stale: run `python3 -m ctrkit.config_reference --write README.md`"
    )


def test_write_without_markers_leaves_the_file_alone(tmp_path, capsys):
    from ctrkit.config_reference import main

    target = tmp_path / "doc.md"
    target.write_text("# no markers here\n")
    assert main(["--write", str(target)]) == 1
    assert target.read_text() == "# no markers here\n"
    assert "markers not found" in capsys.readouterr().err
