"""Prices: the bundled catalog and the operator's overrides (PricingService).

One transaction per use case, like the other use cases (control_plane/runtime.py); every change is
pushed to all data planes (the override set or deleted, as an increment), so
the next request anywhere is charged at the new price.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Iterable

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from control_plane.errors import EtagMismatch, InvalidArgument, NotFound
from control_plane.names import marker_violations
from control_plane.runtime import Runtime, clamp_page_size
from control_plane.store.models import PriceOverrideRow
from spendgate.domain.limits import MAX_MODEL_BYTES, MAX_NAME_CHARS, MAX_NOTE_CHARS
from spendgate.domain.policies import FieldViolation, text_violations
from spendgate.domain.pricing import MAX_PRICE_PER_MTOK, ModelPrice, PriceBook
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import PRICE_FIELDS, price_from_message, price_message, timestamp

log = structlog.get_logger("spendgate.control_plane")
MAX_NOTE = MAX_NOTE_CHARS


def override_message(row: PriceOverrideRow) -> pp.PriceOverride:
    return pp.PriceOverride(
        id=row.id,
        model=row.model,
        provider=row.provider,
        route=row.route,
        price=pp.Price(**{name: getattr(row, name) for name in PRICE_FIELDS}),
        note=row.note,
        update_time=timestamp(row.update_time),
        updated_by=row.updated_by,
        apply_marker=row.apply_marker,
        etag=etag(row),
    )


def etag(row: PriceOverrideRow) -> str:
    """Changes whenever the override does (every set stamps update_time)."""
    fields = [row.id, *(getattr(row, n) for n in PRICE_FIELDS), row.note, row.apply_marker]
    fields.append(row.update_time.isoformat())
    return "p" + hashlib.sha256("\x00".join(fields).encode()).hexdigest()[:16]


def dataplane_override(row: PriceOverrideRow) -> pp.PriceOverride:
    """An override as data planes need it (the note is for people)."""
    msg = override_message(row)
    for name in ("note", "apply_marker", "etag"):
        msg.ClearField(name)
    return msg


def _validated(o: pp.PriceOverride) -> tuple[str, str, str, ModelPrice]:
    violations: list[FieldViolation] = []
    model = o.model.strip().lower()
    if not model:
        violations.append(FieldViolation("override.model", "is required"))
    elif len(model.encode()) > MAX_MODEL_BYTES:
        violations.append(
            FieldViolation("override.model", f"must be at most {MAX_MODEL_BYTES} bytes (UTF-8)")
        )
    else:
        violations += text_violations("override.model", model, MAX_MODEL_BYTES)
    violations += text_violations("override.provider", o.provider, MAX_NAME_CHARS)
    violations += text_violations("override.route", o.route, MAX_NAME_CHARS)
    violations += text_violations("override.note", o.note, MAX_NOTE, multiline=True)
    violations += marker_violations("override.apply_marker", o.apply_marker)
    price: ModelPrice | None = None
    try:
        price = price_from_message(model, o.provider.strip().lower(), o.price)
    except ValueError as e:
        field, _, text = str(e).partition(": ")
        if not text:
            field, text = "price.input", str(e)
        violations.append(FieldViolation(f"override.{field}", text))
    if price is not None:
        for name in PRICE_FIELDS:
            value = getattr(price, name)
            if value is not None and value > MAX_PRICE_PER_MTOK:
                violations.append(
                    FieldViolation(
                        f"override.price.{name}",
                        f"must be at most {MAX_PRICE_PER_MTOK} USD per million tokens, "
                        f"got {getattr(o.price, name)!r}",
                    )
                )
    if violations:
        raise InvalidArgument(violations)
    assert price is not None
    return model, o.provider.strip().lower(), o.route.strip(), price


class PricingAdmin:
    def __init__(self, cp: Runtime, catalog: PriceBook | None = None) -> None:
        self.cp = cp
        self.catalog = catalog or PriceBook.bundled()

    async def list_overrides(self) -> list[pp.PriceOverride]:
        rows = await self.cp.run(_all_overrides)
        return [override_message(r) for r in rows]

    async def overrides_update(self) -> dp.StateUpdate:
        """The message that carries every override (streams of data planes of
        earlier releases, which replace the whole set)."""
        return dp.StateUpdate(
            price_overrides=dp.PriceOverrides(overrides=await self.list_overrides())
        )

    async def dataplane_overrides(self) -> list[pp.PriceOverride]:
        rows = await self.cp.run(_all_overrides)
        return [dataplane_override(r) for r in rows]

    async def set_override(self, o: pp.PriceOverride, author: str) -> pp.PriceOverride:
        model, provider, route, price = _validated(o)
        now = self.cp.clock()

        def upsert(s: Session) -> PriceOverrideRow:
            row = s.scalars(
                select(PriceOverrideRow)
                .where(
                    PriceOverrideRow.model == model,
                    PriceOverrideRow.provider == provider,
                    PriceOverrideRow.route == route,
                )
                .with_for_update()
            ).first()
            if o.etag and (row is None or etag(row) != o.etag):
                raise EtagMismatch(f"{model} {provider or '*'} {route or '*'}", "price override")
            if row is None:
                row = PriceOverrideRow(
                    id="po_" + uuid.uuid4().hex[:24], model=model, provider=provider, route=route
                )
                s.add(row)
            text = price_message(price)
            for name in PRICE_FIELDS:
                setattr(row, name, getattr(text, name))
            row.note = o.note
            row.apply_marker = o.apply_marker
            row.update_time = now
            row.updated_by = author
            self.cp.changed(s, "prices", [row.id])
            return row

        row = await self.cp.run(upsert)
        log.info(
            "price override set",
            override_id=row.id,
            model=model,
            provider=provider,
            route=route,
            input=row.input,
            output=row.output,
            author=author,
        )
        self.publish_changes(upserts=[row])
        return override_message(row)

    async def delete_override(self, override_id: str, author: str, expected_etag: str = "") -> None:
        def delete(s: Session) -> None:
            row = s.get(PriceOverrideRow, override_id, with_for_update=True)
            if row is None:
                raise NotFound("price override", override_id)
            if expected_etag and expected_etag != etag(row):
                raise EtagMismatch(override_id, "price override")
            s.delete(row)
            self.cp.changed(s, "prices", [override_id])

        await self.cp.run(delete)
        log.info("price override deleted", override_id=override_id, author=author)
        self.publish_changes(deleted=[override_id])

    def publish_changes(
        self, upserts: Iterable[PriceOverrideRow] = (), deleted: Iterable[str] = ()
    ) -> None:
        self.cp.hub.publish(
            dp.StateUpdate(
                price_changes=dp.PriceOverrideChanges(
                    upserts=[dataplane_override(r) for r in upserts], deleted_ids=list(deleted)
                )
            )
        )

    async def publish_overrides(self, ids: Collection[str]) -> None:
        """Push the current state of these overrides (set, or deleted)."""
        rows = await self.cp.run(
            lambda s: list(s.scalars(select(PriceOverrideRow).where(PriceOverrideRow.id.in_(ids))))
        )
        found = {r.id for r in rows}
        self.publish_changes(rows, [i for i in ids if i not in found])

    async def list_prices(
        self, provider: str, model_contains: str, page_size: int, page_token: str
    ) -> tuple[list[pp.ModelPrice], str]:
        limit = clamp_page_size(page_size, default=200)
        for field, value in (("provider", provider), ("model_contains", model_contains)):
            if len(value) > MAX_MODEL_BYTES:
                raise InvalidArgument.one(field, f"must be at most {MAX_MODEL_BYTES} characters")
        tokens = await self.cp.page_tokens()
        offset = 0
        if page_token:
            (at,) = tokens.decode("prices", page_token, 1)
            offset = int(at) if at.isdigit() else 0
        rows = await self.cp.run(_all_overrides)
        entries = self._effective(rows)
        provider = provider.strip().lower()
        needle = model_contains.strip().lower()
        entries = [
            e
            for e in entries
            if (not provider or e.provider in (provider, "")) and (not needle or needle in e.model)
        ]
        page = entries[offset : offset + limit]
        more = offset + limit < len(entries)
        token = tokens.encode("prices", str(offset + limit)) if more else ""
        return page, token

    def _effective(self, rows: list[PriceOverrideRow]) -> list[pp.ModelPrice]:
        """Catalog prices with the general overrides applied, then every
        provider- or route-specific override and overrides of unknown models."""
        general = {(r.model, r.provider): r for r in rows if not r.route}
        out: list[pp.ModelPrice] = []
        used: set[str] = set()
        for price in sorted(self.catalog, key=lambda p: (p.provider, p.model)):
            key = price.model.lower()
            row = general.get((key, price.provider)) or general.get((key, ""))
            if row is not None:
                used.add(row.id)
                out.append(
                    pp.ModelPrice(
                        provider=price.provider,
                        model=price.model,
                        price=override_message(row).price,
                        source="override",
                        override_id=row.id,
                    )
                )
            else:
                out.append(
                    pp.ModelPrice(
                        provider=price.provider,
                        model=price.model,
                        price=price_message(price),
                        source=price.source,
                        checked=price.checked,
                    )
                )
        for row in rows:
            if row.id not in used:
                out.append(
                    pp.ModelPrice(
                        provider=row.provider,
                        model=row.model,
                        price=override_message(row).price,
                        source="override",
                        override_id=row.id,
                        route=row.route,
                    )
                )
        return out


def _all_overrides(s: Session) -> list[PriceOverrideRow]:
    return list(
        s.scalars(
            select(PriceOverrideRow).order_by(
                PriceOverrideRow.model, PriceOverrideRow.provider, PriceOverrideRow.route
            )
        )
    )
