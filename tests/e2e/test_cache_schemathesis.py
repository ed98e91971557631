"""The service's API fuzzed from its own OpenAPI document (schemathesis) against a real server: no 500s.

Bounded: a fixed number of generated requests per operation, with a write token so that writes are
exercised too (bodies that pass the schema reach the validation and the stores). Driven through
schemathesis's Python API and hypothesis directly (its pytest plugin lags behind pytest releases)."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.server.service import Limits
from tests.cacheservice import TOKEN, server_in_thread

pytestmark = pytest.mark.slow

EXAMPLES = 40


def test_no_generated_request_makes_the_service_fail(tmp_path: Path) -> None:
    config = ServerConfig(data=tmp_path / "data", limits=Limits(max_bytes=50 << 20))
    failures: list[str] = []
    calls = 0
    with server_in_thread(config) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
            )
            def fuzz(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                fuzz()
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label}: {exc}")
    assert calls >= len(operations) * 5
    assert not failures, "\n\n".join(failures)
