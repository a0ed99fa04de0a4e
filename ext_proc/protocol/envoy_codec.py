"""Envoy ext_proc protos <-> plain values. The only module that builds them.

Envoy sends header values either in ``value`` or (newer versions) in
``raw_value``; both are read here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

Mode = pm.ProcessingMode
ProcessingRequest = ep.ProcessingRequest
ProcessingResponse = ep.ProcessingResponse
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


def header_dict(headers: ep.HttpHeaders) -> dict[str, str]:
    """Header name (lower-case, as Envoy sends) -> value; repeated names joined by ','."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def repeated_names(headers: ep.HttpHeaders) -> frozenset[str]:
    """Header names that occur more than once. Envoy sends each occurrence as
    its own entry; ``header_dict`` joins their values with commas."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for h in headers.headers.headers:
        (repeated if h.key in seen else seen).add(h.key)
    return frozenset(repeated)


def attribute(req: ep.ProcessingRequest, name: str) -> str:
    """A string attribute Envoy attached (e.g. ``xds.route_name``), or ""."""
    attrs = req.attributes.get(ATTRIBUTES_KEY)
    if attrs is None:
        return ""
    value = attrs.fields.get(name)
    return value.string_value if value is not None else ""


def _header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def header_mutation(
    set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()
) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        set_headers=[_header_option(k, v) for k, v in (set_headers or {}).items()],
        remove_headers=list(remove),
    )


def request_headers_response(
    mutation: ep.HeaderMutation | None = None, mode: pm.ProcessingMode | None = None
) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation))
    )
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def response_headers_response(
    mode: pm.ProcessingMode | None = None, mutation: ep.HeaderMutation | None = None
) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
    if mutation is not None:
        resp.response_headers.response.header_mutation.CopyFrom(mutation)
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def request_body_response(
    new_body: bytes | None = None, set_headers: Mapping[str, str] | None = None
) -> ep.ProcessingResponse:
    common = ep.CommonResponse()
    if new_body is not None:
        common.body_mutation.body = new_body
    if set_headers:
        common.header_mutation.CopyFrom(header_mutation(set_headers))
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))


RESPONSE_BODY_CONTINUE = ep.ProcessingResponse(response_body=ep.BodyResponse())
REQUEST_TRAILERS_CONTINUE = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
RESPONSE_TRAILERS_CONTINUE = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
REQUEST_BODY_CONTINUE = ep.ProcessingResponse(request_body=ep.BodyResponse())
RESPONSE_HEADERS_CONTINUE = ep.ProcessingResponse(response_headers=ep.HeadersResponse())

# Only metered requests need bodies; others ask Envoy for nothing more.
SKIP_REST = Mode(
    request_body_mode=Mode.NONE,
    response_header_mode=Mode.SKIP,
    response_body_mode=Mode.NONE,
    request_trailer_mode=Mode.SKIP,
    response_trailer_mode=Mode.SKIP,
)
# Metered requests ask for what they need and nothing more (a mode_override
# replaces every body mode: NONE is the proto default, so each is spelled out):
# - the request body, buffered, unless the shape names the model in the path
#   and content-length gives the size;
# - response headers only when the meter reads usage from them (Bedrock
#   InvokeModel) or some policy shows its budget headers (the error bodies are
#   recognised by the meters, and the request says whether the answer streams);
# - the response body, streamed, only with response_metering: inline. With
#   observe, Envoy's observing filter sends the response to a metering stream
#   (ext_proc/protocol/handoff.py) and this stream asks for no response body.
_METERED_MODES = {
    (request_body, response_headers, response_body): Mode(
        request_body_mode=Mode.BUFFERED if request_body else Mode.NONE,
        response_header_mode=Mode.SEND if response_headers else Mode.SKIP,
        response_body_mode=Mode.STREAMED if response_body else Mode.NONE,
    )
    for request_body in (False, True)
    for response_headers in (False, True)
    for response_body in (False, True)
}


def metered_mode(
    *, request_body: bool, response_headers: bool, response_body: bool = True
) -> pm.ProcessingMode:
    """The phases a metered request asks Envoy for."""
    return _METERED_MODES[request_body, response_headers, response_body]


# The inline modes by name.
METERED = metered_mode(request_body=True, response_headers=False)
METERED_NO_REQUEST_BODY = metered_mode(request_body=False, response_headers=False)
METERED_WITH_RESPONSE_HEADERS = metered_mode(request_body=True, response_headers=True)
METERED_NO_REQUEST_BODY_WITH_RESPONSE_HEADERS = metered_mode(
    request_body=False, response_headers=True
)
STREAM_RESPONSE_BODY = Mode(response_body_mode=Mode.STREAMED)
NO_RESPONSE_BODY = Mode(response_body_mode=Mode.NONE)


def immediate_response(
    status: int, headers: Mapping[str, str], body: bytes, details: str
) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=details,
        )
    )


# "Go on unchanged", by the kind of message it answers ("" for none).
CONTINUE: dict[str, ep.ProcessingResponse] = {
    "request_headers": request_headers_response(),
    "request_body": REQUEST_BODY_CONTINUE,
    "response_headers": RESPONSE_HEADERS_CONTINUE,
    "response_body": RESPONSE_BODY_CONTINUE,
    "request_trailers": REQUEST_TRAILERS_CONTINUE,
    "response_trailers": RESPONSE_TRAILERS_CONTINUE,
    "": ep.ProcessingResponse(),
}
