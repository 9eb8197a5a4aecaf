"""`dpoc` command line. Imports stay lazy: `dpoc build` must start fast and never import torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dpoc.contract.errors import EXIT_USER_ERROR, DpocError

# subcommands implemented in their own packages: name -> (module with add_arguments/run, help)
EXTERNAL = {
    "preprocess": ("dpoc.cli.preprocess", "tokenize preference data into the pairwise indexed dataset"),
    "report": ("dpoc.cli.report", "draw a run's loss, reward-margin and accuracy curves"),
    "launch": ("dpoc.cli.launch", "run a build here, over ssh or on Ray; stop (or restart) it when a node fails"),
    "jobs": ("dpoc.launch.jobs", "status, logs or stop of a launch submitted to Ray (dpoc launch --submit)"),
    "convert": ("dpoc.runtime.weights.converter",
                "Hugging Face weights <-> distributed checkpoints (streamed, any layout)"),
}


def _build(args: argparse.Namespace) -> int:
    from dpoc.compiler.pipeline import build
    from dpoc.compiler.render.render import skipped_targets

    plan, out = build(args.recipe, args.overrides, args.output)
    lay = plan.layout
    for warning in plan.warnings:
        print(f"{args.recipe}: warning: {warning}", file=sys.stderr)
    for target, reasons in skipped_targets(plan).items():
        if target != "mindspeed-rl" or plan.hardware.device == "npu":  # MindSpeed-RL runs on Ascend NPUs only
            print(f"{args.recipe}: target {target} not rendered: {reasons[0]}", file=sys.stderr)
    print(f"{out}: {plan.model.name} on {plan.hardware.nodes}×{plan.hardware.devices_per_node} "
          f"{plan.hardware.name} (tp={lay.tp} pp={lay.pp} dp={lay.dp} ep={lay.ep} etp={lay.etp} cp={lay.cp}"
          f"{f' vpp={lay.vpp}' if lay.vpp > 1 else ''}), runtime {plan.runtime}, plan {plan.hash()[:12]}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from dpoc.compiler.pipeline import plan_recipe

    problems = []
    for recipe in args.recipes:
        try:
            plan_recipe(recipe, args.overrides)
        except DpocError as exc:
            problems.extend(exc.problems)
        else:
            print(f"{recipe}: ok")
    if problems:
        raise DpocError(problems)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from dpoc.cli.explain import explain
    from dpoc.compiler.pipeline import plan_recipe

    print(explain(plan_recipe(args.recipe, args.overrides)), end="")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from dpoc.cli.plan import plan_command

    return plan_command(args.recipe, args.overrides, args.json, args.top, args.chart)


def _diff(args: argparse.Namespace) -> int:
    from dpoc.cli.diff import diff_command

    return diff_command(args.a, args.b, args.a_overrides, args.overrides, args.json, args.files)


def _schema(args: argparse.Namespace) -> int:
    from dpoc.contract import resources

    print(resources.schema_path(args.kind).read_text(), end="")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    from dpoc.launch.preflight import Node, device_check, preflight

    if args.device:
        from dpoc.planner.one_layer import estimate

        for line in device_check(args.build_dir, estimate):
            print(line)
        return 0
    node = None
    if args.node_rank is not None:
        node = Node(args.node_rank, args.master_addr, args.master_port, args.plan_hash or None)
    for warning in preflight(args.build_dir, args.mode, args.target, node):
        print(f"{args.build_dir}: warning: {warning}", file=sys.stderr)
    return 0


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotlist overrides, e.g. training.lr=1e-7; ~KEY deletes a recipe key")


def _build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    _overrides(p)
    p.add_argument("-o", "--output", help="build directory; its name names the build, its run directory "
                   "and dataset (default: build/<recipe file stem>)")
    p.set_defaults(func=_build)


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_validate)


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    _overrides(p)
    p.set_defaults(func=_explain)


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    _overrides(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--top", type=int, default=10, help="how many ranked layouts to show")
    p.add_argument("--chart", metavar="FILE.svg", help="write the memory per pipeline stage of the best layout")
    p.set_defaults(func=_plan)


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="a recipe file or a build directory (the old side)")
    p.add_argument("b", metavar="B", help="a recipe file or a build directory (the new side)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for B (a recipe); ~KEY deletes a key")
    p.add_argument("--a-set", dest="a_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for A (a recipe); repeatable")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--files", action="store_true", help="the changed lines of each changed file (unified diff)")
    p.set_defaults(func=_diff)


def _schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["recipe", "model", "hardware", "plan", "preprocess"])
    p.set_defaults(func=_schema)


def _preflight_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir")
    p.add_argument("--mode", choices=["fresh", "resume"], default="fresh")
    p.add_argument("--target", choices=["dpoc", "mindspeed-rl"], default="dpoc")
    p.add_argument("--node-rank", type=int, help="check this node too: devices, packages, the master")
    p.add_argument("--master-addr", default="127.0.0.1", help="with --node-rank: the master node 0 runs")
    p.add_argument("--master-port", type=int, default=6005, help="with --node-rank: the master's port")
    p.add_argument("--plan-hash", help="with --node-rank: the Plan hash the launcher started (empty: not checked)")
    p.add_argument("--device", action="store_true", help="instead: the device self-check, each kernel this build "
                   "runs against the CPU, then one layer of its model sharded at its tp/ep on this node's devices, "
                   "its time and memory beside the planner's (seconds)")
    p.set_defaults(func=_preflight)


# subcommands defined here: name -> (help, what adds its arguments)
COMMANDS = {
    "build": ("compile a recipe into a build directory", _build_arguments),
    "validate": ("check recipes (schema and every rule); writes nothing", _validate_arguments),
    "explain": ("every resolved value, where it came from and why", _explain_arguments),
    "plan": ("rank the valid layouts: per-device memory breakdown, predicted speed, why", _plan_arguments),
    "diff": ("what differs between two recipes or build directories: every resolved value (with both sources) "
             "and every file; exit 1 when they differ, 0 when equal", _diff_arguments),
    "schema": ("print a JSON Schema", _schema_arguments),
    "preflight": ("check a node before launch (run by the node scripts)", _preflight_arguments),
}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given a `command` it knows, only that subcommand's parser is made: each one
    argparse creates costs about as much as parsing (a `dpoc build` need not make the other twelve); `dpoc
    --help` and a mistyped command get them all."""
    parser = argparse.ArgumentParser(prog="dpoc", description="Compile and launch DPO training jobs "
                                     "(megatron-core / MindSpeed-RL on Ascend Atlas A2/A3).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments) in COMMANDS.items():
        if command not in COMMANDS or command == name:
            add_arguments(sub.add_parser(name, help=help_text))
    if command not in COMMANDS:
        for name, (module, help_text) in EXTERNAL.items():
            p = sub.add_parser(name, help=help_text)
            p.set_defaults(external=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL:  # these own their arguments
        module = importlib.import_module(EXTERNAL[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"dpoc {argv[0]}", description=EXTERNAL[argv[0]][1])
        module.add_arguments(sub)
        return _run(lambda: module.run(sub.parse_args(argv[1:])))
    args = _parser(argv[0] if argv else None).parse_args(argv)
    return _run(lambda: args.func(args))


def _run(call) -> int:
    try:
        return call()
    except DpocError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
