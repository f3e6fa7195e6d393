"""The experiment's typed records and shared small types: a record read from a file writes back the same
file, unknown keys survive, one Direction for max and min, one cache root."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tune_rice import records
from tune_rice.records import Direction, FinalRecord


def test_a_record_writes_back_the_file_it_was_read_from(tmp_path):
    saved = {"trial_id": "t3", "accuracy": 0.75, "test_count": 8, "leaked": 1, "classes": ["a", "b"]}
    (tmp_path / records.TEST_METRICS_FILE).write_text(json.dumps(saved))
    test = records.TestMetrics.read(tmp_path)
    assert test is not None and test.accuracy == 0.75 and test.test_count == 8 and test.classes == ["a", "b"]
    assert test.extra == {"leaked": 1} and test.single_best is None  # absent: the default, not written back
    (tmp_path / "again").mkdir()
    test.write(tmp_path / "again")
    assert (tmp_path / "again" / records.TEST_METRICS_FILE).read_text() == json.dumps(saved, indent=1)


def test_a_new_record_writes_every_field_and_missing_or_broken_files_read_as_none(tmp_path):
    record = FinalRecord(candidates=["t1", "probe:b"], deployed="single", members=["t1"], weights=[1.0], k=4)
    back = FinalRecord.read(record.write(tmp_path).parent)
    assert back == record and back.to_dict() == record.to_dict() and back.lead == {}
    assert records.TestMetrics.read(tmp_path / "nowhere") is None
    (tmp_path / records.TEST_METRICS_FILE).write_text("{not json")
    assert records.TestMetrics.read(tmp_path) is None
    (tmp_path / records.TEST_METRICS_FILE).write_text("[1, 2]")
    assert records.TestMetrics.read(tmp_path) is None


@pytest.mark.parametrize("mode", ["max", "min"])
def test_one_direction_for_max_and_min(mode):
    d = Direction(mode)
    assert d == mode and d.optuna == {"max": "maximize", "min": "minimize"}[mode]
    values = pd.Series([0.3, float("nan"), 0.9, 0.1], index=["a", "b", "c", "d"])
    best = values.max() if mode == "max" else values.min()
    assert d.best_label(values) == values[values == best].index[0] and d.best([0.3, 0.9, 0.1]) == best
    assert d.better(best, 0.5) and not d.better(0.5, best) and not d.better(0.5, 0.5) and d.better(0.5, None)
    assert sorted([0.3, 0.9, 0.1], key=lambda v: -d.sign * v)[0] == best
    assert list(values.dropna().sort_values(ascending=d.ascending))[0] == best
    with pytest.raises(ValueError):
        Direction("maximize")


def test_one_cache_root(monkeypatch, tmp_path):
    from tune_rice.data import demo

    monkeypatch.setenv("TUNE_RICE_CACHE", str(tmp_path / "c"))
    assert records.cache_root() == tmp_path / "c" and demo.default_demo_dir() == tmp_path / "c" / "demo"
    monkeypatch.delenv("TUNE_RICE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert records.cache_root() == tmp_path / "home" / ".cache" / "tune_rice"
    # resolved in one place: no other module reads the variable (the feature, weight and size caches
    # call cache_root; importing them to check costs seconds of torch import)
    package = Path(records.__file__).parent
    readers = [p.name for p in package.glob("*.py") if '"TUNE_RICE_CACHE"' in p.read_text()]
    assert readers == ["records.py"]
