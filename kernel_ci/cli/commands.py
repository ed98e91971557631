"""The CI-facing subcommands of `kernel-ci`: key, matrix, summary, patches (registered by
kernel_ci/cli/main.py; the options they share with build and test are in kernel_ci/cli/options.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kernel_ci.cli import options
from kernel_ci.core.console import console


def cmd_key(args: argparse.Namespace) -> int:
    """The recipe key of the plan `kernel-ci build` with the same options makes (the same request, the same
    derivation: kernel_ci.build.plan), so that a CI cache keyed by it holds exactly that build."""
    from kernel_ci.build import recipe as recipekey
    from kernel_ci.flow.build import plan_request

    options.warn_suite_ignored(args)
    manifest = plan_request(options.build_request(args)).plan.recipe_inputs()
    key = recipekey.recipe_key(manifest)
    if args.json:
        print(json.dumps({"key": key, "inputs": manifest}, indent=1))
    else:
        print(key)
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from kernel_ci.cli import matrix

    argv = ["--file", str(args.file)] + (["--github-output"] if args.github_output else [])
    return matrix.main(argv)


def cmd_summary(args: argparse.Namespace) -> int:
    from kernel_ci.report import junit, render

    try:
        report = junit.read_report(args.junit)
    except junit.JunitError as exc:
        if not args.markdown:
            raise
        text = render.missing_markdown(exc, args.title)
        status = 1
    else:
        text = render.to_markdown(report, args.title) if args.markdown else ""
        status = 0 if report.ok or not args.strict else 1
        if not args.markdown:
            console.print(render.render_summary(report))
    if args.markdown:
        print(text, end="")
        target = os.environ.get("GITHUB_STEP_SUMMARY") if args.step_summary else None
        if args.step_summary and not target:
            console.print("[yellow]--step-summary given but GITHUB_STEP_SUMMARY is not set[/]")
        if target:
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")
    return status if args.strict else 0


def cmd_patches(args: argparse.Namespace) -> int:
    from kernel_ci.build import patchexport
    from kernel_ci.report import github as ghactions

    dest = args.dest or options.output(args) / "patches"
    project = options.project(args)
    result = patchexport.run(
        dest,
        series=args.series,
        kernel=args.kernel,
        check=not args.no_check,
        patches_root=project.kernel_patches,
    )
    for one in result.series:
        console.print(f"{one.name}: {len(one.patch_files)} patch(es), {one.mbox}")
    console.print(f"all series: {result.all_mbox}")
    if args.no_check:
        return 0
    for check in result.checks:
        console.print(check.describe())
    located = patchexport.finding_locations(result)
    if ghactions.in_github_actions():
        for where, line, finding in located:
            print(ghactions.annotation("error", finding, file=where, line=line, title="checkpatch"))
        sys.stdout.flush()
    if located:
        console.print(f"[bold red]checkpatch: {len(located)} finding(s)[/]; see {dest / 'checkpatch.txt'}")
        return 1
    console.print("[green]checkpatch: clean[/]")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    key = sub.add_parser(
        "key",
        help="print the recipe key of a build (its inputs as files; no Docker): for CI cache keys",
    )
    options.add_build_options(key)
    key.add_argument("--suite", action="append", help="deprecated, ignored: every build carries every suite")
    key.add_argument("--json", action="store_true", help="print the key and every input's digest")
    key.set_defaults(func=cmd_key)

    from kernel_ci.cli.matrix import MATRIX_FILE

    matrix = sub.add_parser("matrix", help="print the CI kernel matrix (kernel_ci/cli/matrix.toml) as JSON")
    matrix.add_argument("--file", type=Path, default=MATRIX_FILE)
    matrix.add_argument(
        "--github-output", action="store_true", help="also write matrix=<json> to $GITHUB_OUTPUT"
    )
    matrix.set_defaults(func=cmd_matrix)

    summary = sub.add_parser("summary", help="the summary table of a run, read from its JUnit file")
    summary.add_argument("junit", type=Path, help="e.g. out/junit.xml")
    summary.add_argument(
        "--markdown", action="store_true", help="Markdown on stdout (for $GITHUB_STEP_SUMMARY)"
    )
    summary.add_argument(
        "--step-summary", action="store_true", help="with --markdown: also append it to $GITHUB_STEP_SUMMARY"
    )
    summary.add_argument("--title", default="kernel-ci test", help="heading of the Markdown summary")
    summary.add_argument(
        "--strict", action="store_true", help="exit 1 when a test failed or the report is missing"
    )
    summary.set_defaults(func=cmd_summary)

    patches = sub.add_parser(
        "patches", help="export every series as .patch files and mboxes, then run checkpatch.pl over them"
    )
    patches.add_argument("--series", action="append", help="series to export (repeatable; default: all)")
    patches.add_argument("--kernel", help="whose checkpatch.pl to use (default: the lock file's default)")
    patches.add_argument("--dest", type=Path, help="output folder (default: <output>/patches)")
    patches.add_argument("--no-check", action="store_true", help="export only; skip checkpatch")
    patches.set_defaults(func=cmd_patches)
