"""Explaining a red run: which patch broke each failing test, is it flaky, was it already broken.

Three looks, each a real build (a build-cache entry: a second look costs boots, not builds) and real boots
of only the failing suites:

- retries: the failing suites again in fresh guests, `retries` times (attempt n: $KCI_ATTEMPT in the
  guest); a test that passes once is flaky;
- baseline: every suite of the run on the kernel without the series (the prefix of length 0 of its first
  series: same version, fragments and options; a --tree run without series: the tree at its base
  revision, tree_base); a failure it has too is pre-existing, a test it has and the run lacks vanished,
  one it lacks is new;
- attribution: the series' prefixes (BuildPlan.prefix: the base, patch 1, 1..2, ...), walked when the
  series is short and bisected when it is long, naming for each regression the first patch after which
  it fails.

Every kernel built here is the run's own BuildRequest (flow.build keeps it beside the build output) with
a prefix, checked to still plan the run's kernel (run_request): a prefix build can never drop a
--fragment, the project's suites or any other option of the run.

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

from kernel_ci.build import tree as usertree
from kernel_ci.build.records import BuildMetadata
from kernel_ci.cache.history import HistoryUpload, TestResult
from kernel_ci.cache.remote import RemoteCacheError, RemoteStore
from kernel_ci.cache.store import BuildStore
from kernel_ci.core.console import step, warn
from kernel_ci.core.errors import UsageError
from kernel_ci.core.files import write_text_atomic
from kernel_ci.core.paths import KTAP_LIB, cache_dir
from kernel_ci.flow import build as buildflow
from kernel_ci.flow import test as testflow
from kernel_ci.guest.suites import SuiteRoots, roots_of, suite_folders
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
    # the request that built the run's kernel (kept beside its output dir by flow.build); None: not known
    request: buildflow.BuildRequest | None = None
    cost: Cost = field(default_factory=Cost)
    store: BuildStore | None = None  # the CLI's (remote-backed when a service is configured)
    ccache_remote: str | None = field(default=None, repr=False)  # the CLI's setting (never in a file)
    base: str | None = None  # --tree without series: the revision whose kernel is the baseline

    @classmethod
    def read(cls, run_dir: Path, suites_dir: SuiteRoots | None = None) -> Context:
        record = RunRecord.read(run_dir)
        kernel_dir = Path(record.kernel_dir)
        metadata = BuildMetadata.read(kernel_dir)
        if metadata.build_key != record.build_key:
            raise UsageError(
                f"{kernel_dir} holds build {metadata.build_key[:16]} now, not the run's "
                f"{record.build_key[:16]} (built over since): rebuild the run's kernel "
                f"({record.reproduce_build}) and test it again"
            )
        report = read_report(run_dir / "junit.xml")
        chosen = _suite_roots(record.options.get("suites_dir"))
        output = Path(str(record.options.get("output", run_dir.parent.parent)))
        request = buildflow.read_request(kernel_dir)
        return cls(run_dir, record, metadata, report, output, suites_dir or chosen, request)


def _suite_roots(recorded: object) -> SuiteRoots:
    """The suite path a run recorded (a folder, or a list of them), else the checkout's."""
    if isinstance(recorded, str):
        return Path(recorded)
    if isinstance(recorded, list) and all(isinstance(r, str) for r in recorded):
        return tuple(Path(r) for r in recorded)
    return testflow.SUITE_PATH


def run_request(ctx: Context) -> buildflow.BuildRequest:
    """The request that built the run's kernel, checked to still plan that kernel: its recipe key (the
    plan's files: series, fragments, suites' needs, modules, source) is the one the build recorded. Every
    kernel attribution builds is this request with a prefix, so it keeps every option of the run."""
    kernel_dir = Path(ctx.record.kernel_dir)
    if ctx.request is None:
        raise UsageError(
            f"the build options of {kernel_dir} are unknown (no {buildflow.request_path(kernel_dir).name} "
            f"beside it: built by an older kernel-ci, or copied from elsewhere); build it again with "
            f"{ctx.metadata.reproduce} and test it, or explain it without rebuilding (--no-baseline)"
        )
    key = buildflow.plan_request(ctx.request).plan.recipe_key()
    if key != ctx.metadata.recipe_key:
        raise UsageError(
            f"the inputs of {kernel_dir} changed since it was built (recipe key {key[:16]}, the build's "
            f"{ctx.metadata.recipe_key[:16]}): its series, kconfig fragments, suites or modules are no "
            "longer what built it, so their prefixes would not be its prefixes; test it again, then "
            "explain that run"
        )
    return ctx.request


