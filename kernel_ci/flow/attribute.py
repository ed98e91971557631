"""Explaining a red run: which patch broke each failing test, is it flaky, was it already broken.

Three looks, each a real build (a build-cache entry: a second look costs boots, not builds) and real boots
of only the failing suites:

- retries: the failing suites again in fresh guests, `retries` times; a test that passes once is flaky;
- baseline: every suite of the run on the kernel without the series (series "none", same version); a
  failure it has too is pre-existing, a test it has and the run lacks vanished, one it lacks is new;
- attribution: the series' prefixes (BuildPlan.prefix: the base, patch 1, 1..2, ...), walked when the
  series is short and bisected when it is long, naming for each regression the first patch after which
  it fails.

The search (first_failures) takes the probe as a function, so its walk/bisect rules are tested on data; the
probes used by `kernel-ci attribute` build and boot for real.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kernel_ci.build.records import BuildMetadata
from kernel_ci.cache.history import HistoryUpload, TestResult
from kernel_ci.cache.remote import RemoteCacheError, RemoteStore
from kernel_ci.cache.store import BuildStore
from kernel_ci.core.console import step, warn
from kernel_ci.core.files import write_text_atomic
from kernel_ci.core.paths import cache_dir
from kernel_ci.flow import build as buildflow
from kernel_ci.flow import test as testflow
from kernel_ci.guest.suites import SuiteRoots
from kernel_ci.report import compare
from kernel_ci.report.junit import parse as parse_junit
from kernel_ci.report.junit import read_report, write_junit
from kernel_ci.report.model import RunRecord, RunReport

WALK_MAX = 4  # up to this many patches the prefixes are walked in order; beyond, bisected
DEFAULT_RETRIES = 2
Probe = Callable[[int], set[str]]  # prefix length -> the tests failing on that prefix


@dataclass
class Cost:
    """What explaining a run cost: for the closing note and the summary."""

    builds: int = 0  # builds that compiled (not cache hits)
    cache_hits: int = 0
    boots: int = 0
    seconds: float = 0.0

    def render(self) -> str:
        return (
            f"{self.boots} boot(s), {self.builds} build(s) compiled, {self.cache_hits} cache hit(s), "
            f"{self.seconds:.0f} s"
        )


def first_failures(count: int, tests: set[str], probe: Probe, walk_max: int = WALK_MAX) -> dict[str, int]:
    """For each test failing with all count patches: the smallest prefix length at which it fails.

    0 means it fails without any patch of the series. A test is assumed to keep failing once a patch broke
    it (as git bisect assumes); the probe of each prefix runs at most once (memoised)."""
    seen: dict[int, set[str]] = {count: set(tests)}

    def fails(length: int) -> set[str]:
        if length not in seen:
            seen[length] = probe(length)
        return seen[length]

    if count <= walk_max:
        found: dict[str, int] = {}
        for length in range(count + 1):
            for name in sorted(tests - set(found)):
                if name in fails(length):
                    found[name] = length
            if len(found) == len(tests):
                break
        return found
    return {name: _bisect(count, name, fails) for name in sorted(tests)}


def _bisect(count: int, name: str, fails: Callable[[int], set[str]]) -> int:
    low, high = -1, count  # fails at high; at low (-1 = "before the base") it is taken to pass
    while high - low > 1:
        middle = (low + high) // 2
        if name in fails(middle):
            high = middle
        else:
            low = middle
    return high


def blame(patch_names: Sequence[str], found: dict[str, int]) -> dict[str, str]:
    """Prefix lengths as patch names: length n > 0 blames the n-th patch; 0 (fails on the base) none."""
    return {name: patch_names[length - 1] for name, length in found.items() if length > 0}


# --- the real probes --------------------------------------------------------------------------------------


@dataclass
class Context:
    """The run being explained, as far as rebuilding and rebooting it needs."""

    run_dir: Path
    record: RunRecord
    metadata: BuildMetadata
    report: RunReport
    output: Path
    suites_dir: SuiteRoots
    cost: Cost = field(default_factory=Cost)
    store: BuildStore | None = None  # the CLI's (remote-backed when a service is configured)

    @classmethod
    def read(cls, run_dir: Path, suites_dir: SuiteRoots | None = None) -> Context:
        record = RunRecord.read(run_dir)
        metadata = BuildMetadata.read(Path(record.kernel_dir))
        report = read_report(run_dir / "junit.xml")
        chosen = _suite_roots(record.options.get("suites_dir"))
        output = Path(str(record.options.get("output", run_dir.parent.parent)))
        return cls(run_dir, record, metadata, report, output, suites_dir or chosen)


def _suite_roots(recorded: object) -> SuiteRoots:
    """The suite path a run recorded (a folder, or a list of them), else the checkout's."""
    if isinstance(recorded, str):
        return Path(recorded)
    if isinstance(recorded, list) and all(isinstance(r, str) for r in recorded):
        return tuple(Path(r) for r in recorded)
    return testflow.SUITE_PATH


