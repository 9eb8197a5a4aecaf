"""`dpoc`'s parser is made for the command given: only its subparser, parsing exactly as the full parser does."""

from __future__ import annotations

import argparse

import pytest

from dpoc.cli import COMMANDS, EXTERNAL, _parser


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_a_named_command_gets_only_its_own_subparser_and_anything_else_gets_all():
    assert _commands(_parser("build")) == ["build"]
    for command in (None, "--help", "bogus"):
        assert _commands(_parser(command)) == [*COMMANDS, *EXTERNAL]


@pytest.mark.parametrize("argv", [
    ["build", "r.yaml", "training.lr=1e-7", "-o", "out"], ["validate", "a.yaml", "b.yaml", "--set", "x=1"],
    ["explain", "r.yaml", "~lora"], ["plan", "r.yaml", "--json", "--top", "3", "--chart", "c.svg"],
    ["diff", "a.yaml", "b", "x=2", "--a-set", "y=3", "--files"], ["schema", "plan"],
    ["preflight", "build/x", "--mode", "resume", "--node-rank", "1", "--master-port", "7000", "--device"],
])
def test_each_command_parses_alike_with_its_subparser_alone(argv):
    assert vars(_parser(argv[0]).parse_args(argv)) == vars(_parser().parse_args(argv))


def test_a_bad_argument_to_a_named_command_is_refused_as_before(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser("schema").parse_args(["schema", "nope"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("dpoc schema: error: argument kind: invalid choice: 'nope' "
                                                        "(choose from 'recipe', 'model', 'hardware', 'plan', "
                                                        "'preprocess')")