def prefix_request(
    request: buildflow.BuildRequest, prefix: tuple[str, int], output: Path, ccache_remote: str | None = None
) -> buildflow.BuildRequest:
    """The run's request for one prefix (BuildPlan.prefix): only the prefix and where it goes change."""
    return replace(request, prefix=prefix, output=output, ccache_remote=ccache_remote)


def _build(ctx: Context, prefix: tuple[str, int], where: str) -> Path:
    request = prefix_request(run_request(ctx), prefix, ctx.output / "explain" / where, ctx.ccache_remote)
    return _count(ctx, buildflow.build(request, store=ctx.store))


def _count(ctx: Context, result: buildflow.BuildResult) -> Path:
    if result.cache_hit:
        ctx.cost.cache_hits += 1
    else:
        ctx.cost.builds += 1
    return result.output


def _test(ctx: Context, kernel_dir: Path, suites: Sequence[str] | None, attempt: int = 0) -> RunReport:
    """Boot kernel_dir with the run's suites folder and machine (memory, cpus, accel, append, timeouts)."""
    ran = ctx.record.options
    options = testflow.TestOptions(
        kernel_dir=kernel_dir,
        output=ctx.output / "explain",
        suites=suites,
        suites_dir=ctx.suites_dir,
        attempt=attempt,
    )
    if "modules_dir" in ran:
        options.modules_dir = Path(str(ran["modules_dir"]))
    for name in testflow.MACHINE_OPTIONS:
        if name in ran:
            setattr(options, name, ran[name])
    report = testflow.run_tests(options)
    ctx.cost.boots += int(report.properties.get("guests", "1"))  # a run may boot several (--guests)
    return report


def retry(ctx: Context, retries: int) -> dict[str, compare.RetryCount]:
    """The failing suites again in fresh guests on the same kernel; stop early once all are seen flaky."""
    failing = compare.failing(ctx.report)
    reports: list[RunReport] = []
    for number in range(retries):
        step(f"retry {number + 1}/{retries}: {', '.join(compare.failing_suites(failing))}")
        suites = compare.failing_suites(failing)
        reports.append(_test(ctx, Path(ctx.record.kernel_dir), suites, attempt=number + 1))
        if all(c.flaky for c in compare.count_retries(ctx.report, reports).values()):
            break
    return compare.count_retries(ctx.report, reports)


def baseline_path(build_key: str, suites: Iterable[str], content: str = "") -> Path:
    """Where a baseline is kept locally: beside the build it belongs to, per set of suites run (and their
    files' digest: a changed suite is run again)."""
    name = "+".join(sorted(suites)) or "none"
    return cache_dir("baselines") / build_key / f"{name}{'@' + content[:16] if content else ''}.json"


def suites_digest(suites_dir: SuiteRoots, names: Iterable[str]) -> str:
    """A digest of the named suites' files and the KTAP lib, found along the suite path as a run finds
    them (the project's first, then the packaged ones): what a baseline ran."""
    digest = hashlib.sha256()
    folders = suite_folders(suites_dir)
    libs = [r / "lib" for r in roots_of(suites_dir)] + [KTAP_LIB]
    chosen = [(n, folders[n]) for n in sorted(set(names)) if n in folders]
    chosen += (
        [("lib", next(lib for lib in libs if lib.is_dir()))] if any(lib.is_dir() for lib in libs) else []
    )
    for name, root in chosen:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}".encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def baseline_build(ctx: Context) -> Path | None:
    """The kernel without the change under test, built with the run's options: the run's plan without its
    series (the prefix of length 0 of its first series); for a --tree run without series, the tree at its
    base revision (tree_base). None when there is nothing to compare with (a vanilla kernel's run)."""
    series = ctx.metadata.series
    if series:
        return _build(ctx, (series[0], 0), "baseline")
    request = run_request(ctx)
    if request.tree is None:
        warn("no baseline: the run's kernel has no series, so the kernel without them is the run's own")
        return None
    base = tree_base(request.tree, ctx.base)
    if base is None:
        return None
    checkout = usertree.base_checkout(request.tree, base)
    output = ctx.output / "explain" / "baseline"
    based = replace(request, tree=checkout, prefix=None, output=output, ccache_remote=ctx.ccache_remote)
    return _count(ctx, buildflow.build(based, store=ctx.store))


