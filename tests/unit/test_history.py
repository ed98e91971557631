"""The test-history endpoint of the cache service (issue 18): a real server in a thread, real HTTP.

Attacks first: uploads are untrusted (SECURITY.md). Each test fails if its protection is removed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_ci.cache.server import history
from kernel_ci.cache.server.server import ServerConfig
from tests.cacheservice import READ_TOKEN, Running, server_in_thread

XSS = "<script>alert(1)</script>"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as running:
        yield running


def _upload(branch: str = "main", run_id: str = "run-1", **tests: str) -> dict[str, object]:
    items = [
        {"test": name.replace("__", "::"), "state": state, "blamed": ""} for name, state in tests.items()
    ]
    return {"schema": 1, "branch": branch, "run_id": run_id, "tests": items}


def test_a_run_uploads_its_results_and_the_page_shows_the_test_across_runs(server: Running) -> None:
    with server.client() as client:
        first = _upload(run_id="run-1", smoke__a="failed")
        first["tests"][0]["blamed"] = "s/0002-x.patch"  # type: ignore[index]
        assert client.post("/api/v1/history", json=first).status_code == 201
        assert (
            client.post("/api/v1/history", json=_upload(run_id="run-2", smoke__a="flaky")).status_code == 201
        )
        doc = client.get("/api/v1/history", params={"branch": "main", "test": "smoke::a"}).json()
        page = client.get("/history", params={"branch": "main", "test": "smoke::a"})
    assert [(r["run_id"], r["state"], r["blamed"]) for r in doc["runs"]] == [
        ("run-2", "flaky", ""),
        ("run-1", "failed", "s/0002-x.patch"),
    ]
    assert page.status_code == 200 and "s/0002-x.patch" in page.text and "flaky" in page.text


def test_xss_in_a_test_name_is_shown_escaped(server: Running) -> None:
    with server.client() as client:
        upload = {
            "schema": 1,
            "branch": "main",
            "run_id": "r",
            "tests": [{"test": XSS, "state": "failed", "blamed": XSS}],
        }
        assert client.post("/api/v1/history", json=upload).status_code == 201
        page = client.get("/history", params={"branch": "main", "test": XSS})
    assert XSS not in page.text and "&lt;script&gt;" in page.text


BLAMED_XSS = '<script>alert("blamed")</script>'
NAME_XSS = "smoke::<img src=x onerror=alert(2)>"


def test_a_script_in_a_test_name_or_blamed_patch_is_escaped_on_the_page(server: Running) -> None:
    """The page is the autoescaped template: each uploaded field, and the test name from the query, comes
    out as text; drop autoescape (or mark a field |safe) and this fails."""
    with server.client() as client:
        upload = {
            "schema": 1,
            "branch": "main",
            "run_id": "r-1",
            "tests": [{"test": NAME_XSS, "state": "failed", "blamed": BLAMED_XSS}],
        }
        assert client.post("/api/v1/history", json=upload).status_code == 201
        page = client.get("/history", params={"branch": "main", "test": NAME_XSS})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for raw in (BLAMED_XSS, NAME_XSS, "<script", "<img"):
        assert raw not in page.text
    assert "&lt;script&gt;alert(&#34;blamed&#34;)&lt;/script&gt;" in page.text  # the blamed patch, as text
    assert "smoke::&lt;img src=x onerror=alert(2)&gt;" in page.text  # the name, in <title> and <h1>
    assert page.text.count("&lt;img") >= 2
    assert "r-1" in page.text and 'class="fail"' in page.text


def test_the_page_is_the_services_template() -> None:
    """history.html through the service's one autoescaping environment, no HTML built in Python."""
    html = history.render_page("main", "a&b", [history.HistoryRow("r", "flaky", "s/0001-<x>.patch", 0.0)])
    assert "<h1>a&amp;b</h1>" in html and "s/0001-&lt;x&gt;.patch" in html
    assert "<!doctype html>" in html and "all builds" in html  # base.html's frame
    assert "No results" in history.render_page("main", "a", [])


