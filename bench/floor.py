"""The protocol floor: an ext_proc in Python (grpc.aio on uvloop, like
spendgate's) that only answers each message, asking Envoy for the same phases
spendgate asks for on a metered JSON request (request headers, request body,
response body), and ending the stream at the last body message as spendgate
does (see ext_proc.server). Envoy in front of it shows what the ext_proc protocol itself
costs a Python process on this machine, before any of spendgate's work.

    python -m bench.floor PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from ext_proc.protocol import envoy_codec as codec

_HEADERS = codec.request_headers_response(None, codec.METERED)
_ANSWERS = {
    "request_headers": _HEADERS,
    "request_body": codec.REQUEST_BODY_CONTINUE,
    "response_headers": codec.RESPONSE_HEADERS_CONTINUE,
    "response_body": codec.RESPONSE_BODY_CONTINUE,
}


class Floor(ep_grpc.ExternalProcessorServicer):
    async def Process(
        self, request_iterator: AsyncIterator[codec.ProcessingRequest], context: object
    ) -> AsyncIterator[codec.ProcessingResponse]:
        async for req in request_iterator:
            kind = req.WhichOneof("request") or "response_headers"
            if kind == "response_body" and req.response_body.end_of_stream:
                return  # as spendgate does: the stream ends instead of a last answer
            yield _ANSWERS[kind]


async def serve(port: int) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))
