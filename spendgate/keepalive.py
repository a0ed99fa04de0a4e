"""HTTP/2 keepalive settings that ext_proc (client) and the control plane
(server) agree on.

ext_proc keeps a WatchState stream open that may carry nothing for hours; it
pings every ``CLIENT_PING_INTERVAL_MS`` so a dead control plane (or a NAT
that forgot the connection) is noticed within interval + timeout. gRPC's
server defaults refuse that: a ping sooner than 5 minutes after the last
data is a "strike", and after two the server sends GOAWAY
``too_many_pings`` — ext_proc then saw a broken stream ("control plane
unreachable") every couple of minutes while idle. The control plane
therefore accepts pings at half the client's interval, with or without
calls, and the client keeps pinging while no data flows.

Both values are read when a channel or server is built, so tests can shrink
them (monkeypatch this module) to run an idle stream through many pings.
"""

from __future__ import annotations

CLIENT_PING_INTERVAL_MS = 10_000
CLIENT_PING_TIMEOUT_MS = 5_000

Options = list[tuple[str, int]]


def client_options() -> Options:
    """Channel options for a long-lived stream to the control plane."""
    return [
        ("grpc.keepalive_time_ms", CLIENT_PING_INTERVAL_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging on a stream that carries no data (the default stops
        # after 2 pings, so a silently dead connection would go unnoticed).
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> Options:
    """Server options that accept ``client_options`` pings, never GOAWAY them."""
    min_interval = CLIENT_PING_INTERVAL_MS // 2
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: despite its
        # name, the server-side minimum between received pings.
        ("grpc.http2.min_ping_interval_without_data_ms", min_interval),
        ("grpc.http2.max_ping_strikes", 2),
    ]