def test_the_client_side_of_history_imports_nothing_of_the_service() -> None:
    """--attribute --branch builds and sends an upload on a client install (no [server] extra)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "import kernel_ci.flow.attribute, kernel_ci.cli.explain, kernel_ci.cache.history\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'jinja2', 'uvicorn', 'boto3')\n"
        "       or m.startswith('kernel_ci.cache.server')]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_an_upload_without_the_write_token_is_refused(server: Running) -> None:
    for token in (None, READ_TOKEN, "wrong-token"):
        with server.client(token=token) as client:
            answer = client.post("/api/v1/history", json=_upload(smoke__a="failed"))
        assert answer.status_code in (401, 403), token
    with server.client() as client:
        assert (
            client.get("/api/v1/history", params={"branch": "main", "test": "smoke::a"}).json()["runs"] == []
        )


def test_an_oversized_upload_is_refused_before_it_is_read(server: Running) -> None:
    with server.client() as client:
        answer = client.post(
            "/api/v1/history",
            content=b"{" + b" " * (history.MAX_UPLOAD_BYTES + 1) + b"}",
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"schema": 1, "branch": "main", "run_id": "r", "tests": [{"test": "a", "state": "exploded"}]}',
        b'{"schema": 1, "branch": "../../etc", "run_id": "r", "tests": []}',
        b'{"schema": 1, "branch": "main", "run_id": "r", "tests": [{"test": "", "state": "failed"}]}',
        b'{"schema": 1, "branch": "main", "run_id": "r", "tests": [{"test": 5, "state": "failed"}]}',
        b'{"schema": 2, "branch": "main", "run_id": "r", "tests": []}',
        b'{"schema": 1, "branch": "main", "run_id": "r", "tests": {}, "extra": 1}',
        b'{"schema": 1, "branch": "main", "run_id": "r", '
        b'"tests": [{"test": "a", "state": "failed", "x": 1}]}',
        b'{"schema": 1, "branch": "main", "run_id": "r", "tests": [NaN]}',
    ],
)
def test_bad_uploads_are_refused_with_a_reason_and_store_nothing(server: Running, body: bytes) -> None:
    with server.client() as client:
        answer = client.post("/api/v1/history", content=body, headers={"content-type": "application/json"})
        stored = client.get("/api/v1/history", params={"branch": "main", "test": "a"}).json()["runs"]
    assert answer.status_code == 400 and answer.json()["error"]
    assert stored == []


def test_too_many_tests_or_too_long_a_name_is_refused(server: Running) -> None:
    many = {f"s__t{i}": "passed" for i in range(history.MAX_TESTS + 1)}
    long = {"s__" + "x" * history.MAX_NAME: "passed"}
    with server.client() as client:
        assert client.post("/api/v1/history", content=json.dumps(_upload(**many))).status_code == 400
        assert client.post("/api/v1/history", json=_upload(**long)).status_code == 400


def test_the_page_link_quotes_branch_and_test() -> None:
    url = history.page_url("http://cache:8080/", "feature/x", "smoke::a b&c")
    assert url == "http://cache:8080/history?branch=feature%2Fx&test=smoke%3A%3Aa%20b%26c"


def test_a_run_explained_uploads_its_history_with_the_write_token(server: Running, tmp_path: Path) -> None:
    """flow.attribute's upload, through the real client (RemoteStore), to the real service."""
    from kernel_ci.cache.remote import CacheClient, RemoteConfig, RemoteStore
    from kernel_ci.cache.store import LocalStore
    from kernel_ci.flow.attribute import history_upload, push_history
    from kernel_ci.report import compare
    from kernel_ci.report.model import Case, Outcome, RunReport, SuiteResult
    from tests.cacheservice import TOKEN

    report = RunReport(
        Outcome.TEST_FAILURE,
        [SuiteResult("smoke", [Case("a", "smoke", "failed"), Case("b", "smoke", "passed")])],
    )
    comparison = compare.compare(report, compare.Evidence(blamed={"smoke::a": "s/0002-x.patch"}))
    upload = history_upload(report, comparison, "feature-x", "20261204T200000-abc")
    store = RemoteStore(LocalStore(tmp_path / "builds"), CacheClient(RemoteConfig(server.url, token=TOKEN)))
    assert push_history(store, upload) == server.url
    with server.client() as client:
        runs = client.get("/api/v1/history", params={"branch": "feature-x", "test": "smoke::a"}).json()[
            "runs"
        ]
    assert [(r["state"], r["blamed"]) for r in runs] == [("failed", "s/0002-x.patch")]
    reader = RemoteStore(LocalStore(tmp_path / "b2"), CacheClient(RemoteConfig(server.url, token=None)))
    assert push_history(reader, upload) is None  # no write token: nothing is sent


def test_a_baseline_shared_on_the_service_is_fetched_verified_by_another_machine(
    server: Running, tmp_path: Path
) -> None:
    """Attached as a run to the baseline's build; read back through the real client and checked against the
    digest the build's manifest records."""
    from kernel_ci.cache.remote import CacheClient, RemoteConfig, RemoteStore
    from kernel_ci.cache.store import LocalStore
    from kernel_ci.flow import attribute
    from kernel_ci.report import junit
    from kernel_ci.report.model import Case, Outcome, RunReport, SuiteResult
    from tests.cacheservice import TOKEN
    from tests.unit.test_cacheserver import publish

    key = "b" * 64
    with server.client() as client:
        assert publish(client, key, {"bzImage": b"kernel"}).status_code == 201
    run_dir = tmp_path / "baseline-run"
    report = RunReport(
        Outcome.TEST_FAILURE,
        [SuiteResult("smoke", [Case("a", "smoke", "failed", message="m"), Case("b", "smoke", "passed")])],
    )
    junit.write_junit(report, run_dir / "junit.xml")
    (run_dir / "console.log").write_text("boot\n")
    writer = RemoteStore(LocalStore(tmp_path / "w"), CacheClient(RemoteConfig(server.url, token=TOKEN)))
    attribute.share_baseline(writer, key, ["smoke"], run_dir)

    reader = RemoteStore(LocalStore(tmp_path / "r"), CacheClient(RemoteConfig(server.url, token=None)))
    found = attribute.fetch_shared_baseline(reader, key, ["smoke"], "5.10.223")
    assert found is not None and found.tests == {"smoke::a": "failed", "smoke::b": "passed"}
    assert attribute.fetch_shared_baseline(reader, key, ["other"], "5.10.223") is None  # other suites: none
