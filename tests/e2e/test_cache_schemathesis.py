"""The service's API fuzzed from its own OpenAPI document (schemathesis) against a real server: no 500s.

Bounded: a fixed number of generated requests per operation, with a write token so that writes are
exercised too (bodies that pass the schema reach the validation and the stores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from ci.cacheserver.server import ServerConfig
from ci.cacheserver.service import Limits
from tests.cacheservice import TOKEN, server_in_thread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    config = ServerConfig(data=data, limits=Limits(max_bytes=50 << 20))
    with server_in_thread(config) as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_makes_the_service_fail(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
