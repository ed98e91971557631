"""`kernel-ci attribute <run dir>` and `kernel-ci test --attribute`: explain a red run (flow/attribute.py).

Only the argument parsing, the exit code and the printing live here: retries, baseline and attribution
are flow.attribute's, the classification report.compare's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kernel_ci.cli import options
from kernel_ci.core.console import console, warn
from kernel_ci.core.errors import ExitCode, KernelCIError, UsageError

if TYPE_CHECKING:
    from kernel_ci.flow.attribute import Explained


def add_options(parser: argparse.ArgumentParser, *, on_test: bool) -> None:
    group = parser.add_argument_group("explaining failures")
    if on_test:
        group.add_argument(
            "--attribute",
            action="store_true",
            help="when tests fail: retry them, run the baseline, and name the patch that broke each",
        )
    group.add_argument(
        "--retries", type=int, default=2, help="reruns of the failing suites in fresh guests (default 2)"
    )
    group.add_argument(
        "--fail-on-preexisting",
        action="store_true",
        help="exit 1 also for failures the kernel without the series has too",
    )
    group.add_argument("--no-baseline", action="store_true", help="do not run the kernel without the series")
    group.add_argument(
        "--base",
        metavar="REV",
        help="a --tree run without series: the commit whose kernel is the baseline (default: the merge-base "
        "of HEAD with the branch's upstream; none: no baseline). With series, the baseline is the tree "
        "without them",
    )
    group.add_argument(
        "--branch",
        default=os.environ.get("GITHUB_HEAD_REF") or os.environ.get("GITHUB_REF_NAME") or None,
        help="upload the results to this branch's test history on the cache service (default in CI: "
        "the workflow's branch)",
    )


def check(args: argparse.Namespace) -> None:
    if not 0 <= args.retries <= 10:
        raise UsageError(f"--retries {args.retries}: give 0 to 10 reruns")


def explain_run(args: argparse.Namespace, run_dir: Path, outcome: int) -> int:
    """Explain the run in run_dir; the exit code the explanation gives when the run only failed tests."""
    from kernel_ci.cache.remote import open_store
    from kernel_ci.flow.attribute import explain
    from kernel_ci.report import github, render

    settings = options.settings(args)
    store = open_store(settings)
    explained = explain(
        run_dir,
        retries=args.retries,
        use_baseline=not args.no_baseline,
        store=store,
        ccache_remote=settings.ccache_remote,
        base=args.base,
    )
    console.print(render.render_explanation(explained.comparison, explained.cost.render()))
    history = _push_history(args, run_dir, explained, store)
    if github.in_github_actions():
        for line in github.finding_annotations(explained.comparison):
            print(line, flush=True)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(render.explanation_markdown(explained.comparison, history))
    if outcome != ExitCode.TEST_FAILURE:  # a crash, hang or broken host says more than any test
        return outcome
    return int(explained.comparison.exit_code(args.fail_on_preexisting))


def _push_history(args: argparse.Namespace, run_dir: Path, explained: Explained, store: object) -> str | None:
    """The run's results to its branch's history on the service; the link to the first failing test's
    history page (None without a branch or a service to write to)."""
    from kernel_ci.cache.history import page_url
    from kernel_ci.flow.attribute import history_upload, push_history

    if not args.branch:
        return None
    upload = history_upload(explained.report, explained.comparison, args.branch, run_dir.name)
    try:
        base = push_history(store, upload)
    except KernelCIError as exc:  # the history is extra: a service that refuses it never fails the run
        warn(f"test history not uploaded: {exc}")
        return None
    if base is None or not explained.comparison.findings:
        return None
    link = page_url(base, args.branch, explained.comparison.findings[0].test)
    console.print(f"test history: {link}")
    return link


def after_test(args: argparse.Namespace, outcome: int) -> int:
    """`kernel-ci test --attribute`: explain the run just made when its tests failed."""
    if not getattr(args, "attribute", False) or outcome != ExitCode.TEST_FAILURE:
        return outcome
    return explain_run(args, (args.output / "latest").resolve(), outcome)


def cmd_attribute(args: argparse.Namespace) -> int:
    from kernel_ci.report.model import RunRecord

    options.check_run_dir(args.run_dir)
    check(args)
    record = RunRecord.read(args.run_dir)
    outcome = record.exit_code if record.exit_code is not None else int(ExitCode.TEST_FAILURE)
    return explain_run(args, args.run_dir, outcome)


def register(sub: argparse._SubParsersAction) -> None:
    attribute = sub.add_parser(
        "attribute",
        help="explain a failed run: retry (flaky?), baseline (pre-existing?), the patch that broke each test",
    )
    attribute.add_argument("run_dir", type=Path)
    add_options(attribute, on_test=False)
    attribute.set_defaults(func=cmd_attribute)