def tree_base(tree: Path, base: str | None) -> str | None:
    """The commit a --tree run is compared with: --base, else the merge-base of HEAD with its upstream
    branch; None (no baseline, with a warning) when neither is there."""
    if base is not None:
        return usertree.resolve_commit(tree, base)
    found = usertree.upstream_merge_base(tree)
    if found is None:
        warn(
            f"no baseline: {tree} has no upstream branch to take the merge-base with; "
            "name the revision to compare with: --base REV"
        )
    return found


def baseline(ctx: Context) -> compare.Baseline | None:
    """The run's suites on the kernel without the change; read from the local store when already run."""
    step("baseline: the kernel without the series")
    kernel_dir = baseline_build(ctx)
    if kernel_dir is None:
        return None
    key = BuildMetadata.read(kernel_dir).build_key
    content = suites_digest(ctx.suites_dir, ctx.record.suites)
    path = baseline_path(key, ctx.record.suites, content)
    if path.is_file():
        return compare.Baseline.from_json(path.read_text(), str(path))
    version = BuildMetadata.read(kernel_dir).kernel.version
    found = fetch_shared_baseline(ctx.store, key, ctx.record.suites, version, content)
    if found is None:
        found = compare.Baseline.of(_test(ctx, kernel_dir, list(ctx.record.suites)), key, version)
        run_dir = (ctx.output / "explain" / "latest").resolve()
        share_baseline(ctx.store, key, ctx.record.suites, run_dir, content)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, found.to_json())
    return found


# --- baselines on the cache service: a run attached to the baseline's build ----------------------------

MAX_SHARED_JUNIT = 8 << 20


def baseline_run_id(suites: Iterable[str], content: str = "") -> str:
    """The id under which a baseline of these suites (of these files: suites_digest) is attached to its
    build on the service."""
    name = "+".join(sorted(suites)) + (f"@{content}" if content else "")
    return "baseline-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def share_baseline(
    store: BuildStore | None, key: str, suites: Sequence[str], run_dir: Path, content: str = ""
) -> None:
    """Attach the baseline run's JUnit to its build on the service (with the write token)."""
    if not isinstance(store, RemoteStore) or not store.push_enabled:
        return
    try:
        store.push_run(
            key, baseline_run_id(suites, content), run_dir / "junit.xml", run_dir / "console.log", "baseline"
        )
    except Exception as exc:  # sharing is extra: the local baseline stands
        warn(f"baseline not shared with the cache service: {exc}")


def fetch_shared_baseline(
    store: BuildStore | None, key: str, suites: Sequence[str], kernel: str, content: str = ""
) -> compare.Baseline | None:
    """The baseline another run shared for this build and these suites, verified against the digest the
    build's manifest records for it (as a cache entry's files are); None when there is none."""
    if not isinstance(store, RemoteStore):
        return None
    run_id = baseline_run_id(suites, content)
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
            kernel_dir = _build(ctx, (series_name, length), f"{series_name}-{length}")
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
    ccache_remote: str | None = None,
    base: str | None = None,
) -> Explained:
    """Retries, baseline and attribution of a run; its junit.xml is rewritten with the findings.

    base: for a --tree run without series, the revision whose kernel is the baseline (tree_base)."""
    started = time.monotonic()
    ctx = Context.read(run_dir, suites_dir)
    ctx.store, ctx.ccache_remote, ctx.base = store, ccache_remote, base
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
