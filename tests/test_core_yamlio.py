"""core.yamlio.read_yaml: the one reader of user YAML files (specs, manifests, stage files)."""

from __future__ import annotations

import pytest

from blip3.core.errors import UserError
from blip3.core.yamlio import read_yaml


def test_reads_yaml(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("name: x\nsources: [1, 2]\n")
    assert read_yaml(p) == {"name": "x", "sources": [1, 2]}


def test_missing_file_names_what_and_where(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: manifest not found$"):
        read_yaml(tmp_path / "nope.yaml", "manifest")


def test_bad_yaml_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML: ") as e:
        read_yaml(p, "spec")
    assert "\n" not in str(e.value)
