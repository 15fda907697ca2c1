"""The OpenAPI schema is the API: schemathesis generates requests from the live server's own schema (valid
ones, and for the POST routes invalid ones too) and checks every answer against it. No 5xx, no status,
content type, header or body the schema does not declare, and every invalid request refused."""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 80  # per operation and mode: about 15 s for all of them on the tiny model
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_paddle, tmp_path_factory):
    """Cheap generation (8 tokens at most), room for what hypothesis asks for at once (n up to 16)."""
    from server_utils import launch

    srv = launch(tiny_paddle, tmp_path_factory.mktemp("fuzz") / "server.log", "sampling.max_tokens=8")
    yield srv
    srv.stop()


def run_operation(operation, mode: GenerationMode, base_url: str, cases: collections.Counter) -> list:
    """Up to MAX_EXAMPLES cases of one operation; the failures found (none raised: all are reported)."""
    failures: list[str] = []
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        cases[operation.label, mode.value] += 1
        response = case.call(base_url=base_url, timeout=60)
        try:
            case.validate_response(response, checks=checks)
        except Exception as exc:  # a FailureGroup: keep it and go on
            failures.append(f"{operation.label} ({mode.value}): {str(exc)[:2000]}")

    check()
    return failures


def test_server_conforms_to_its_own_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    cases: collections.Counter = collections.Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.lower() == "post":  # the GET routes take no input to get wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            failures += run_operation(operation, mode, fuzz_server.base_url, cases)
    print(f"schemathesis: {sum(cases.values())} cases, {len(failures)} failures: {dict(cases)}")
    assert sum(cases.values()) >= 4 * MAX_EXAMPLES
    assert not failures, "\n\n".join(failures[:5])
    assert fuzz_server.process.poll() is None
