"""`kernel-ci bisect` and the exit codes `git bisect run` reads (mapped in core.errors, applied here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kernel_ci.core.console import console
from kernel_ci.core.errors import ExitCode, UsageError, bisect_exit_code, bisect_verdict


def bisect_reason(args: argparse.Namespace) -> str | None:
    """Why this run answers in git bisect's exit codes (None: it does not)."""
    if getattr(args, "bisect", False):
        return "--bisect"
    tree = getattr(args, "tree", None)
    if tree is not None and getattr(args, "command", None) in ("build", "test"):
        from kernel_ci.build import tree as usertree

        if usertree.bisecting(tree):
            return f"{tree} is in a git bisect (BISECT_START)"
    return None


def bisect_exit(args: argparse.Namespace, code: int) -> int:
    """code, or its git bisect meaning when under bisect, said on the console either way."""
    reason = bisect_reason(args)
    if reason is None:
        return code
    mapped = bisect_exit_code(code)
    name = ExitCode(code).name if code in ExitCode._value2member_map_ else str(code)
    console.print(f"bisect mode ({reason}): {name} -> exit {mapped} ({bisect_verdict(mapped)})")
    return mapped


def cmd_bisect(args: argparse.Namespace) -> int:
    from kernel_ci.flow import bisect as flow

    if "--tree" in args.test_args or "--kernel" in args.test_args:
        raise UsageError(
            "kernel-ci bisect: give --tree before GOOD BAD (the tree bisected is the one tested)"
        )
    result = flow.bisect(args.tree, args.good, args.bad, args.output, args.test_args)
    console.print(result.log)
    console.print(f"[bold]{flow.summary(result)}[/]")
    return 0 if result.first_bad else int(ExitCode.TEST_FAILURE)


def register(sub: argparse._SubParsersAction) -> None:
    bisect = sub.add_parser(
        "bisect",
        help="the first bad commit of --tree between GOOD and BAD, by `git bisect run kernel-ci test`",
    )
    bisect.add_argument("--tree", type=Path, default=Path("."), help="the git tree to bisect (default: .)")
    bisect.add_argument("good", help="a commit where the test passes")
    bisect.add_argument("bad", help="a commit where it fails")
    bisect.add_argument(
        "test_args", nargs=argparse.REMAINDER, help="options of `kernel-ci test` (e.g. --suite smoke-c)"
    )
    bisect.set_defaults(func=cmd_bisect)