def _build(ctx: Context, series: Sequence[str], prefix: tuple[str, int] | None, where: str) -> Path:
    request = buildflow.BuildRequest(
        kernel=ctx.metadata.kernel.version,
        series=list(series),
        output=ctx.output / "explain" / where,  # suites_dir: the default, as `kernel-ci test` builds
        prefix=prefix,
    )
    result = buildflow.build(request, store=ctx.store)
    if result.cache_hit:
        ctx.cost.cache_hits += 1
    else:
        ctx.cost.builds += 1
    return result.output


def _test(ctx: Context, kernel_dir: Path, suites: Sequence[str] | None) -> RunReport:
    options = testflow.TestOptions(
        kernel_dir=kernel_dir, output=ctx.output / "explain", suites=suites, suites_dir=ctx.suites_dir
    )
    ctx.cost.boots += 1
    return testflow.run_tests(options)


def retry(ctx: Context, retries: int) -> dict[str, compare.RetryCount]:
    """The failing suites again in fresh guests on the same kernel; stop early once all are seen flaky."""
    failing = compare.failing(ctx.report)
    reports: list[RunReport] = []
    for number in range(retries):
        step(f"retry {number + 1}/{retries}: {', '.join(compare.failing_suites(failing))}")
        reports.append(_test(ctx, Path(ctx.record.kernel_dir), compare.failing_suites(failing)))
        if all(c.flaky for c in compare.count_retries(ctx.report, reports).values()):
            break
    return compare.count_retries(ctx.report, reports)


def baseline_path(build_key: str, suites: Iterable[str]) -> Path:
    """Where a baseline is kept locally: beside the build it belongs to, per set of suites run."""
    return cache_dir("baselines") / build_key / f"{'+'.join(sorted(suites)) or 'none'}.json"


def baseline(ctx: Context) -> compare.Baseline:
    """The run's suites on the kernel without the series; read from the local store when already run."""
    step("baseline: the kernel without the series")
    kernel_dir = _build(ctx, [], None, "baseline")
    key = BuildMetadata.read(kernel_dir).build_key
    path = baseline_path(key, ctx.record.suites)
    if path.is_file():
        return compare.Baseline.from_json(path.read_text(), str(path))
    version = ctx.metadata.kernel.version
    found = fetch_shared_baseline(ctx.store, key, ctx.record.suites, version)
    if found is None:
        found = compare.Baseline.of(_test(ctx, kernel_dir, list(ctx.record.suites)), key, version)
        share_baseline(ctx.store, key, ctx.record.suites, (ctx.output / "explain" / "latest").resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, found.to_json())
    return found


# --- baselines on the cache service: a run attached to the baseline's build ----------------------------

MAX_SHARED_JUNIT = 8 << 20


def baseline_run_id(suites: Iterable[str]) -> str:
    """The id under which a baseline of these suites is attached to its build on the service."""
    return "baseline-" + hashlib.sha256("+".join(sorted(suites)).encode()).hexdigest()[:16]


def share_baseline(store: BuildStore | None, key: str, suites: Sequence[str], run_dir: Path) -> None:
    """Attach the baseline run's JUnit to its build on the service (with the write token)."""
    if not isinstance(store, RemoteStore) or not store.push_enabled:
        return
    try:
        store.push_run(
            key, baseline_run_id(suites), run_dir / "junit.xml", run_dir / "console.log", "baseline"
        )
    except Exception as exc:  # sharing is extra: the local baseline stands
        warn(f"baseline not shared with the cache service: {exc}")


