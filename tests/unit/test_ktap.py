"""The KTAP reader against the spec's own examples, KUnit's and kselftest's real output shapes."""

from __future__ import annotations

from kernel_ci.report.ktap import KtapParser, flatten, parse, strip_prefix

SPEC_EXAMPLE = """\
KTAP version 1
1..1
  KTAP version 1
  1..3
    KTAP version 1
    1..1
    # test_1: initializing test_1
    ok 1 test_1
  ok 1 example_test_1
    KTAP version 1
    1..2
    ok 1 test_1 # SKIP test_1 skipped
    ok 2 test_2
  ok 2 example_test_2
    KTAP version 1
    1..3
    ok 1 test_1
    # test_2: FAIL
    not ok 2 test_2
    ok 3 test_3 # SKIP test_3 skipped
  not ok 3 example_test_3
not ok 1 main_test
"""


def test_spec_example_hierarchy():
    report = parse(SPEC_EXAMPLE)
    assert report.found_ktap
    assert report.errors == []
    assert report.plan == 1
    (main,) = report.tests
    assert (main.name, main.status, main.number) == ("main_test", "fail", 1)
    assert [t.name for t in main.subtests] == ["example_test_1", "example_test_2", "example_test_3"]
    assert [t.status for t in main.subtests] == ["ok", "ok", "fail"]
    ex1, ex2, ex3 = main.subtests
    assert ex1.subtests[0].output == "# test_1: initializing test_1"
    assert [(t.name, t.status, t.reason) for t in ex2.subtests] == [
        ("test_1", "skip", "test_1 skipped"),
        ("test_2", "ok", ""),
    ]
    assert ex3.subtests[1].status == "fail"
    assert ex3.subtests[1].output == "# test_2: FAIL"
    assert ex3.subtests[2].status == "skip"


def test_flatten_dotted_leaves():
    names = {name: test.status for name, test in flatten(parse(SPEC_EXAMPLE).tests)}
    assert names == {
        "main_test.example_test_1.test_1": "ok",
        "main_test.example_test_2.test_1": "skip",
        "main_test.example_test_2.test_2": "ok",
        "main_test.example_test_3.test_1": "ok",
        "main_test.example_test_3.test_2": "fail",
        "main_test.example_test_3.test_3": "skip",
    }


def test_flatten_keeps_a_parent_that_failed_on_its_own():
    report = parse("KTAP version 1\n1..1\n    KTAP version 1\n    1..1\n    ok 1 inner\nnot ok 1 outer\n")
    assert [(name, t.status) for name, t in flatten(report.tests)] == [
        ("outer.inner", "ok"),
        ("outer", "fail"),
    ]


def test_spec_two_space_nesting_with_diag_for_parent():
    text = (
        "KTAP version 1\n1..1\n  KTAP version 1\n  1..2\n  ok 1 test_1\n  not ok 2 test_2\n"
        "# example failed\nnot ok 1 example\n"
    )
    report = parse(text)
    (example,) = report.tests
    assert example.status == "fail"
    assert example.output == "# example failed"
    assert [t.status for t in example.subtests] == ["ok", "fail"]


def test_directives_case_insensitive_and_todo():
    text = """\
TAP version 14
1..6
ok 1 - plain
not ok 2 - broken # TODO not implemented yet
ok 3 - lower # skip no hardware
not ok 4 - skipped anyway # Skip missing CONFIG_FOO
not ok 5 - slow # TIMEOUT 30 seconds
ok 6 check return code # rcode=0
"""
    report = parse(text)
    got = [(t.number, t.name, t.status, t.reason) for t in report.tests]
    assert got == [
        (1, "plain", "ok", ""),
        (2, "broken", "todo", "not implemented yet"),
        (3, "lower", "skip", "no hardware"),
        (4, "skipped anyway", "skip", "missing CONFIG_FOO"),
        (5, "slow", "error", "30 seconds"),
        (6, "check return code", "ok", "rcode=0"),
    ]
    assert report.errors == []


def test_kunit_5_10_subtest_header_four_spaces():
    text = """\
TAP version 14
1..2
    # Subtest: example
    1..3
    # example_simple_test: initializing
    ok 1 - example_simple_test
    ok 2 - example_skip_test # SKIP this test should be skipped
    # example_fail_test: EXPECTATION FAILED at lib/kunit/kunit-example-test.c:30
    not ok 3 - example_fail_test
not ok 1 - example
    # Subtest: list-kunit-test
    1..1
    ok 1 - list_test_list_init
ok 2 - list-kunit-test
"""
    report = parse(text)
    assert report.errors == []
    example, lists = report.tests
    assert (example.name, example.status) == ("example", "fail")
    assert [(t.name, t.status) for t in example.subtests] == [
        ("example_simple_test", "ok"),
        ("example_skip_test", "skip"),
        ("example_fail_test", "fail"),
    ]
    assert "EXPECTATION FAILED" in example.subtests[2].output
    assert lists.subtests[0].name == "list_test_list_init"


