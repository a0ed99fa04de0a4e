"""`spendgate price ...`: see effective prices, set and remove overrides."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.output import as_json, echo, table
from spendgate.v1 import pricing_pb2 as pp


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    admin_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser("price", help="model prices: the catalog and your overrides")
    psub = p.add_subparsers(dest="price_command", required=True)
    ls = psub.add_parser("list", help="effective prices (USD per million tokens)")
    ls.add_argument("--provider", help="openai, anthropic, google, bedrock, mistral, ...")
    ls.add_argument("--model", help="only models whose name contains this")
    admin_flags(ls)
    admin_flags(psub.add_parser("overrides", help="list price overrides"))
    st = psub.add_parser("set", help="set the price of a model (applies to the next request)")
    st.add_argument("model")
    # A price not given keeps the model's current effective one (catalog or
    # override): a discount on input and output must not reprice cached input.
    st.add_argument("--input", help="USD per million input tokens")
    st.add_argument("--output", help="USD per million output tokens")
    st.add_argument("--cached-input", help="USD per million cached input tokens")
    st.add_argument("--cache-write", help="5-minute cache writes")
    st.add_argument("--cache-write-1h", help="1-hour cache writes")
    st.add_argument("--provider", default="", help="only for this provider")
    st.add_argument("--route", default="", help="only for this Envoy route")
    st.add_argument("--note", default="")
    admin_flags(st)
    rm = psub.add_parser("delete", help="remove a price override")
    rm.add_argument("id", metavar="ID_OR_MODEL", help="the override's id, or its model")
    rm.add_argument("--provider", default="", help="with a model: the override's provider")
    rm.add_argument("--route", default="", help="with a model: the override's route")
    admin_flags(rm)


def _override_id(client: AdminClient, ref: str, provider: str, route: str) -> str:
    """The id of the override ``ref`` names: an id, or a model (with the
    provider and route it is restricted to; none means any)."""
    overrides = client.call("ListPriceOverrides", pp.ListPriceOverridesRequest()).overrides
    if any(o.id == ref for o in overrides):
        return ref
    key = (ref.strip().lower(), provider.strip().lower(), route.strip())
    for o in overrides:
        if (o.model, o.provider, o.route) == key:
            return str(o.id)
    raise CliError(
        f"no price override has the id '{ref}', nor the model '{key[0]}' for provider "
        f"'{key[1] or '*'}' and route '{key[2] or '*'}' (see `spendgate price overrides`)"
    )


# pp.Price field -> the `price set` option that sets it.
PRICE_OPTIONS = {
    "input": "--input",
    "output": "--output",
    "cached_input": "--cached-input",
    "cache_write": "--cache-write",
    "cache_write_1h": "--cache-write-1h",
}


def _list_prices(client: AdminClient, provider: str, model: str) -> list[pp.ModelPrice]:
    prices: list[pp.ModelPrice] = []
    token = ""
    while True:
        resp = client.call(
            "ListPrices",
            pp.ListPricesRequest(
                provider=provider, model_contains=model, page_size=1000, page_token=token
            ),
        )
        prices += resp.prices
        token = resp.next_page_token
        if not token:
            return prices


def current_price(
    client: AdminClient, model: str, provider: str, route: str
) -> pp.ModelPrice | None:
    """The effective price an override of (model, provider, route) replaces:
    that route's override if any, else the model's general price. None when
    spendgate has no price for the model; CliError when providers price it
    differently and no --provider says which."""
    found = [
        p
        for p in _list_prices(client, provider.strip().lower(), model.strip().lower())
        if p.model.lower() == model.strip().lower()
        and (not provider or p.provider == provider.strip().lower())
    ]
    if route:
        at_route = [p for p in found if p.route == route]
        found = at_route or found
    found = [p for p in found if p.route in ("", route)]
    distinct = {p.price.SerializeToString(deterministic=True): p for p in found}
    if len(distinct) > 1:
        providers = ", ".join(sorted({p.provider or "*" for p in found}))
        raise CliError(
            f"{model} has different prices per provider ({providers}): "
            "give --provider, or every price"
        )
    return next(iter(distinct.values()), None)


def _merged_price(args: argparse.Namespace, client: AdminClient) -> tuple[pp.Price, list[str]]:
    """The prices given, the rest kept from the current effective price, and
    the names of the kept ones."""
    given = {f: getattr(args, f) for f in PRICE_OPTIONS if getattr(args, f) is not None}
    if len(given) == len(PRICE_OPTIONS):
        return pp.Price(**given), []
    base = current_price(client, args.model, args.provider, args.route)
    if base is None:
        missing = [PRICE_OPTIONS[f] for f in ("input", "output") if f not in given]
        if missing:
            raise CliError(f"spendgate has no price for {args.model}: give {' and '.join(missing)}")
        return pp.Price(**given), []
    kept = [f for f in PRICE_OPTIONS if f not in given]
    values = {f: given.get(f, getattr(base.price, f)) for f in PRICE_OPTIONS}
    return pp.Price(**values), kept


def _price_cells(p: pp.Price) -> list[str]:
    return [p.input, p.output, p.cached_input or "-", p.cache_write or "-"]


def run_price(args: argparse.Namespace, client: AdminClient) -> None:
    cmd = args.price_command
    if cmd == "list":
        prices = _list_prices(client, args.provider or "", args.model or "")
        if args.json:
            echo(json.dumps(as_json(prices), indent=2))
            return
        echo(
            table(
                [
                    "provider",
                    "model",
                    "input",
                    "output",
                    "cached",
                    "cache write",
                    "source",
                    "checked",
                ],
                [
                    [
                        p.provider or "*",
                        p.model + (f" @{p.route}" if p.route else ""),
                        *_price_cells(p.price),
                        f"override {p.override_id}" if p.override_id else p.source or "-",
                        p.checked or "-",
                    ]
                    for p in prices
                ],
            )
        )
    elif cmd == "overrides":
        overrides = client.call("ListPriceOverrides", pp.ListPriceOverridesRequest()).overrides
        if args.json:
            echo(json.dumps(as_json(list(overrides)), indent=2))
            return
        echo(
            table(
                [
                    "id",
                    "model",
                    "provider",
                    "route",
                    "input",
                    "output",
                    "cached",
                    "cache write",
                    "note",
                ],
                [
                    [
                        o.id,
                        o.model,
                        o.provider or "*",
                        o.route or "*",
                        *_price_cells(o.price),
                        o.note,
                    ]
                    for o in overrides
                ],
            )
        )
    elif cmd == "set":
        price, kept = _merged_price(args, client)
        o = client.call(
            "SetPriceOverride",
            pp.SetPriceOverrideRequest(
                override=pp.PriceOverride(
                    model=args.model,
                    provider=args.provider,
                    route=args.route,
                    note=args.note,
                    price=price,
                )
            ),
        )
        if args.json:
            echo(json.dumps(as_json(o), indent=2))
            return
        kept_text = ", ".join(
            f"{PRICE_OPTIONS[f].removeprefix('--')} "
            + (f"${getattr(o.price, f)}" if getattr(o.price, f) else "none (priced as input)")
            for f in kept
        )
        echo(
            f"{o.id}: {o.model} now ${o.price.input} in / ${o.price.output} out per million "
            "tokens" + (f"; kept from its current price: {kept_text}" if kept else "")
        )
    elif cmd == "delete":
        override_id = _override_id(client, args.id, args.provider, args.route)
        client.call("DeletePriceOverride", pp.DeletePriceOverrideRequest(id=override_id))
        echo(json.dumps({"deleted": override_id}) if args.json else f"deleted {override_id}")
    else:  # argparse guarantees one of the above
        raise CliError(f"unknown price command {cmd!r}")
