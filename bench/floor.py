"""The protocol floor: an ext_proc in Python (grpc.aio on uvloop, like
spendgate's) that does none of spendgate's work but speaks the protocol as
spendgate does (response_metering: observe): it answers the request headers
(asking for the request body and the response body), then the request body.
A JSON answer's body chunks are answered on that stream, which ends at the
last one. A stream's body answer marks the request ``x-spendgate-meter:
observe`` and ends the stream; Envoy's metering filter then sends the
response to a second stream, which the floor reads, never answers, and ends
at the response's last chunk. Envoy in front of it shows what the ext_proc
protocol itself costs a Python process on this machine, before any of
spendgate's work.

    python -m bench.floor PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from ext_proc.protocol import envoy_codec as codec
from ext_proc.protocol.processor import METER_HEADER

_HEADERS = codec.request_headers_response(None, codec.METERED)
_MARK = codec.request_body_response(None, {METER_HEADER: "observe"})
_STREAM = (b'"stream":true', b'"stream": true')


class Floor(ep_grpc.ExternalProcessorServicer):
    async def Process(
        self, request_iterator: AsyncIterator[codec.ProcessingRequest], context: object
    ) -> AsyncIterator[codec.ProcessingResponse]:
        async for req in request_iterator:
            if req.observability_mode:  # the metering stream: read, never answer
                if req.response_body.end_of_stream:
                    return
                continue
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                if req.request_headers.end_of_stream:
                    yield codec.request_headers_response()
                    return
                yield _HEADERS
            elif kind == "request_body":
                body = req.request_body.body
                if any(mark in body for mark in _STREAM):
                    yield _MARK  # the metering stream takes the response
                    return
                yield codec.REQUEST_BODY_CONTINUE
            elif kind == "response_body":
                if req.response_body.end_of_stream:
                    return  # as spendgate does: the stream ends instead of a last answer
                yield codec.RESPONSE_BODY_CONTINUE
            else:
                yield codec.CONTINUE[kind or ""]


async def serve(port: int) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))
