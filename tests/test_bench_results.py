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
    result = _committed("dpo_vs_trl")
    result["configurations"][0]["fill"] = "full"
    del result["setup"]["model"]["hidden_size"]
    result["agreement"]["per_configuration"]["dpoc, new"] = {"loss": 1.0}
    result["measured_commit"] = "HEAD"
    assert schema_problems("dpo_vs_trl", result) == [
        "agreement.per_configuration.dpoc, new: 'grad_norm' is a required property",
        "agreement.per_configuration.dpoc, new: 'logps/chosen' is a required property",
        "agreement.per_configuration.dpoc, new: 'logps/rejected' is a required property",
        "agreement.per_configuration.dpoc, new: 'loss after one update' is a required property",
        "agreement.per_configuration.dpoc, new: Additional properties are not allowed ('loss' was unexpected)",
        "configurations.0.fill: 'full' is not of type 'null', 'number'",
        "measured_commit: 'HEAD' does not match '^[0-9a-f]{40}$'",
        "setup.model: 'hidden_size' is a required property",
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
