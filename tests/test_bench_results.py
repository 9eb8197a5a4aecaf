"""Every committed benchmark result matches its per-field schema (bench/schemas/<name>.schema.json), and a bench
cannot write a result its schema does not allow: `bench/_shared.write_result` checks each one first."""

from __future__ import annotations

import argparse
import json

import pytest

from bench._shared import RESULTS, SCHEMAS, schema_problems, write_result

NAMES = sorted(p.stem for p in RESULTS.glob("*.json"))


def _committed(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def test_every_result_has_its_schema_and_every_schema_a_result():
    schemas = sorted(p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json"))
    assert schemas == sorted([*NAMES, "provenance"])


@pytest.mark.parametrize("name", NAMES)
def test_the_committed_result_matches_its_schema(name):
    assert schema_problems(name, _committed(name)) == []


def test_the_schema_checks_nested_fields_not_only_the_top_level_keys():
    result = _committed("planner")
    result["calibration"]["calibration"][0]["error"] = "x"
    del result["tiny_cpu"]["layouts"]["1 processes"]["live"]["padding"]
    result["tiny_cpu"]["layouts"]["4 processes"] = {"live": {}}
    result["measured_commit"] = "HEAD"
    live = "tiny_cpu.layouts.4 processes.live"
    assert schema_problems("planner", result) == [
        "calibration.calibration.0.error: 'x' is not of type 'number'",
        "measured_commit: 'HEAD' does not match '^[0-9a-f]{40}$'",
        "tiny_cpu.layouts.1 processes.live: 'padding' is a required property",
        *(f"{live}: '{key}' is a required property" for key in (
            "error", "error_lengths_unknown", "error_without_latency", "measured_pairs_per_s", "padding",
            "predicted_lengths_unknown", "predicted_pairs_per_s", "predicted_step_shares",
            "predicted_without_latency")),
        "tiny_cpu.layouts.4 processes: 'precomputed' is a required property",
    ]


def test_a_result_its_schema_refuses_is_not_written(tmp_path):
    data = {k: v for k, v in _committed("checkpoint").items() if not k.startswith("measured_")}
    out = tmp_path / "checkpoint.json"
    with pytest.raises(ValueError, match=r"^bench/results/checkpoint\.json does not match bench/schemas/checkpoint"
                                         r"\.schema\.json: saves: 'three' is not of type 'integer'$"):
        write_result(argparse.Namespace(smoke=True, out=out), "checkpoint", {**data, "saves": "three"},
                     ["bench/checkpoint.py"])
    assert not out.exists()
    assert write_result(argparse.Namespace(smoke=True, out=out), "checkpoint", data, ["bench/checkpoint.py"]) == out


def test_a_bench_without_a_schema_cannot_write(tmp_path):
    with pytest.raises(ValueError, match=r"no schema bench/schemas/nothing\.schema\.json"):
        write_result(argparse.Namespace(smoke=True, out=tmp_path / "x.json"), "nothing", {}, ["bench/_shared.py"])
    assert list(tmp_path.iterdir()) == []


def test_a_smoke_result_must_have_the_committed_keys_and_name_the_commit_checked_out():
    import subprocess

    from bench._shared import REPO, smoke_problems

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {**_committed("checkpoint"), "measured_commit": head}
    assert smoke_problems("checkpoint", result) == []
    del result["saves"]
    result["measured_commit"] = "0" * 40
    assert smoke_problems("checkpoint", result) == [
        f"keys {sorted(result)}, committed {sorted(_committed('checkpoint'))}",
        f"measured_commit: {'0' * 40} is not HEAD {head}",
        "(top level): 'saves' is a required property",
    ]


def test_a_result_is_checked_as_its_file_will_hold_it(tmp_path):
    """os.getloadavg() is a tuple and a dict may have int keys: the schema sees them as the JSON file has them."""
    data = {k: v for k, v in _committed("compile_latency").items() if not k.startswith("measured_")}
    data["load_average_before_after"] = (1.0, 2.0)
    out = write_result(argparse.Namespace(smoke=True, out=tmp_path / "c.json"), "compile_latency", data,
                       ["bench/compile_latency.py"])
    assert json.loads(out.read_text())["load_average_before_after"] == [1.0, 2.0]

