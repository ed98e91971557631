"""Read KTAP (and TAP 13/14, kselftest) test output into a tree of test results.

Follows Documentation/dev-tools/ktap.rst: a version line, an optional plan `1..N`, result lines
`ok|not ok N [- ]name [# DIRECTIVE data]`, diagnostic lines `# ...` and nested subtests. Nesting is
recognised three ways, mixed freely:

- indentation (any width, KTAP's two spaces or KUnit's four): a structural line (version, plan,
  `# Subtest:`, result) indented deeper than the current level opens a subtest block;
- KUnit's `# Subtest: name` header, which names the block;
- kselftest's runner prefix: every line of a nested program is prefixed with `# `, so a
  `# TAP version 13` line opens a block whose lines are the `# `-prefixed ones.

A block belongs to the next result line at its parent's level. Diagnostic and unknown lines belong
to the next result line of the level they are on (they are kept as that test's output); lines with
no result line after them end up in `KtapReport.trailing`. Unknown lines never change a status.

The text comes from the guest, which may be hostile: nesting is bounded (MAX_DEPTH; deeper structural
lines are kept as plain output and `too_deep` is set), as are the results and parse errors kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["ok", "fail", "skip", "todo", "error"]

MAX_DEPTH = 64  # nested blocks; real KTAP (KUnit, kselftest) nests 2-3 deep
MAX_TESTS = 20_000  # result lines kept, all levels together
MAX_ERRORS = 200  # parse errors kept (one more says how many were dropped)

_VERSION = re.compile(r"^(?:KTAP version \d+|TAP version \d+)$")
_PLAN = re.compile(r"^1\.\.(\d+)(?:\s*#\s*(.*))?$")
_RESULT = re.compile(r"^(ok|not ok)\b(?:\s+(\d+)\b)?(.*)$")
_STRICT_RESULT = re.compile(r"^(?:ok|not ok) \d+\b")
_SUBTEST = re.compile(r"^#\s*Subtest:\s*(.*?)\s*$")
_HASH_PREFIX = re.compile(r"^\s*#(?: |$)")
_DIRECTIVE = re.compile(r"^(skip|todo|xfail|timeout|error)\S*\s*(.*)$", re.IGNORECASE)
_TIME = re.compile(r"\btime=(\d+(?:\.\d+)?)(ms|s)?\b")
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[CT]\d+\])? ?")

_DIRECTIVE_STATUS: dict[str, Status] = {
    "skip": "skip",
    "todo": "todo",
    "xfail": "todo",
    "timeout": "error",
    "error": "error",
}


@dataclass
class KtapTest:
    """One result line (and its nested subtests). `reason` is the directive's or result's diagnostic data.

    incomplete: no result line came for this test (its block was opened, then the output ended or moved
    on); such a test has status "error".
    """

    name: str
    status: Status
    number: int
    output: str = ""
    subtests: list[KtapTest] = field(default_factory=list)
    seconds: float | None = None
    reason: str = ""
    incomplete: bool = False


@dataclass
class KtapReport:
    """The top-level tests. found_ktap is False when the stream had no KTAP at all ("no KTAP output")."""

    tests: list[KtapTest]
    plan: int | None
    errors: list[str]
    found_ktap: bool
    trailing: str = ""
    too_deep: bool = False  # nesting went past MAX_DEPTH: the deeper lines are output, not results

    def missing(self) -> int:
        """How many top-level tests the plan announced but no result line reported."""
        return max(0, (self.plan or 0) - len(self.tests))


@dataclass
class _Frame:
    indent: int
    hashed: bool
    name: str | None = None
    plan: int | None = None
    tests: list[KtapTest] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return self.plan is None and not self.tests


@dataclass
class _Result:
    number: int | None
    name: str
    status: Status
    reason: str
    seconds: float | None


def _parse_result(body: str) -> _Result | None:
    match = _RESULT.match(body)
    if match is None:
        return None
    rest = match.group(3)
    if rest and not rest[0].isspace():
        return None  # "ok:", "ok1": not a result line
    rest = rest.strip()
    if rest.startswith("#"):
        name, directive = "", rest[1:]
    else:
        split = re.search(r"\s#", rest)
        name, directive = (rest[: split.start()], rest[split.end() :]) if split else (rest, "")
    name = name.strip()
    if name == "-" or name.startswith("- "):
        name = name[1:].strip()
    directive = directive.strip()
    status: Status = "ok" if match.group(1) == "ok" else "fail"
    reason = directive
    word = _DIRECTIVE.match(directive)
    if word is not None:
        status = _DIRECTIVE_STATUS[word.group(1).lower()]
        reason = word.group(2).strip()
    seconds = None
    timing = _TIME.search(directive)
    if timing is not None:
        seconds = float(timing.group(1)) / (1000.0 if timing.group(2) == "ms" else 1.0)
    number = int(match.group(2)) if match.group(2) else None
    return _Result(number, name, status, reason, seconds)


def _width(text: str) -> int:
    return len(text) - len(text.lstrip(" \t"))


def _dedent(text: str, indent: int) -> str:
    return text[min(indent, _width(text)) :]


class KtapParser:
    """Incremental KTAP reader: feed() lines, then finish() for the report."""

    def __init__(self) -> None:
        self._stack: list[_Frame] = [_Frame(indent=0, hashed=False)]
        self._started = False
        self._errors: list[str] = []
        self._dropped_errors = 0
        self._too_deep = False
        self._results = 0
        self._dropped_results = 0

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        depth, content = self._route(line)
        frame = self._stack[depth]
        hashed = _HASH_PREFIX.match(content)
        if self._started and hashed is not None and _VERSION.match(content[hashed.end() :].strip()):
            if not self._nests_too_deep(depth, content):
                self._close_to(depth)
                self._stack.append(_Frame(indent=_width(content[hashed.end() :]), hashed=True))
            return
        body = content.strip()
        width = _width(content)
        if not self._started:
            self._maybe_start(line, body, width)
            return
        if _VERSION.match(body):
            self._on_version(depth, width, content)
        elif (sub := _SUBTEST.match(body)) is not None:
            self._on_subtest(depth, width, sub.group(1), content)
        elif (plan := _PLAN.match(body)) is not None:
            self._on_plan(depth, width, int(plan.group(1)), content)
        elif (result := _parse_result(body)) is not None:
            self._on_result(depth, width, result, content)
        else:
            frame.pending.append(_dedent(content, frame.indent))

    def feed_text(self, text: str) -> None:
        for line in text.splitlines():
            self.feed(line)

    def finish(self) -> KtapReport:
        while len(self._stack) > 1:
            self._close_incomplete()
        root = self._stack[0]
        self._check_plan(root, "top level")
        trailing = "\n".join(root.pending)
        if self._dropped_results:
            self._error(f"{self._dropped_results} result lines after the first {MAX_TESTS} ignored")
        errors = list(self._errors)
        if self._dropped_errors:
            errors.append(f"{self._dropped_errors} more parse errors not listed")
        return KtapReport(list(root.tests), root.plan, errors, self._started, trailing, self._too_deep)

    # -- bounds --------------------------------------------------------------------------------------

    def _error(self, message: str) -> None:
        if len(self._errors) < MAX_ERRORS:
            self._errors.append(message)
        else:
            self._dropped_errors += 1

    def _nests_too_deep(self, depth: int, content: str) -> bool:
        """A block under depth would pass MAX_DEPTH: keep the line as output of the deepest block."""
        if depth + 1 <= MAX_DEPTH:
            return False
        if not self._too_deep:
            self._too_deep = True
            self._error(
                f"{self._where()}: nested deeper than {MAX_DEPTH} levels; deeper lines kept as output"
            )
        frame = self._stack[depth]
        frame.pending.append(_dedent(content, frame.indent))
        return True

    # -- routing -------------------------------------------------------------------------------------

    def _route(self, line: str) -> tuple[int, str]:
        """The deepest open block this line belongs to, and the line with that block's prefixes removed."""
        content = line
        width = _width(content)  # once per prefix removed, not per level: a line can be long
        blank = not content.strip()
        depth = 0
        for index in range(1, len(self._stack)):
            frame = self._stack[index]
            if frame.hashed:
                prefix = _HASH_PREFIX.match(content)
                if prefix is None:
                    break
                content = content[prefix.end() :]
                width = _width(content)
                blank = not content.strip()
            elif width < frame.indent or blank:
                break
            depth = index
        return depth, content

    def _maybe_start(self, line: str, body: str, width: int) -> None:
        root = self._stack[0]
        if _VERSION.match(body):
            self._started = True
            root.indent = width
        elif width == 0 and (_PLAN.match(body) or _STRICT_RESULT.match(body)):
            self._started = True
            self.feed(line)
        else:
            root.pending.append(line)

    # -- structural lines ----------------------------------------------------------------------------

    def _on_version(self, depth: int, width: int, content: str) -> None:
        frame = self._stack[depth]
        if width > frame.indent:
            if not self._nests_too_deep(depth, content):
                self._open(depth, _Frame(indent=width, hashed=False))
        elif depth > 0 and not frame.empty():
            self._restart_block(frame)
        elif depth == 0 and not frame.empty():
            self._error("unexpected version line after the tests started")

    def _on_subtest(self, depth: int, width: int, name: str, content: str) -> None:
        frame = self._stack[depth]
        if depth > 0 and width == frame.indent and frame.name is None and frame.empty():
            frame.name = name
        elif width > frame.indent:
            if not self._nests_too_deep(depth, content):
                self._open(depth, _Frame(indent=width, hashed=False, name=name))
        elif depth > 0 and not frame.empty():
            self._restart_block(frame).name = name
        else:
            frame.pending.append(_dedent(content, frame.indent))

    def _on_plan(self, depth: int, width: int, count: int, content: str) -> None:
        frame = self._stack[depth]
        if width > frame.indent:
            if self._nests_too_deep(depth, content):
                return
            frame = self._open(depth, _Frame(indent=width, hashed=False))
        if frame.plan is None:
            frame.plan = count
        else:
            self._error(f"{self._where()}: second plan line 1..{count} ignored")

    def _on_result(self, depth: int, width: int, result: _Result, content: str) -> None:
        if self._results >= MAX_TESTS:
            self._dropped_results += 1
            return
        self._results += 1
        if width > self._stack[depth].indent:
            if self._nests_too_deep(depth, content):
                return
            # A result deeper than its level with no header: an implicit block, which adopts any
            # still deeper block as the subtests of this result.
            depth += 1
            self._stack.insert(depth, _Frame(indent=width, hashed=False))
        frame = self._stack[depth]
        subtests: list[KtapTest] = []
        output = list(frame.pending)
        if len(self._stack) > depth + 1:
            self._close_to(depth + 1)
            child = self._stack.pop()
            subtests = child.tests
            output += child.pending
            self._check_plan(child, result.name or f"test {len(frame.tests) + 1}")
        expected = len(frame.tests) + 1
        number = result.number if result.number is not None else expected
        if number != expected:
            self._error(f"{self._where()}: result number {number} where {expected} was expected")
        frame.pending.clear()
        frame.tests.append(
            KtapTest(
                name=result.name,
                status=result.status,
                number=number,
                output="\n".join(output),
                subtests=subtests,
                seconds=result.seconds,
                reason=result.reason,
            )
        )

    # -- closing blocks ------------------------------------------------------------------------------

    def _open(self, depth: int, frame: _Frame) -> _Frame:
        """Open a block under the one at depth (closing any deeper block still open)."""
        self._close_to(depth)
        self._stack.append(frame)
        return frame

    def _restart_block(self, frame: _Frame) -> _Frame:
        """A new block starts at the level of an open one: that one's result line never came."""
        self._close_incomplete()
        fresh = _Frame(indent=frame.indent, hashed=frame.hashed)
        self._stack.append(fresh)
        return fresh

    def _close_to(self, depth: int) -> None:
        """Close every block deeper than depth as incomplete (their result lines never came)."""
        while len(self._stack) > depth + 1:
            self._close_incomplete()

    def _close_incomplete(self) -> None:
        """Pop the deepest block: its parent's result line is missing, so record an errored test."""
        child = self._stack.pop()
        parent = self._stack[-1]
        number = len(parent.tests) + 1
        name = child.name or f"test {number}"
        self._check_plan(child, name)
        self._error(f"{self._where()}: no result line for test {number} ({name})")
        parent.tests.append(
            KtapTest(
                name=name,
                status="error",
                number=number,
                output="\n".join(parent.pending + child.pending),
                subtests=child.tests,
                reason="no result line (output ended or was interrupted)",
                incomplete=True,
            )
        )
        parent.pending.clear()

    def _check_plan(self, frame: _Frame, name: str) -> None:
        if frame.plan is not None and len(frame.tests) != frame.plan:
            self._error(f"{name}: plan 1..{frame.plan} but {len(frame.tests)} results")

    def _where(self) -> str:
        names = [frame.name or "?" for frame in self._stack[1:]]
        return "/".join(["top level", *names])


