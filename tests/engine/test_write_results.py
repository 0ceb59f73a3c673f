"""write_results: an evaluation's JSON next to its run, written whole or not at all."""

import json

import pytest

from dino_research.config import get_cfg
from dino_research.engine import write_results


def test_results_are_written_as_json_and_no_temporary_is_left(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    path = write_results(cfg, "knn.json", {"results": {"20": {"top1": 75.3}}})
    assert path == str(tmp_path / "knn.json")
    assert json.loads((tmp_path / "knn.json").read_text()) == {"results": {"20": {"top1": 75.3}}}
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]


def test_a_summary_that_cannot_be_written_leaves_the_previous_file(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    write_results(cfg, "knn.json", {"old": 1})
    with pytest.raises(TypeError):
        write_results(cfg, "knn.json", {"new": object()})  # not JSON: fails half-way through the dump
    assert json.loads((tmp_path / "knn.json").read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]