def test_kunit_new_style_params_nested_two_levels():
    text = """\
KTAP version 1
1..1
    KTAP version 1
    # Subtest: example
    # module: kunit_example_test
    1..2
    ok 1 example_simple_test
        KTAP version 1
        # Subtest: example_params_test
        ok 1 example value 3
        ok 2 example value 2 # SKIP unsupported
    # example_params_test: pass:1 fail:0 skip:1 total:2
    ok 2 example_params_test
# example: pass:2 fail:0 skip:0 total:2
# Totals: pass:3 fail:0 skip:1 total:4
ok 1 example
"""
    report = parse(text)
    assert report.errors == []
    (example,) = report.tests
    params = example.subtests[1]
    assert params.name == "example_params_test"
    assert [t.status for t in params.subtests] == ["ok", "skip"]
    assert "pass:1 fail:0 skip:1" in params.output
    assert "# Totals: pass:3" in example.output


def test_kselftest_runner_output():
    text = """\
TAP version 13
1..3
# timeout set to 45
# selftests: timers: posix_timers
# TAP version 13
# 1..2
# Testing posix timers. False negative may happen on CPU execution
# ok 1 Passed for CPU itimer
# not ok 2 Passed for CPU timer # SKIP no CPU timers
# # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0
ok 1 selftests: timers: posix_timers
# timeout set to 45
# selftests: timers: nanosleep
# Nanosleep CLOCK_REALTIME      [FAILED]
not ok 2 selftests: timers: nanosleep # exit=1
# selftests: timers: rtcpie
# Warning: file rtcpie is missing!
ok 3 selftests: timers: rtcpie # SKIP
"""
    report = parse(text)
    assert report.errors == []
    posix, nanosleep, rtcpie = report.tests
    assert posix.name == "selftests: timers: posix_timers"
    assert posix.status == "ok"
    assert [(t.name, t.status, t.reason) for t in posix.subtests] == [
        ("Passed for CPU itimer", "ok", ""),
        ("Passed for CPU timer", "skip", "no CPU timers"),
    ]
    assert posix.subtests[0].output == "Testing posix timers. False negative may happen on CPU execution"
    assert "# Totals: pass:1" in posix.output
    assert (nanosleep.status, nanosleep.reason) == ("fail", "exit=1")
    assert "[FAILED]" in nanosleep.output
    assert rtcpie.status == "skip"


def test_missing_tests_against_plan_are_errors():
    report = parse("KTAP version 1\n1..4\nok 1 a\nok 2 b\n")
    assert report.plan == 4
    assert len(report.tests) == 2
    assert report.missing() == 2
    assert any("plan 1..4 but 2 results" in error for error in report.errors)


def test_interrupted_subtest_block_becomes_an_errored_test():
    text = """\
KTAP version 1
1..3
ok 1 first
    KTAP version 1
    # Subtest: crash
    ok 1 armed
    # writing to /proc/ci-smoke
"""
    report = parse(text)
    first, crash = report.tests
    assert first.status == "ok"
    assert (crash.name, crash.status, crash.number) == ("crash", "error", 2)
    assert [t.name for t in crash.subtests] == ["armed"]
    assert "# writing to /proc/ci-smoke" in crash.output
    assert report.missing() == 1
    assert any("no result line for test 2 (crash)" in error for error in report.errors)


def test_garbage_is_tolerated_and_kept_as_output():
    text = """\
starting up
KTAP version 1
1..2
random noise from the program
ok 1 first
Segfault handler says hi
[  12.000] kernel: something
not ok 2 second
goodbye
"""
    report = parse(text)
    assert report.errors == []
    assert [t.status for t in report.tests] == ["ok", "fail"]
    assert "random noise" in report.tests[0].output
    assert "starting up" in report.tests[0].output
    assert "Segfault handler says hi" in report.tests[1].output
    assert report.trailing == "goodbye"


def test_no_ktap_at_all():
    report = parse("Segmentation fault\nsome text\nok\n")
    assert report.found_ktap is False
    assert report.tests == []
    assert "Segmentation fault" in report.trailing


def test_empty_stream_has_no_ktap():
    assert parse("").found_ktap is False


def test_plain_tap_without_version_is_accepted():
    report = parse("1..2\nok 1 a\nnot ok 2 b\n")
    assert report.found_ktap
    assert [t.status for t in report.tests] == ["ok", "fail"]


def test_out_of_order_numbers_are_reported():
    report = parse("KTAP version 1\n1..2\nok 1 a\nok 3 c\n")
    assert any("result number 3 where 2 was expected" in error for error in report.errors)


def test_result_time_diagnostic_sets_seconds():
    report = parse("KTAP version 1\n1..2\nok 1 a # time=250ms\nok 2 b # time=1.5s\n")
    assert [t.seconds for t in report.tests] == [0.25, 1.5]


def test_names_with_hash_inside_words_and_empty_description():
    report = parse("KTAP version 1\n1..2\nok 1 test#1 passes\nok 2 # SKIP nothing to do\n")
    assert report.tests[0].name == "test#1 passes"
    assert (report.tests[1].name, report.tests[1].status) == ("", "skip")


def test_incremental_feed_matches_whole_parse():
    parser = KtapParser()
    for line in SPEC_EXAMPLE.splitlines(keepends=True):
        parser.feed(line)
    assert parser.finish() == parse(SPEC_EXAMPLE)


def test_strip_prefix_reads_the_console_copy():
    console = """\
[    1.000000] kci_smoke: loaded
KCI-SUITE-START: smoke-c
[smoke-c] KTAP version 1
[smoke-c] 1..1
[    1.100000] random kernel line
[smoke-c] ok 1 only
[smoke-py] ok 1 other
"""
    text = strip_prefix(console, "[smoke-c] ")
    assert text == "KTAP version 1\n1..1\nok 1 only"
    assert [t.name for t in parse(text).tests] == ["only"]