def parse(text: str | Iterable[str]) -> KtapReport:
    """Parse a whole KTAP stream (a string or an iterable of lines)."""
    parser = KtapParser()
    if isinstance(text, str):
        parser.feed_text(text)
    else:
        for line in text:
            parser.feed(line)
    return parser.finish()


def strip_prefix(text: str, prefix: str) -> str:
    """Keep only the lines carrying prefix (e.g. `[smoke-c] ` on the console), with it removed.

    A kernel timestamp (`[    1.234567] `) in front of the prefix is tolerated and dropped.
    """
    kept = []
    for line in text.splitlines():
        line = line.rstrip("\r")
        if not line.startswith(prefix):
            line = _TIMESTAMP.sub("", line, count=1)
        if line.startswith(prefix):
            kept.append(line[len(prefix) :])
    return "\n".join(kept)


def flatten(tests: Iterable[KtapTest], sep: str = ".") -> Iterator[tuple[str, KtapTest]]:
    """The leaf tests with dotted names (`parent.child`).

    A parent is yielded as well when it never got its result line, or when it failed or errored on its
    own (none of its subtests did), so a failure is never lost; otherwise its subtests carry its status.
    """
    for test in tests:
        name = test.name or f"test {test.number}"
        if not test.subtests:
            yield name, test
            continue
        children = list(flatten(test.subtests, sep))
        for child_name, child in children:
            yield f"{name}{sep}{child_name}", child
        bad = {"fail", "error"}
        if test.incomplete or (test.status in bad and not any(child.status in bad for _, child in children)):
            yield name, test
