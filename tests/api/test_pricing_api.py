"""PricingService through a real grpc.aio control plane: effective prices,
overrides set and deleted, validation naming fields, roles, and overrides
pushed to data planes on the state stream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import pricing_pb2_grpc
from tests.api.apiserver import ADMIN, DATA, READ, TIMEOUT, Api, running_api


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with running_api(f"sqlite:///{tmp_path}/spendgate.db") as a:
        yield a


def stub(api: Api) -> pricing_pb2_grpc.PricingServiceStub:
    return pricing_pb2_grpc.PricingServiceStub(api.channel)


def override(model: str = "gpt-4o", note: str = "", **price: str) -> pp.SetPriceOverrideRequest:
    price = {"input": "1.5", "output": "6", **price}
    return pp.SetPriceOverrideRequest(
        override=pp.PriceOverride(model=model, note=note, price=pp.Price(**price))
    )


def violations(e: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    assert status is not None
    out = []
    for d in status.details:
        bad = error_details_pb2.BadRequest()
        if d.Unpack(bad):
            out += [v.field for v in bad.field_violations]
    return out


def test_catalog_prices_are_listed_with_their_source(api: Api) -> None:
    resp = stub(api).ListPrices(
        pp.ListPricesRequest(provider="openai", model_contains="gpt-4o-mini"),
        metadata=READ,
        timeout=TIMEOUT,
    )
    [mini] = [p for p in resp.prices if p.model == "gpt-4o-mini"]
    assert (mini.price.input, mini.price.output, mini.price.cached_input) == (
        "0.15",
        "0.6",
        "0.075",
    )
    assert mini.source.startswith("https://") and mini.checked and not mini.override_id


def test_an_override_replaces_the_catalog_price_and_is_pushed(api: Api) -> None:
    stream = api.dataplane.WatchState(
        dp.WatchStateRequest(data_plane_id="dp"), metadata=DATA, timeout=TIMEOUT
    )
    first = next(stream)
    assert first.full_snapshot and list(first.price_overrides.overrides) == []
    created = stub(api).SetPriceOverride(
        override(note="negotiated"), metadata=ADMIN, timeout=TIMEOUT
    )
    assert created.id.startswith("po_") and created.updated_by == "admin"
    assert (created.model, created.price.input, created.note) == ("gpt-4o", "1.5", "negotiated")
    pushed = next(stream)
    assert [o.id for o in pushed.price_overrides.overrides] == [created.id]
    listed = stub(api).ListPrices(
        pp.ListPricesRequest(provider="openai", model_contains="gpt-4o"),
        metadata=READ,
        timeout=TIMEOUT,
    )
    [gpt4o] = [p for p in listed.prices if p.model == "gpt-4o"]
    assert (gpt4o.price.input, gpt4o.source, gpt4o.override_id) == ("1.5", "override", created.id)
    # Setting the same (model, provider, route) again replaces it.
    again = stub(api).SetPriceOverride(override(input="2"), metadata=ADMIN, timeout=TIMEOUT)
    assert again.id == created.id and again.price.input == "2"
    assert [o.price.input for o in next(stream).price_overrides.overrides] == ["2"]
    stub(api).DeletePriceOverride(
        pp.DeletePriceOverrideRequest(id=created.id), metadata=ADMIN, timeout=TIMEOUT
    )
    assert list(next(stream).price_overrides.overrides) == []
    stream.cancel()


def test_route_specific_override_and_unknown_model_are_listed_apart(api: Api) -> None:
    s = stub(api)
    req = override("my-llama-70b", input="0.2", output="0.2")
    local = s.SetPriceOverride(req, metadata=ADMIN, timeout=TIMEOUT)
    routed = override()
    routed.override.route = "azure-openai"
    r = s.SetPriceOverride(routed, metadata=ADMIN, timeout=TIMEOUT)
    prices = s.ListPrices(
        pp.ListPricesRequest(page_size=1000), metadata=READ, timeout=TIMEOUT
    ).prices
    extra = {(p.model, p.route, p.override_id) for p in prices if p.source == "override"}
    assert extra == {("my-llama-70b", "", local.id), ("gpt-4o", "azure-openai", r.id)}
    catalog_gpt4o = [p for p in prices if p.model == "gpt-4o" and p.source != "override"]
    assert catalog_gpt4o and catalog_gpt4o[0].price.input == "2.5"


@pytest.mark.parametrize(
    ("req", "fields"),
    [
        pytest.param(override(model=""), ["override.model"], id="no-model"),
        pytest.param(override(input="-1"), ["override.price.input"], id="negative-input"),
        pytest.param(override(output="ten"), ["override.price.output"], id="not-a-number"),
        pytest.param(override(input=""), ["override.price.input"], id="missing-input"),
        pytest.param(pp.SetPriceOverrideRequest(), ["override"], id="no-override"),
    ],
)
def test_invalid_override_names_the_field(
    api: Api, req: pp.SetPriceOverrideRequest, fields: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub(api).SetPriceOverride(req, metadata=ADMIN, timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert violations(e.value) == fields
    assert (
        stub(api)
        .ListPriceOverrides(pp.ListPriceOverridesRequest(), metadata=ADMIN, timeout=TIMEOUT)
        .overrides
        == []
    )


def test_roles_and_unknown_ids(api: Api) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub(api).SetPriceOverride(override(), metadata=READ, timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as e:
        stub(api).DeletePriceOverride(
            pp.DeletePriceOverrideRequest(id="po_nope"), metadata=ADMIN, timeout=TIMEOUT
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as e:
        stub(api).ListPrices(
            pp.ListPricesRequest(page_token="garbage"), metadata=READ, timeout=TIMEOUT
        )
    assert violations(e.value) == ["page_token"]


def test_pages_join_up(api: Api) -> None:
    s = stub(api)
    everything = s.ListPrices(
        pp.ListPricesRequest(page_size=1000), metadata=READ, timeout=TIMEOUT
    ).prices
    got, token = [], ""
    while True:
        resp = s.ListPrices(
            pp.ListPricesRequest(page_size=40, page_token=token), metadata=READ, timeout=TIMEOUT
        )
        got += list(resp.prices)
        token = resp.next_page_token
        if not token:
            break
    assert got == list(everything) and len(got) >= 145


@pytest.mark.parametrize("field", ["input", "output", "cached_input"])
def test_a_price_above_the_bound_is_refused_naming_field_and_bound(db_url: str, field: str) -> None:
    """$1e30 per million tokens used to be accepted and then overflowed every
    usage batch that priced with it (issue 12)."""
    with running_api(db_url) as api:
        with pytest.raises(grpc.RpcError) as e:
            stub(api).SetPriceOverride(override(**{field: "1e30"}), metadata=ADMIN, timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert violations(e.value) == [f"override.price.{field}"]
        assert "at most 100000 USD per million tokens" in e.value.details()  # type: ignore[attr-defined]
        # The bound itself is a valid price.
        ok = stub(api).SetPriceOverride(
            override(**{field: "100000"}), metadata=ADMIN, timeout=TIMEOUT
        )
        assert getattr(ok.price, field) == "100000"


def test_etags_refuse_a_stale_write(api: Api) -> None:
    def call(method: str, request: object) -> pp.PriceOverride:
        return getattr(stub(api), method)(request, metadata=ADMIN, timeout=TIMEOUT)  # type: ignore[no-any-return]

    def aborted(method: str, request: object) -> str:
        with pytest.raises(grpc.RpcError) as e:
            call(method, request)
        assert e.value.code() == grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
        return e.value.details()  # type: ignore[attr-defined,no-any-return]

    first = call("SetPriceOverride", override(note="a"))
    assert first.etag and first.apply_marker == ""
    marked = override(note="b")
    marked.override.apply_marker = "apply"
    second = call("SetPriceOverride", marked)
    assert second.etag != first.etag and second.apply_marker == "apply"
    stale = override(note="c")
    stale.override.etag = first.etag
    assert "changed by someone else" in aborted("SetPriceOverride", stale)
    stale_delete = pp.DeletePriceOverrideRequest(id=second.id, etag=first.etag)
    aborted("DeletePriceOverride", stale_delete)
    current = override(note="c")
    current.override.etag = second.etag
    assert call("SetPriceOverride", current).note == "c"
    listed = stub(api).ListPriceOverrides(pp.ListPriceOverridesRequest(), metadata=ADMIN).overrides
    call("DeletePriceOverride", pp.DeletePriceOverrideRequest(id=second.id, etag=listed[0].etag))
    # An etag for an override that is gone: refused, not re-created.
    aborted("SetPriceOverride", current)