def fetch_shared_baseline(
    store: BuildStore | None, key: str, suites: Sequence[str], kernel: str
) -> compare.Baseline | None:
    """The baseline another run shared for this build and these suites, verified against the digest the
    build's manifest records for it (as a cache entry's files are); None when there is none."""
    if not isinstance(store, RemoteStore):
        return None
    run_id = baseline_run_id(suites)
    manifest = store.client.get_manifest(key) or {}
    listed = manifest.get("runs")
    runs: list[Any] = listed if isinstance(listed, list) else []
    ref = next((r.get("junit") for r in runs if isinstance(r, dict) and r.get("run_id") == run_id), None)
    if not isinstance(ref, dict) or not isinstance(ref.get("sha256"), str):
        return None
    response = store.client.http.get(f"/api/v1/builds/{key}/runs/{run_id}/junit.xml")
    data = response.content
    if response.status_code != 200 or len(data) > MAX_SHARED_JUNIT:
        raise compare.BaselineError(f"the shared baseline {run_id} of {key[:16]} could not be read")
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise compare.BaselineError(f"the shared baseline {run_id} of {key[:16]} does not match its digest")
    return compare.Baseline.of(RunReport(None, parse_junit(data, f"baseline {run_id}")), key, kernel)


def attribute(ctx: Context, tests: set[str]) -> dict[str, str]:
    """The first patch after which each test fails, series by series (the last series first)."""
    blamed: dict[str, str] = {}
    series = list(ctx.metadata.series)
    for name in reversed(series):
        patch_names = [p for p in ctx.metadata.patches if p.split("/", 1)[0] == name]
        left = tests - set(blamed)
        if not left or not patch_names:
            continue
        suites = compare.failing_suites(left)

        def probe(length: int, series_name: str = name, suites: Sequence[str] = suites) -> set[str]:
            step(f"attribution: {series_name} after {length} patch(es)")
            kernel_dir = _build(ctx, series, (series_name, length), f"{series_name}-{length}")
            return compare.failing(_test(ctx, kernel_dir, suites))

        found = first_failures(len(patch_names), left, probe)
        blamed.update(blame(patch_names, found))
        tests = tests - {t for t, n in found.items() if n > 0}
    return blamed


@dataclass(frozen=True)
class Explained:
    report: RunReport
    comparison: compare.Comparison
    cost: Cost


def explain(
    run_dir: Path,
    *,
    retries: int = DEFAULT_RETRIES,
    use_baseline: bool = True,
    suites_dir: SuiteRoots | None = None,
    store: BuildStore | None = None,
) -> Explained:
    """Retries, baseline and attribution of a run; its junit.xml is rewritten with the findings."""
    started = time.monotonic()
    ctx = Context.read(run_dir, suites_dir)
    ctx.store = store
    evidence = compare.Evidence()
    if compare.failing(ctx.report) and retries > 0:
        evidence.retries = retry(ctx, retries)
    if use_baseline:
        evidence.baseline = baseline(ctx)
    suspects = {
        t
        for t in compare.failing(ctx.report)
        if not (evidence.retries.get(t) and evidence.retries[t].flaky)
        and not (evidence.baseline and evidence.baseline.tests.get(t) == "failed")
    }
    if suspects and ctx.metadata.series:
        evidence.blamed = attribute(ctx, suspects)
    comparison = compare.compare(ctx.report, evidence)
    report = replace(ctx.report)
    compare.annotate(report, comparison)
    write_junit(report, run_dir / "junit.xml")
    write_text_atomic(run_dir / "explained.json", comparison.to_json())
    ctx.cost.seconds = time.monotonic() - started
    return Explained(report, comparison, ctx.cost)


# --- history on the cache service -------------------------------------------------------------------------


def history_upload(
    report: RunReport, comparison: compare.Comparison, branch: str, run_id: str
) -> HistoryUpload:
    """Every test of the run with its explained state, for the branch's history on the service."""
    found = comparison.by_test()
    tests = []
    for name, state in sorted(compare.test_states(report).items()):
        finding = found.get(name)
        verdict = finding.verdict if finding is not None else state
        shown = "failed" if verdict == "regression" else verdict
        tests.append(TestResult(name, shown, (finding.blamed_patch or "") if finding else ""))
    return HistoryUpload(branch, run_id, tuple(tests))


def push_history(store: object, upload: HistoryUpload) -> str | None:
    """Upload the run's results with the write token; the history page's base URL, None when there is no
    service to write to."""
    if not isinstance(store, RemoteStore) or not store.push_enabled:
        return None
    try:
        response = store.client.http.post("/api/v1/history", json=upload.to_json())
    except Exception as exc:  # httpx's transport errors: the service is down or unreachable
        raise RemoteCacheError(f"the test history could not be sent: {exc}") from exc
    if response.status_code != 201:
        raise RemoteCacheError(
            f"the service refused the test history ({response.status_code}): {response.text[:200]}"
        )
    return store.client.config.url
