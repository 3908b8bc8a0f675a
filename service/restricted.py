"""Restricted APIs: Triton's `--http-restricted-api` / `--grpc-restricted-protocol`, one setting for both protocols.

    --restricted-api model-repository:x-normfuse-key=S3CRET                (repeatable; NORMFUSE_RESTRICTED_API
    --restricted-api statistics,model-config:x-ops-key=0THER                 holds several specs joined by ';')

Each spec names API groups (Triton's names, `GROUPS`) and the header a client must send with the key. A REST
request or gRPC call in a restricted group without that header, or with another value, is refused before
anything else runs (before admission, before the body is read): 403 / PERMISSION_DENIED naming the header it
expects, never the key. Keys are compared in constant time (`hmac.compare_digest`) and never logged: a spec's
repr and every parse error leave the value out.

REST paths are matched to their group by the routes' own templates compiled as the router compiles them
(`REST_GROUPS`, whose completeness a test checks against service.routes), so a path the router would serve
cannot slip past under another spelling; gRPC methods by their full method name (`RestrictedGrpc`). A route or method without a
group (`/metrics`, `/docs`) is open.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings import this module: starlette, fastapi and grpc load only with the server
    from starlette.types import ASGIApp, Receive, Scope, Send

    from service.errors import Forbidden

FLAG = "--restricted-api"
GROUPS = ("health", "metadata", "inference", "model-config", "model-repository", "statistics")

# route path (as declared in service.routes) -> its API group
REST_GROUPS = {
    "/v2/health/live": "health",
    "/v2/health/ready": "health",
    "/v2/models/{model}/ready": "health",
    "/v2/models/{model}/versions/{version}/ready": "health",
    "/v2": "metadata",
    "/v2/models/{model}": "metadata",
    "/v2/models/{model}/versions/{version}": "metadata",
    "/v2/models/{model}/infer": "inference",
    "/v2/models/{model}/versions/{version}/infer": "inference",
    "/v2/models/{model}/config": "model-config",
    "/v2/models/{model}/versions/{version}/config": "model-config",
    "/v2/models/stats": "statistics",
    "/v2/models/{model}/stats": "statistics",
    "/v2/models/{model}/versions/{version}/stats": "statistics",
    "/v2/models/{model}/compare": "statistics",  # normfuse's fused/unfused comparison: statistics of a model
    "/v2/repository/index": "model-repository",
    "/v2/repository/models/{model}/load": "model-repository",
    "/v2/repository/models/{model}/unload": "model-repository",
}
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_GROUPS = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata",
    "ModelInfer": "inference", "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
}
# a header both an HTTP field name and a gRPC metadata key accept (lowercase; gRPC reserves grpc-* and *-bin)
_HEADER = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces; ';' separates specs in the environment


@dataclass(frozen=True)
class Restriction:
    """API groups that need `header` to carry `key`. The key is left out of repr (settings, logs, errors)."""

    groups: tuple[str, ...]
    header: str
    key: bytes = field(repr=False)

    def allows(self, value: bytes | None) -> bool:
        """Whether a request whose header carries `value` (None: absent) may pass; constant time in the key."""
        return value is not None and hmac.compare_digest(value, self.key)

    def refusal(self, group: str) -> Forbidden:
        from service.errors import Forbidden

        return Forbidden(f"the {group} API is restricted: send the header {self.header!r} with its key "
                         f"({FLAG} / NORMFUSE_RESTRICTED_API)")


def parse_specs(value: object) -> list[Restriction]:
    """`API[,API...]:HEADER=VALUE` specs (a list of them, or one string of them joined by ';') -> Restrictions.
    ValueError naming the flag and what is expected, never quoting the key."""
    if isinstance(value, list | tuple) and all(isinstance(item, Restriction) for item in value):
        return list(value)
    items = value.split(";") if isinstance(value, str) else list(value or [])
    restrictions = [parse_spec(str(item)) for item in items if str(item).strip()]
    groups = [group for restriction in restrictions for group in restriction.groups]
    repeated = sorted({group for group in groups if groups.count(group) > 1})
    if repeated:
        raise ValueError(f"API group(s) {', '.join(repeated)} restricted more than once; give each group "
                         "one header")
    return restrictions


def parse_spec(spec: str) -> Restriction:
    apis, colon, credential = spec.strip().partition(":")
    header, equals, key = credential.partition("=")
    expected = f"expected API[,API...]:HEADER=VALUE with API one of {', '.join(GROUPS)}"
    if not colon or not equals:
        raise ValueError(f"a spec without ':' or '=' ({expected})")
    groups = tuple(part.strip() for part in apis.split(","))
    unknown = [group for group in groups if group not in GROUPS]
    if unknown:  # a name that could be a key (a reversed spec, HEADER=VALUE:API) is not echoed
        shown = [group if re.fullmatch(r"[A-Za-z_-]{1,32}", group) else "(not shown)" for group in unknown]
        raise ValueError(f"unknown API group(s) {shown} ({expected})")
    header = header.strip().lower()
    if not _HEADER.fullmatch(header) or header.startswith("grpc-") or header.endswith("-bin"):
        raise ValueError(f"header {header!r} is not a valid header name (lowercase letters, digits, "
                         "'-', '_', '.'; not grpc-* nor *-bin, which gRPC reserves)")
    if not _KEY.fullmatch(key):
        raise ValueError(f"the value for header {header!r} must be non-empty printable ASCII without "
                         "spaces or ';' (the value itself is not shown)")
    if ";" in key:
        raise ValueError(f"the value for header {header!r} contains ';', which separates specs")
    return Restriction(groups=groups, header=header, key=key.encode("ascii"))


def by_group(restrictions: Iterable[Restriction]) -> dict[str, Restriction]:
    return {group: restriction for restriction in restrictions for group in restriction.groups}


def _first_header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


class RestrictedApi:
    """Pure ASGI middleware: a request to a route of a restricted group needs its header (else 403)."""

    def __init__(self, app: ASGIApp, restrictions: Sequence[Restriction]) -> None:
        from starlette.routing import compile_path  # the router's own path -> regex, so both match alike

        self.app = app
        self.groups = by_group(restrictions)
        self.patterns = [(compile_path(path)[0], group) for path, group in REST_GROUPS.items()
                         if group in self.groups]

    def group_of(self, scope: Scope) -> str | None:
        """The restricted group whose route the path is (any method: 403 before 405), None when it is open."""
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        return next((group for pattern, group in self.patterns if pattern.match(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        group = self.group_of(scope) if scope["type"] == "http" else None
        restriction = self.groups.get(group)
        if restriction is None or restriction.allows(_first_header(scope, restriction.header.encode())):
            await self.app(scope, receive, send)
            return
        from service.errors import error_response

        await error_response(restriction.refusal(group))(scope, receive, send)


def grpc_interceptor(restrictions: Sequence[Restriction]):
    """A grpc.aio server interceptor: a call to a method of a restricted group needs its metadata key."""
    import grpc

    groups = by_group(restrictions)

    def denial(message: str, streaming: bool):
        async def abort(request, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        async def abort_stream(requests, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
            yield  # pragma: no cover - abort raises; this makes it an async generator, as stream handlers are

        return (grpc.stream_stream_rpc_method_handler(abort_stream) if streaming
                else grpc.unary_unary_rpc_method_handler(abort))

    class RestrictedGrpc(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            method = details.method.removeprefix(GRPC_SERVICE)
            group = GRPC_GROUPS.get(method) if details.method.startswith(GRPC_SERVICE) else None
            restriction = groups.get(group)
            if restriction is not None:
                value = next((v for k, v in details.invocation_metadata or () if k == restriction.header), None)
                if not restriction.allows(value.encode("utf-8", "replace") if isinstance(value, str) else value):
                    return denial(str(restriction.refusal(group)), method == "ModelStreamInfer")
            return await continuation(details)

    return RestrictedGrpc()
