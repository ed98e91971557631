"""JUnit XML: the one writer (junit-xml) and the one reader (junitparser) of every report kernel-ci reads.

Written: the run's merged report (`write`, one <testsuite> per suite, boot first, properties on each).
Read: pytest's junit.xml from the guest (untrusted: the caller caps its size), a run's own report for
`kernel-ci summary`, and the reports the cache service shows. All go through `parse`, which refuses a
DTD or entity declaration before any parsing (neither pytest nor junit-xml writes one, and entities are
how XML pulls in other files or expands a few bytes into gigabytes).
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree
from xml.etree.ElementTree import ParseError

from junit_xml import TestCase as JunitCase
from junit_xml import TestSuite as JunitSuite
from junit_xml import to_xml_report_string
from junitparser import Error as ParsedError
from junitparser import Failure as ParsedFailure
from junitparser import JUnitXml, JUnitXmlError, SystemErr, SystemOut
from junitparser import Skipped as ParsedSkipped
from junitparser import TestCase as ParsedCase
from junitparser import TestSuite as ParsedSuite

from kernel_ci.core.errors import UsageError
from kernel_ci.core.files import write_text_atomic
from kernel_ci.report.model import Case, CaseState, Outcome, RunRecord, RunReport, SuiteResult


class JunitError(UsageError, ValueError):
    """Not a JUnit report: missing, not XML, another root element, or a DTD refused."""


# --- writing ---------------------------------------------------------------------------------------------


def to_junit(report: RunReport) -> str:
    """The merged JUnit XML: one <testsuite> per suite (boot first), properties on each."""
    suites = []
    for suite in report.suites:
        cases = []
        for case in suite.cases:
            junit_case = JunitCase(
                case.name,
                classname=case.classname,
                elapsed_sec=case.seconds,
                stdout=case.output or None,
                stderr=case.stderr or None,
            )
            if case.state == "failed":
                junit_case.add_failure_info(
                    message=case.message, output=case.detail or None, failure_type="failure"
                )
            elif case.state == "error":
                junit_case.add_error_info(
                    message=case.message, output=case.detail or None, error_type="error"
                )
            elif case.state == "skipped":
                junit_case.add_skipped_info(message=case.message)
            cases.append(junit_case)
        suites.append(
            JunitSuite(
                suite.name,
                cases,
                properties=dict(suite.properties),
                stdout=suite.output or None,
                stderr=suite.errors or None,
            )
        )
    text = to_xml_report_string(suites, prettyprint=True, encoding="utf-8")
    return _with_case_properties(text, report)


def _with_case_properties(text: str, report: RunReport) -> str:
    """Add <properties> to the testcases that have them (the explanation of a failure, report.compare).

    junit-xml has no testcase properties, though JUnit readers (and junitparser) know the element; the
    document is ours, so it is re-read with ElementTree and the elements put first in their testcase."""
    wanted = [[case.properties for case in suite.cases] for suite in report.suites]
    if not any(props for suite in wanted for props in suite):
        return text
    root = ElementTree.fromstring(text.encode("utf-8"))
    for element, props_of_cases in zip(root.iter("testsuite"), wanted, strict=True):
        for testcase, props in zip(element.iter("testcase"), props_of_cases, strict=True):
            if not props:
                continue
            holder = ElementTree.Element("properties")
            for name, value in props.items():
                ElementTree.SubElement(holder, "property", name=name, value=value)
            testcase.insert(0, holder)
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def write_junit(report: RunReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, to_junit(report))  # a reader never sees half a report


# --- reading ---------------------------------------------------------------------------------------------


def parse(data: bytes, where: str = "the JUnit report") -> list[SuiteResult]:
    """The suites of a JUnit document (<testsuites> or a single <testsuite>), in document order.

    A failed or errored case gets Outcome.TEST_FAILURE (what a failure means for a run); the run's own
    outcome is not in JUnit (see RunRecord)."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise JunitError(f"{where} has a <!DOCTYPE>/<!ENTITY> declaration: refused")
    try:
        xml = JUnitXml.fromstring(data)
    except ParseError as exc:
        raise JunitError(f"{where} is not valid XML: {exc}") from exc
    except JUnitXmlError as exc:
        raise JunitError(f"{where} is not a JUnit report (root element is not <testsuites>)") from exc
    parsed: list[ParsedSuite] = [xml] if isinstance(xml, ParsedSuite) else list(xml)
    return [_suite(testsuite) for testsuite in parsed]


def _suite(testsuite: ParsedSuite) -> SuiteResult:
    properties: dict[str, str] = {}
    for prop in testsuite.properties():
        properties.setdefault(prop.name or "", prop.value or "")
    return SuiteResult(
        testsuite.name or "(unnamed)",
        [_case(testcase) for testcase in testsuite],
        properties,
        output=_text(testsuite, SystemOut),
        errors=_text(testsuite, SystemErr),
        seconds=testsuite.time,
    )


def _text(testsuite: ParsedSuite, kind: type[SystemOut] | type[SystemErr]) -> str:
    found = testsuite.child(kind)
    return (found.text or "") if found is not None else ""


def _case(testcase: ParsedCase) -> Case:
    case = Case(
        testcase.name or "",
        testcase.classname or "",
        "passed",
        seconds=testcase.time,
        output=testcase.system_out or "",
        stderr=testcase.system_err or "",
    )
    case.properties = _case_properties(testcase)
    for item in testcase.result:
        state: CaseState
        if isinstance(item, ParsedError):
            state = "error"
        elif isinstance(item, ParsedFailure) and case.state != "error":
            state = "failed"
        elif isinstance(item, ParsedSkipped) and case.state == "passed":
            state = "skipped"
        else:
            continue
        case.state = state
        case.outcome = Outcome.TEST_FAILURE if state in ("failed", "error") else Outcome.PASS
        case.message = item.message or ""
        case.detail = item.text or ""
    return case


def _case_properties(testcase: ParsedCase) -> dict[str, str]:
    """A testcase's <properties> (junitparser reads only a suite's): the first value of each name."""
    found: dict[str, str] = {}
    holder = testcase._elem.find("properties")  # junitparser keeps the element as _elem
    for prop in holder.iter("property") if holder is not None else ():
        found.setdefault(prop.get("name") or "", prop.get("value") or "")
    return found


def read_report(path: Path) -> RunReport:
    """A run's report read back from its JUnit file, with the outcome from its run.json when found."""
    path = Path(path)
    if not path.is_file():
        raise JunitError(f"no JUnit report at {path}: the run did not get as far as writing it")
    suites = parse(path.read_bytes(), str(path))
    for case in (case for suite in suites for case in suite.cases):
        case.name = case.name or "(unnamed)"
    record = RunRecord.beside(path)
    outcome = record.outcome_value() if record is not None else None
    return RunReport(outcome, suites)
