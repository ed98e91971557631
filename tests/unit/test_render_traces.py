"""The summaries of a failure whose detail is a decoded kernel oops: the frames (file:line) stay in view,
decodecode's listing of the Code: bytes is folded to one line (the JUnit keeps the whole text)."""

from __future__ import annotations

from rich.console import Console

from kernel_ci.report.model import Case, Outcome, RunReport, SuiteResult
from kernel_ci.report.render import fold_disassembly, render_problems, to_markdown

# The shape of decode_stacktrace.sh's output for a 5.10 oops in a module (as the oops e2e saw it), with
# the disassembly that decodecode appends for the Code: line.
FRAMES = [
    "BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "RIP: 0010:kci_panic_null_deref (/mod/kci_panic.c:42) kci_panic",
    "Call Trace:",
    "kci_panic_init (/mod/kci_panic.c:61) kci_panic",
    "do_one_initcall (init/main.c:1186 init/main.c:1203)",
    "do_init_module (kernel/module.c:3702)",
]
CODE = [
    "Code: 00 00 48 c7 c7 a0 10 00 a0 e8 2b 4d 0d e1 31 c0 <c7> 04 25 00 00 00 00 2a 00 00 00 c3",
    "All code",
    "========",
    *[f"  {n:x}:\t00 00                \tadd    %al,(%rax)" for n in range(0, 40, 2)],
    "  28:*\tc7 04 25 00 00 00 00 \tmovl   $0x2a,0x0\t\t<-- trapping instruction",
    "",
    "Code starting with the faulting instruction",
    "===========================================",
    *[f"  {n:x}:\tc7 04 25 00 00 00 00 \tmovl   $0x2a,0x0" for n in range(0, 30, 3)],
]
DETAIL = "\n".join([*FRAMES, *CODE, "---[ end trace 4d8a4b3c2e1f0a9b ]---"])


def _report() -> RunReport:
    case = Case(
        "oops", "kci-oops", "failed", message="kernel oops", detail=DETAIL, outcome=Outcome.TEST_FAILURE
    )
    return RunReport(Outcome.TEST_FAILURE, [SuiteResult("kci-oops", [case])])


def test_the_listing_folds_to_one_line_and_the_frames_stay() -> None:
    folded = fold_disassembly(DETAIL.splitlines())
    assert folded[: len(FRAMES)] == FRAMES
    assert CODE[0] in folded  # the Code: bytes themselves are one line: kept
    assert not any("add    %al" in line or "movl" in line or line.startswith("====") for line in folded)
    assert sum("disassembly" in line for line in folded) == 1
    assert folded[-1] == "---[ end trace 4d8a4b3c2e1f0a9b ]---"


def test_text_without_a_listing_is_unchanged() -> None:
    lines = ["assert 1 == 2", "  0: not an instruction listing", "========", "E   AssertionError"]
    assert fold_disassembly(lines) == lines


def test_the_terminal_panel_shows_the_frames_of_a_long_decoded_oops() -> None:
    console = Console(width=200, record=True)
    for panel in render_problems(_report(), max_lines=12):
        console.print(panel)
    text = console.export_text()
    assert "kci_panic.c:42" in text and "init/main.c:1186" in text
    assert "trapping instruction" not in text


def test_the_markdown_summary_shows_the_frames_of_a_long_decoded_oops() -> None:
    text = to_markdown(_report())
    assert "kci_panic.c:42" in text and "kernel/module.c:3702" in text
    assert "trapping instruction" not in text
