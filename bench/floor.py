"""The protocol floor: an ext_proc in Python (grpc.aio on uvloop, like
spendgate's) that does none of spendgate's work but speaks the protocol as
spendgate does on a metered JSON request (response_metering: observe): on the
admission stream it answers the request headers (asking for the request body
and nothing of the response) and the request body, then ends the stream; on
the metering stream (Envoy's observing filter) it reads every message,
answers none, and ends the stream at the response's last chunk. Envoy in
front of it shows what the ext_proc protocol itself costs a Python process
on this machine, before any of spendgate's work.

    python -m bench.floor PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from ext_proc.protocol import envoy_codec as codec

_HEADERS = codec.request_headers_response(
    None, codec.metered_mode(request_body=True, response_headers=False, response_body=False)
)


class Floor(ep_grpc.ExternalProcessorServicer):
    async def Process(
        self, request_iterator: AsyncIterator[codec.ProcessingRequest], context: object
    ) -> AsyncIterator[codec.ProcessingResponse]:
        async for req in request_iterator:
            if req.observability_mode:  # the metering stream: read, never answer
                if req.response_body.end_of_stream:
                    return
                continue
            if req.HasField("request_headers"):
                if req.request_headers.end_of_stream:
                    yield codec.request_headers_response()
                    return
                yield _HEADERS
            else:  # the request body: its answer is the last on this stream
                yield codec.REQUEST_BODY_CONTINUE
                return


async def serve(port: int) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))
