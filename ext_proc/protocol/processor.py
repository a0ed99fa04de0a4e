"""One processor per HTTP request: the ext_proc protocol as a small state machine.

Envoy sends, in order, whichever phases the filter config and our
mode_overrides ask for: request headers, request body, response headers,
response body chunks (trailers only if configured). Each message gets exactly
one answer. Nothing here awaits: the whole per-message path is synchronous
and allocation-light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from time import perf_counter_ns
from typing import Any, TypeAlias

import orjson
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.admission import api_keys, identity, windows
from ext_proc.admission.decide import Rejection, SpendKey, decide, rejection, shadowed
from ext_proc.admission.estimate import max_tokens_of, per_window
from ext_proc.metering.charge import Charged, charge
from ext_proc.metering.coverage import method_label, path_template
from ext_proc.metering.decoding import SUPPORTED as DECODABLE
from ext_proc.metering.decoding import BodyDecoder
from ext_proc.metering.meters.base import Meter, MeterResult, estimate_tokens_from_chars
from ext_proc.metering.shapes import (
    NEVER_BILLABLE_METHODS,
    ApiShape,
    detect,
    dialect_for,
    stream_flag,
    streams_by_path,
)
from ext_proc.protocol import budget_headers, dialects
from ext_proc.protocol import envoy_codec as codec
from ext_proc.protocol.context import Context, Holds
from ext_proc.protocol.reject import error_code, rejection_headers, rejection_message
from ext_proc.stats import (
    IDENTITY_REQUIRED,
    INVALID_IDENTITY,
    INVALID_MODEL,
    INVALID_PATH,
    MODEL_NOT_PRICED,
    UNMETERED_REQUEST,
)
from spendgate.domain.limits import MAX_MODEL_BYTES, MAX_PATH_BYTES
from spendgate.domain.policies import Match, RequestFacts, hash_api_key
from spendgate.domain.pricing import cost_nanos
from spendgate.domain.usage import Usage

log = structlog.get_logger("spendgate.ext_proc")
Reply: TypeAlias = "ep.ProcessingResponse | Awaitable[ep.ProcessingResponse]"
_MAX_CONTENT_LENGTH = 1 << 40  # a larger content-length is not believed
# Set on a request whose response the metering filter is to observe: Envoy's
# matcher around that filter skips it for any other request (envoy/envoy.yaml),
# and the route removes the header before the provider.
METER_HEADER = "x-spendgate-meter"


class RequestProcessor:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.shape: ApiShape | None = None
        self.facts = RequestFacts()
        self.matches: list[Match] = []
        self.request_model = ""
        self.request_bytes = 0
        self.content_length_sent = False
        self.body_parts: list[bytes] = []
        self.meter: Meter | None = None
        self.path = ""
        self.path_model: str | None = None
        self.decoder: BodyDecoder | None = None
        self.stream_requested = False
        self.held: Holds | None = None
        self.done = False  # charged (or decided there is nothing to charge)
        # The request went on to the provider (unless refused since): its
        # prompt is charged even if no answer ever comes back.
        self.forwarded = False
        # Envoy's x-request-id (also in its access log); only ever read to log.
        self.request_id = ""
        self.rejected = False  # answered by ext_proc itself (429 or 403)
        # Windows of SHADOW policies that would have refused this request,
        # counted once each however often the request is decided.
        self.would_reject: set[SpendKey] = set()
        # Envoy sends nothing more on this stream once this message is answered.
        self.last = False
        # response_metering: observe. Handed to the metering stream (parked by
        # ext_proc/protocol/handoff.py), which meters the response and ends it;
        # the admission stream then only answers response headers, if it asked.
        self.parked = False
        # Its response goes to the metering stream (a stream, with
        # response_metering: observe); else it is metered on this one.
        self.observed = False
        self.asked_response_headers = False
        # Restored on this worker from another's handoff: that one's token
        # (it holds the request until told "end"; ext_proc/protocol/handoff.py).
        self.handoff_from = ""
        # Set with handoff_from: hands what the meter read to the admitting
        # worker, which charges it and ends its hold in one step. False when
        # that worker cannot be told: the response is then charged here.
        self.charge_elsewhere: Callable[[RequestProcessor, MeterResult, bool], bool] | None = None

    # ---- dispatch -------------------------------------------------------------

    def handle(self, req: codec.ProcessingRequest) -> Reply:
        """The answer, or (rarely: a request the control plane must admit) an
        awaitable of it."""
        started = perf_counter_ns()
        kind = req.WhichOneof("request")
        self.ctx.stats.messages += 1
        if kind == "response_body" and req.response_body.end_of_stream:
            self.last = True
        try:
            if kind == "request_headers":
                return self.on_request_headers(req)
            if kind == "request_body":
                return self.on_request_body(req.request_body)
            if kind == "response_headers":
                return self.on_response_headers(req.response_headers)
            if kind == "response_body":
                return self.on_response_body(req.response_body)
        except Exception:
            # A bug must never break the client's request: answer "continue".
            self.ctx.stats.internal_errors += 1
            log.exception(
                "ext_proc error; request continues unchanged",
                phase=kind,
                request_id=self.request_id,
            )
        finally:
            self.ctx.stats.observe_message(kind, perf_counter_ns() - started)
        return codec.CONTINUE[kind or ""]

    # ---- request ------------------------------------------------------------

    def on_request_headers(self, req: codec.ProcessingRequest) -> Reply:
        h = codec.header_dict(req.request_headers)
        method = h.get(":method", "")
        self.path = h.get(":path", "")
        self.request_id = h.get("x-request-id", "")
        self.shape = detect(method, self.path)
        if len(self.path) > MAX_PATH_BYTES:  # headers are ASCII: characters are bytes
            return self._refuse_identity(
                400, INVALID_PATH, "", f"The request path is longer than {MAX_PATH_BYTES} bytes."
            )
        if self.shape is not None and self.shape.model_from_path is not None:
            self.path_model = self.shape.model_from_path(self.path)
            if self.path_model and (refused := self._refuse_model(self.path_model)):
                return refused
        self.content_length_sent = "content-length" in h
        route = codec.attribute(req, "xds.route_name")
        repeated = codec.repeated_names(req.request_headers)
        creds = api_keys.read(route, h, repeated, self.path)
        if creds.error:
            return self._refuse(creds.error, route)
        reader = self.ctx.callers
        try:
            caller = reader.read(req, h, repeated)
        except identity.MemberInvalid as e:
            return self._refuse_identity(400, INVALID_IDENTITY, "", f"{e}.")
        if caller.untrusted_headers:
            self._note_untrusted(req)
        self.facts = RequestFacts(
            route=route,
            user=caller.user,
            api_key_hash=hash_api_key(creds.key) if creds.key else "",
            workspace=caller.workspace,
            provider=self.shape.provider if self.shape else "",
            model=self.path_model.lower() if self.path_model else "",
            tags=caller.tags,
            service=caller.service,
        )
        index = self.ctx.state.index
        self.facts, unidentified = reader.settle_missing(self.facts, index)
        if self.path_model:
            self.request_model = self.path_model
        self.matches = index.matches(self.facts)
        billable = method not in NEVER_BILLABLE_METHODS
        if billable:
            if unidentified:
                policy, lacking = unidentified[0]
                return self._refuse_identity(
                    403,
                    IDENTITY_REQUIRED,
                    policy.id,
                    f"spendgate budget '{policy.name}' applies to each {lacking}, and this "
                    f"request names no {lacking}; it was refused (missing_identity: reject).",
                )
            rejected = self._refuse_unmetered(method) or self._decide() or self._check_priced()
            if rejected is not None:
                return rejected
        # The identity headers never reach the provider, whatever they are named.
        own = reader.header_names
        remove = [k for k in h if k.startswith("x-spendgate-") or k in own]
        if self.shape is None:
            self.done = True
            self.last = True  # SKIP_REST: Envoy asks nothing more
            if billable:
                self._count_unmetered(method)
            return codec.request_headers_response(
                codec.header_mutation(remove=remove) if remove else None, codec.SKIP_REST
            )
        # Ask for an uncompressed response so it can be metered as it streams.
        remove.append("accept-encoding")
        return self._meter_request(h, req.request_headers.end_of_stream, remove)

    def _meter_request(self, h: dict[str, str], bodyless: bool, remove: list[str]) -> Reply:
        """The answer to the headers of a request of a metered shape.

        Shapes that name the model in the path (Gemini, Bedrock) want their
        body only for its size: the input a cut stream is charged when the
        provider never reported it, and the size of the request's hold. The
        ``content-length`` header gives that size, so the body is not
        buffered: buffering would cost a round trip to ext_proc before the
        request leaves Envoy, on every request, and the official SDKs send
        ``content-length`` with their JSON bodies. A chunked request has
        none; its body is then read for its size.

        A request with no body at all is admission-checked (done already) and
        its answer metered like any other: the provider most likely refuses
        it, at no cost, but whatever it bills is charged.
        """
        assert self.shape is not None
        shape = self.shape
        read_body = not bodyless and (shape.needs_request_body or not self._size_from(h))
        if bodyless and shape.needs_request_body:
            self.ctx.stats.unparsed_requests += 1
        # Budget headers for clients go on the response headers: ask for
        # them when some policy shows its budget (decided here, as the mode
        # can only change now).
        exposes = self.ctx.state.index.exposes
        observe = (
            not read_body
            and not bodyless
            and not self.ctx.settings.meters_inline
            and streams_by_path(self.path)
        )
        set_headers = None
        if observe:
            # A stream, said by its path: the metering stream gets the
            # response (headers included); this one at most its headers.
            self.observed = True
            set_headers = {METER_HEADER: "observe"}
            mode = codec.metered_mode(
                request_body=False, response_headers=exposes, response_body=False
            )
            self.asked_response_headers = exposes
        else:
            # Metered here (a JSON answer, one chunk or two: holding it for
            # one answer costs less than a second stream), unless the body
            # says the answer streams: then the metering stream takes it and
            # this one ends (ext_proc/protocol/handoff.py).
            self.asked_response_headers = shape.needs_response_headers or exposes
            mode = codec.metered_mode(
                request_body=read_body, response_headers=self.asked_response_headers
            )
        reply = codec.request_headers_response(
            codec.header_mutation(set_headers, remove=remove), mode
        )
        self.forwarded = not read_body
        if not read_body and self._reserve(None):
            return self._arbitrate(reply)
        return reply

    def _size_from(self, h: dict[str, str]) -> bool:
        """Take the request body's size from ``content-length``; False when
        there is no plausible one."""
        value = h.get("content-length", "").strip()
        if not (value.isascii() and value.isdigit()) or int(value) > _MAX_CONTENT_LENGTH:
            return False
        self.request_bytes = int(value)
        return True

    def _refuse_unmetered(self, method: str) -> codec.ProcessingResponse | None:
        """With ``unmetered_requests: reject``, refuse a request of no metered
        shape: 403 in the dialect its path suggests, naming the path."""
        if self.shape is not None or self.ctx.settings.unmetered_requests != "reject":
            return None
        self.done = True
        self.rejected = self.last = True
        self.ctx.stats.count_rejection("", UNMETERED_REQUEST)
        path = self.path.split("?", 1)[0][:256]
        log.info(
            "rejected",
            reason=UNMETERED_REQUEST,
            request_id=self.request_id,
            route=self.facts.route,
            method=method_label(method),
            path=path_template(self.path),
        )
        reply = dialect_for(self.facts.route, self.path)(
            403,
            UNMETERED_REQUEST,
            f"spendgate cannot meter {method_label(method)} {path}, and this gateway refuses "
            "requests it cannot charge to a budget (unmetered_requests: reject).",
        )
        headers = {**reply.headers, "x-spendgate-error": UNMETERED_REQUEST}
        return codec.immediate_response(
            reply.status, headers, reply.body, "spendgate_unmetered_request"
        )

    def _count_unmetered(self, method: str) -> None:
        """Count a request of no metered shape let through; log its path once."""
        route, label = self.facts.route, method_label(method)
        self.ctx.stats.count_unmetered(route, label)
        paths = self.ctx.unmetered_paths
        template = path_template(self.path)
        if paths.first_time(route, label, template):
            log.warning(
                "request of no metered API admitted, not charged (logged once per path)",
                route=route,
                method=label,
                path=template,
                request_id=self.request_id,
            )
        elif paths.full and not paths.full_reported:
            paths.full_reported = True
            log.warning(
                "too many distinct unmetered paths; new ones are counted, no longer logged",
                limit=paths.limit,
            )

    def on_request_body(self, body: Any) -> Reply:
        if not body.end_of_stream:  # only when Envoy streams the request body
            self.body_parts.append(body.body)
            return codec.REQUEST_BODY_CONTINUE
        data = b"".join((*self.body_parts, body.body)) if self.body_parts else body.body
        self.body_parts = []
        self.request_bytes = len(data)
        self.forwarded = True
        parsed = None
        if self.shape is None or self.shape.needs_request_body:
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                # The provider will answer 400; an error costs nothing.
                # Metering still runs on the response in case it does not.
                self.ctx.stats.unparsed_requests += 1
                log.debug("request body is not a JSON object; passed through unchanged")
        if not isinstance(parsed, dict):  # (or read only for its size)
            rejected = self._decide()
            if rejected is not None:
                return rejected
            if self._reserve(None):
                return self._arbitrate(codec.REQUEST_BODY_CONTINUE)
            return codec.REQUEST_BODY_CONTINUE
        # The meters tell a stream from a JSON body by the response itself;
        # the flag is for preparing the request (and a hint to the meter).
        self.stream_requested = stream_flag(parsed.get("stream"))
        model = parsed.get("model")
        if isinstance(model, str) and (refused := self._refuse_model(model)):
            return refused
        if isinstance(model, str) and model:
            self.request_model = model
            self.facts = dataclasses.replace(self.facts, model=model.lower())
            if self.ctx.state.index.needs_model:
                self.matches = self.ctx.state.index.matches(self.facts)
        # Decide again now: requests admitted since the headers hold
        # reservations, and the model may bring MODEL policies.
        rejected = self._decide() or self._check_priced()
        if rejected is not None:
            return rejected
        assert self.shape is not None
        contested = self._reserve(parsed)
        new = None
        set_headers = {}
        if self.shape.prepare_request(parsed):
            new = orjson.dumps(parsed)
            if self.content_length_sent:
                set_headers["content-length"] = str(len(new))
        if self.stream_requested and not self.ctx.settings.meters_inline:
            # A stream: Envoy's metering filter runs for it (the header turns
            # it on; the route removes it before the provider).
            self.observed = True
            set_headers[METER_HEADER] = "observe"
        if new is None and not set_headers:
            reply = codec.REQUEST_BODY_CONTINUE
        else:
            reply = codec.request_body_response(new, set_headers)
        return self._arbitrate(reply) if contested else reply

    def _decide(self) -> codec.ProcessingResponse | None:
        if not self.matches:
            return None
        now = self.ctx.clock()
        self._count_shadowed(self.ctx.state.spent, now)
        r = decide(self.matches, self.ctx.state.spent, now, self.ctx.state.held)
        if r is None:
            return None
        self.done = True
        return self._reject(r, now)

    def _count_shadowed(self, spent: Callable[[SpendKey], int], now: datetime) -> None:
        """Count this request against each SHADOW policy that would refuse it
        (whatever an enforced policy decides: a shadow counts what it would
        do, as its enforced twin would)."""
        keys = [k for k in shadowed(self.matches, spent, now) if k not in self.would_reject]
        if not keys:
            return
        self.would_reject.update(keys)
        self.ctx.state.count_would_reject(keys)
        for key in keys:
            self.ctx.stats.count_shadow_rejection(key[0])
        log.info(
            "shadow policy would have rejected",
            request_id=self.request_id,
            policy_ids=[k[0] for k in keys],
        )

    def _reject(self, r: Rejection, now: datetime) -> codec.ProcessingResponse:
        """The 429 for ``r``, which tells spent from held (see decide)."""
        self.rejected = self.last = True
        reason = error_code(r)
        self.ctx.stats.count_rejection(r.policy.id, reason)
        # Where running requests hold part of it, the line says how much.
        in_flight = (
            {"held_nanos": r.held_nanos, "held_requests": r.held_requests} if r.held_nanos else {}
        )
        log.info(
            "rejected",
            reason=reason,
            request_id=self.request_id,
            policy_id=r.policy.id,
            member=r.member if r.member else None,
            reset=r.window.end.isoformat(),
            **in_flight,
        )
        dialect = self.shape.dialect if self.shape else dialect_for(self.facts.route, self.path)
        reply = dialect(429, reason, rejection_message(r))
        headers = rejection_headers(r, now, held_retry_after_s=self.ctx.settings.held_retry_after_s)
        return codec.immediate_response(
            reply.status, {**reply.headers, **headers}, reply.body, f"spendgate_{reason}"
        )

    def _refuse_model(self, model: str) -> codec.ProcessingResponse | None:
        """400 for a model name over MAX_MODEL_BYTES: it would become a
        member, a log value and a usage record of any size."""
        size = len(model.encode(errors="replace"))
        if size <= MAX_MODEL_BYTES:
            return None
        return self._refuse_identity(
            400,
            INVALID_MODEL,
            "",
            f"The model name is {size} bytes long; spendgate accepts at most "
            f"{MAX_MODEL_BYTES} bytes (UTF-8).",
        )

    def _note_untrusted(self, req: codec.ProcessingRequest) -> None:
        """Count identity headers that were ignored; warn the first time (a
        trusted hop missing from trusted_header_sources shows up here)."""
        self.ctx.stats.untrusted_identity_headers += 1
        if not self.ctx.warned_untrusted:
            self.ctx.warned_untrusted = True
            log.warning(
                "identity headers from an untrusted source are ignored (logged once); "
                "list the source in trusted_header_sources if it is a trusted hop",
                source=codec.attribute(req, identity.SOURCE_ATTRIBUTE),
                peer=codec.attribute(req, identity.PEER_ATTRIBUTE) or None,
                request_id=self.request_id,
            )

    def _refuse_identity(
        self, status: int, reason: str, policy_id: str, message: str
    ) -> codec.ProcessingResponse:
        """Answer a request whose caller is invalid (400) or missing (403)
        in the client's dialect; the provider is never called."""
        self.done = True
        self.rejected = self.last = True
        self.ctx.stats.count_rejection(policy_id, reason)
        log.info(
            "rejected",
            reason=reason,
            request_id=self.request_id,
            policy_id=policy_id or None,
            detail=message,
        )
        dialect = self.shape.dialect if self.shape else dialects.openai
        reply = dialect(status, reason, message)
        headers = {**reply.headers, "x-spendgate-error": reason}
        return codec.immediate_response(reply.status, headers, reply.body, f"spendgate_{reason}")

    def _refuse(self, error: str, route: str) -> codec.ProcessingResponse:
        """400: which API key the provider would bill is ambiguous (admission/api_keys.py)."""
        self.done = self.rejected = self.last = True
        self.ctx.stats.count_rejection("", api_keys.REJECT_REASON)
        log.info("rejected", reason=api_keys.REJECT_REASON, error=error, request_id=self.request_id)
        dialect = self.shape.dialect if self.shape else dialects.for_route(route)
        reply = api_keys.refusal(error, dialect)
        return codec.immediate_response(
            reply.status, reply.headers, reply.body, f"spendgate_{api_keys.REJECT_REASON}"
        )

    def _check_priced(self) -> codec.ProcessingResponse | None:
        """With ``unpriced_models: reject``, refuse a model spendgate cannot price."""
        prices = self.ctx.prices
        if prices.unpriced != "reject" or not self.request_model or self.shape is None:
            return None
        if prices.lookup(self.request_model, self.facts.provider, self.facts.route):
            return None
        self.done = True
        self.rejected = self.last = True
        self.ctx.stats.count_rejection("", MODEL_NOT_PRICED)
        log.warning(
            "rejected",
            reason="model_not_priced",
            request_id=self.request_id,
            model=self.request_model,
        )
        reply = self.shape.dialect(
            403,
            "model_not_priced",
            f"spendgate has no price for model '{self.request_model}', so it cannot be "
            "budgeted; ask an administrator to set one.",
        )
        headers = {**reply.headers, "x-spendgate-error": "model_not_priced"}
        return codec.immediate_response(
            reply.status, headers, reply.body, "spendgate_model_not_priced"
        )

    # ---- response -------------------------------------------------------------

    def on_response_headers(self, headers: Any) -> codec.ProcessingResponse:
        h = codec.header_dict(headers)
        if self.parked:  # only asked for budget headers; metering is elsewhere
            self.last = True
            reply = codec.RESPONSE_HEADERS_CONTINUE
        else:
            reply = self._meter_response_headers(headers, h)
        # Budget headers: nobody else's pass (a provider's, a hop's), ours
        # are set on an admitted request's answer.
        remove = budget_headers.foreign(h)
        show = (
            budget_headers.budget_headers(self.matches, self.ctx.state.spent, self.ctx.clock())
            if self.matches and not self.rejected
            else {}
        )
        if not remove and not show:
            return reply
        out = ep.ProcessingResponse()
        out.CopyFrom(reply)
        out.response_headers.response.header_mutation.CopyFrom(codec.header_mutation(show, remove))
        return out

    def _meter_response_headers(self, headers: Any, h: dict[str, str]) -> codec.ProcessingResponse:
        if self.done or self.shape is None:
            return codec.RESPONSE_HEADERS_CONTINUE
        status = int(h.get(":status", "0") or 0)
        if not 200 <= status < 300:
            self.done = True  # errors carry no usage and cost nothing
            return codec.RESPONSE_HEADERS_CONTINUE
        encoding = h.get("content-encoding", "identity").strip().lower()
        if encoding in DECODABLE:
            self.decoder = BodyDecoder(encoding)
        elif encoding not in ("", "identity"):
            self.done = True
            self.ctx.stats.unmetered_responses += 1
            log.warning(
                "response is compressed in a way spendgate cannot decode; not metered",
                encoding=encoding,
                model=self.request_model,
                request_id=self.request_id,
            )
            return codec.RESPONSE_HEADERS_CONTINUE
        self.meter = self.shape.new_meter(self.path, h.get("content-type", ""), self.path_model, h)
        if headers.end_of_stream:
            self._finish(aborted=False)
            return codec.RESPONSE_HEADERS_CONTINUE
        return codec.response_headers_response(codec.STREAM_RESPONSE_BODY)

    def on_response_body(self, body: Any) -> codec.ProcessingResponse:
        if self.done or self.shape is None:
            return codec.RESPONSE_BODY_CONTINUE
        if self.meter is None:  # response headers were skipped: start here
            self._start_meter(body.body)
        assert self.meter is not None
        self.meter.feed(self.decoder.decode(body.body) if self.decoder else body.body)
        if body.end_of_stream:
            self._finish(aborted=False)
        return codec.RESPONSE_BODY_CONTINUE

    def _start_meter(self, first: bytes) -> None:
        """Meter a response whose headers ext_proc did not ask for.

        The request told whether the answer streams; a provider that compresses
        although accept-encoding was removed is recognised by the magic bytes.
        """
        assert self.shape is not None
        if first[:2] == b"\x1f\x8b":
            self.decoder = BodyDecoder("gzip")
        elif len(first) > 1 and first[0] == 0x78 and (first[0] * 256 + first[1]) % 31 == 0:
            self.decoder = BodyDecoder("deflate")
        content_type = "text/event-stream" if self.stream_requested else "application/json"
        self.meter = self.shape.new_meter(self.path, content_type, self.path_model, {})

    def _reserve(self, body: dict[str, Any] | None) -> bool:
        """Hold this request's estimated cost against its REJECT windows until
        it ends, so concurrent requests cannot together overshoot a budget:
        a request is admitted only while spent + held < limit.

        True when a window is near its line (room for fewer than
        ``arbiter_headroom_requests`` more such requests): then the control
        plane, which sees every data plane's holds, must admit the request.
        """
        s = self.ctx.settings
        if not s.reservations:
            return False
        now = self.ctx.clock()
        # A SHADOW policy holds nothing: a hold could block (here or, through
        # the control plane's Reserve, on another data plane).
        rejecting = [(p, m) for p, m in self.matches if p.enforces]
        if not rejecting:
            return False
        keys = [(p.id, m, windows.current(p.window, now)[1]) for p, m in rejecting]
        price = self.ctx.prices.for_charge(
            self.request_model, self.facts.provider, self.facts.route
        )
        if price is None:
            return False
        # The plausible cost: output as this model produced on this route
        # recently (ext_proc/admission/estimate.py), never more than the request's
        # own max_tokens; held on each window up to its policy's amount.
        assert self.ctx.estimator is not None
        output = self.ctx.estimator.estimate(
            (price.model, self.facts.route), max_tokens_of(body) if body is not None else None
        )
        estimate = Usage(
            input_tokens=estimate_tokens_from_chars(self.request_bytes), output_tokens=output
        )
        amount = cost_nanos(estimate, price)
        holds = list(
            zip(keys, per_window(amount, (p.amount_nanos for p, _ in rejecting)), strict=True)
        )
        self.held = holds
        state = self.ctx.state
        state.reserve(holds)
        n = s.arbiter_headroom_requests
        return self.ctx.arbiter is not None and any(
            p.amount_nanos - state.spent(k) < held * n
            for (p, _), (k, held) in zip(rejecting, holds, strict=True)
        )

    async def _arbitrate(self, admitted: codec.ProcessingResponse) -> codec.ProcessingResponse:
        """Let the control plane admit this request (its holds are in place);
        ``admitted`` is the answer to give Envoy if it does. A bug here never
        breaks the client's request: it continues, as in ``handle``."""
        try:
            return await self._ask_arbiter(admitted)
        except Exception:
            self.ctx.stats.internal_errors += 1
            log.exception("ext_proc error; request continues", request_id=self.request_id)
            return admitted

    async def _ask_arbiter(self, admitted: codec.ProcessingResponse) -> codec.ProcessingResponse:
        assert self.held is not None and self.ctx.arbiter is not None
        try:
            answer = await self.ctx.arbiter(self.held)
        except Exception:
            self.ctx.stats.internal_errors += 1
            log.exception(
                "arbitration failed; decided on the local view", request_id=self.request_id
            )
            answer = None
        outcomes = self.ctx.stats.arbitrations
        if answer is None:
            outcomes["unanswered"] += 1
            return self._decide_again_locally(admitted)
        if answer.admitted:
            outcomes["admitted"] += 1
            return admitted
        outcomes["rejected"] += 1
        self._release()
        self.done = True
        now = self.ctx.clock()
        for policy, member in self.matches:
            if policy.id == answer.policy_id and member == answer.member:
                window, start = windows.current(policy.window, now)
                key = (policy.id, member, start)
                state = self.ctx.state
                return self._reject(
                    rejection(policy, member, window, state.spent(key), state.held(key)), now
                )
        return admitted  # the policy changed meanwhile: nothing to name, admit

    def _decide_again_locally(self, admitted: codec.ProcessingResponse) -> codec.ProcessingResponse:
        """No answer from the control plane in time: decide on this data
        plane's view as it is now, which counts the holds of the requests
        admitted meanwhile (this request's own estimate left out, so that the
        request that crosses the line still completes)."""
        assert self.held is not None
        own = dict(self.held)
        state = self.ctx.state
        now = self.ctx.clock()
        self._count_shadowed(state.spent, now)

        def held(k: SpendKey) -> tuple[int, int]:
            nanos, requests = state.held(k)
            return (nanos - own[k], requests - 1) if k in own else (nanos, requests)

        r = decide(self.matches, lambda k: state.spent(k) - own.get(k, 0), now, held)
        if r is None:
            return admitted
        self._release()
        self.done = True
        return self._reject(r, now)

    def _release(self) -> None:
        if self.held is not None:
            self.ctx.state.release(self.held)
            self.held = None

    # ---- response_metering: observe ---------------------------------------------

    def handoff_due(self) -> bool:
        """Whether this admission stream has just let a metered request go to
        the provider, whose response a metering stream meters."""
        return (
            self.forwarded
            and self.observed
            and self.shape is not None
            and not (self.done or self.rejected or self.parked)
        )

    def observe(self, req: codec.ProcessingRequest) -> None:
        """A message of the metering stream (Envoy's observing filter): read,
        never answered. A bug never breaks metering of the next request."""
        kind = req.WhichOneof("request")
        self.ctx.stats.observed_messages += 1
        try:
            if self.done:
                return
            if kind == "response_headers":
                headers = req.response_headers
                self._meter_response_headers(headers, codec.header_dict(headers))
            elif kind == "response_body":
                self.on_response_body(req.response_body)
        except Exception:
            self.ctx.stats.internal_errors += 1
            log.exception("ext_proc error while metering", phase=kind, request_id=self.request_id)

    def expire_handoff(self) -> None:
        """No metering stream took this request here in time: release its
        holds (whoever meters it holds its own)."""
        self._release()

    # ---- the end ----------------------------------------------------------------

    def close(self) -> None:
        """The stream with Envoy ended. A response cut short is still charged
        (by its metering stream, when it was handed to one)."""
        if not self.rejected:
            self.ctx.stats.admitted_requests += 1
        if not self.parked:
            self.end()

    def end(self) -> None:
        """Nothing more comes for this request: release its holds, and charge
        a response cut short (or never begun) for what it cost."""
        self._release()
        unanswered = self.meter is None and self.forwarded and self.shape is not None
        if unanswered and not self.done and not self.rejected:
            # No answer came back (the client gave up first, a timeout, the
            # connection broke): a retry storm of timed-out requests is billed
            # by the provider all the same. Meter an empty, cut response: its
            # input is charged, estimated from the request's size.
            self._start_meter(b"")
        if self.meter is not None and not self.done:
            try:
                self._finish(aborted=True)
            except Exception:
                self.ctx.stats.internal_errors += 1
                log.exception("could not charge an aborted response", request_id=self.request_id)

    def _finish(self, *, aborted: bool) -> None:
        assert self.meter is not None
        self.done = True
        result = self.meter.finish(aborted=aborted)
        if self.charge_elsewhere is not None and self.charge_elsewhere(self, result, aborted):
            return
        self.settle(result, aborted=aborted)

    def settle(self, result: MeterResult, *, aborted: bool) -> None:
        """Charge what the meter read; the real cost (or none) replaces the
        estimate held since admission, in one step."""
        self.done = True
        self._release()
        charge(
            self.ctx,
            result,
            Charged(
                self.request_model,
                self.request_bytes,
                self.facts,
                self.matches,
                self.shape.name if self.shape is not None else "",
                self.request_id,
            ),
            aborted=aborted,
        )
