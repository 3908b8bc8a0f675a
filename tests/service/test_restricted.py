"""`--restricted-api` specs and maps: what parses, what is refused (naming the flag, never the key), and every
REST route and gRPC method the server has belongs to a group (a new route cannot escape a restriction)."""

from __future__ import annotations

import pytest

from service.restricted import GROUPS, GRPC_GROUPS, REST_GROUPS, Restriction, parse_specs
from service.settings import Settings
from tests.process import normfuse

SECRET = "s3cret-value"


def test_a_spec_names_groups_a_lowercased_header_and_a_key_that_may_hold_colons_and_equals():
    [restriction] = parse_specs([f"model-repository,statistics:X-Key={SECRET}:a=b"])
    assert restriction.groups == ("model-repository", "statistics") and restriction.header == "x-key"
    assert restriction.key == f"{SECRET}:a=b".encode()
    assert restriction.allows(f"{SECRET}:a=b".encode())
    assert not restriction.allows(None) and not restriction.allows(SECRET.encode()) and not restriction.allows(b"")


def test_the_environment_joins_specs_with_semicolons(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMFUSE_RESTRICTED_API", f"model-repository:x-a={SECRET};health,metadata:x-b=other")
    settings = Settings(repo=tmp_path)
    assert [(r.groups, r.header) for r in settings.restricted_api] == [
        (("model-repository",), "x-a"), (("health", "metadata"), "x-b")]
    assert SECRET not in repr(settings) and SECRET not in str(settings.restricted_api)


@pytest.mark.parametrize("spec, says", [
    ("model-repository", "HEADER=VALUE"),
    ("model-repository:x-key", "HEADER=VALUE"),
    (f"repository:x-key={SECRET}", "unknown API group"),
    (f"model-repository,:x-key={SECRET}", "unknown API group"),
    (f"model-repository:grpc-key={SECRET}", "not a valid header name"),
    (f"model-repository:x-key-bin={SECRET}", "not a valid header name"),
    (f"model-repository:x key={SECRET}", "not a valid header name"),
    ("model-repository:x-key=", "non-empty printable ASCII"),
    ("model-repository:x-key=two words", "non-empty printable ASCII"),
    ("model-repository:x-key=caf\u00e9", "non-empty printable ASCII"),
    (f"x-key={SECRET}:model-repository", "HEADER=VALUE"),  # reversed: the key must not be echoed
    (f"x-key={SECRET}:model-repository=x", r"unknown API group\(s\) \['\(not shown\)'\]"),
])
def test_a_bad_spec_says_what_is_expected_without_the_key(spec, says):
    with pytest.raises(ValueError, match=says) as refused:
        parse_specs([spec])
    assert SECRET not in str(refused.value)


def test_a_group_restricted_twice_is_refused():
    with pytest.raises(ValueError, match="model-repository restricted more than once"):
        parse_specs(["model-repository:x-a=1", "statistics,model-repository:x-b=2"])


def test_serve_reports_a_bad_spec_naming_the_flag_and_hiding_the_key(tmp_path):
    done = normfuse("serve", "--repo", str(tmp_path), "--restricted-api", f"model-repository:x-key={SECRET}",
                    "--restricted-api", f"bogus:x-other={SECRET}", timeout=60)
    assert done.returncode == 2
    assert "--restricted-api / NORMFUSE_RESTRICTED_API" in done.stderr and "unknown API group" in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_every_rest_route_has_a_group():
    from service.routes import router

    served = {route.path for route in router.routes if route.path.startswith("/v2")}
    assert served == set(REST_GROUPS), "a /v2 route without a group (or a group for a route that is gone)"
    assert set(REST_GROUPS.values()) == set(GROUPS)


def test_every_grpc_method_has_a_group():
    from tritonclient.grpc import service_pb2

    from service.grpc_server import InferenceService

    served = {name for name in vars(InferenceService) if name[:1].isupper()}
    assert served <= set(GRPC_GROUPS), f"gRPC methods without a group: {served - set(GRPC_GROUPS)}"
    methods = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert set(GRPC_GROUPS) <= set(methods), "a group for a method the service does not have"


def test_the_key_is_not_in_repr():
    restriction = Restriction(groups=("health",), header="x-key", key=SECRET.encode())
    assert SECRET not in repr(restriction)
