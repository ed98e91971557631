"""Check a JUnit file the way CI servers will read it: parsed back by junitparser, shaped like the common
JUnit schema (tests/unit/data/junit-shape.xsd, validated with xmlschema when it is installed, and by a
structural walk always)."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped

SCHEMA = Path(__file__).parent / "data" / "junit-shape.xsd"
OUTCOME_TAGS = {"failure", "error", "skipped"}


@dataclass(frozen=True)
class ReadCase:
    suite: str
    name: str
    classname: str
    state: str  # passed | failed | error | skipped
    message: str
    text: str
    system_out: str


def check_shape(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    for suite in root:
        assert suite.tag == "testsuite"
        assert suite.get("name")
        cases = [child for child in suite if child.tag == "testcase"]
        assert {child.tag for child in suite} <= {"properties", "testcase", "system-out", "system-err"}
        assert int(suite.get("tests", "-1")) == len(cases)
        for attribute, tag in (("failures", "failure"), ("errors", "error"), ("skipped", "skipped")):
            assert int(suite.get(attribute, "-1")) == sum(1 for c in cases if c.find(tag) is not None)
        for properties in suite.findall("properties"):
            for prop in properties:
                assert (
                    prop.tag == "property" and prop.get("name") is not None and prop.get("value") is not None
                )
        for case in cases:
            assert case.get("name")
            assert {child.tag for child in case} <= OUTCOME_TAGS | {"system-out", "system-err"}
            assert sum(1 for child in case if child.tag in OUTCOME_TAGS) <= 1
    if importlib.util.find_spec("xmlschema") is not None:
        import xmlschema

        xmlschema.XMLSchema(str(SCHEMA)).validate(str(path))


def read_back(path: Path) -> list[ReadCase]:
    """Every testcase as junitparser sees it."""
    check_shape(path)
    xml = JUnitXml.fromfile(str(path))
    cases = []
    for suite in xml:
        for case in suite:
            state, message, text = "passed", "", ""
            for result in case.result:
                if isinstance(result, Failure):
                    state = "failed"
                elif isinstance(result, Error):
                    state = "error"
                elif isinstance(result, Skipped):
                    state = "skipped"
                message, text = result.message or "", result.text or ""
            cases.append(
                ReadCase(suite.name, case.name, case.classname, state, message, text, case.system_out or "")
            )
    return cases


def suite_properties(path: Path, suite_name: str) -> dict[str, str]:
    xml = JUnitXml.fromfile(str(path))
    for suite in xml:
        if suite.name == suite_name:
            return {prop.name: prop.value for prop in suite.properties()}
    raise KeyError(suite_name)


def suite_text(path: Path, suite_name: str, tag: str = "system-out") -> str:
    """A testsuite's own <system-out> (or <system-err>) text."""
    root = ET.parse(path).getroot()
    for suite in root:
        if suite.get("name") == suite_name:
            node = suite.find(tag)
            return node.text or "" if node is not None else ""
    raise KeyError(suite_name)
