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
    st.add_argument("--input", required=True, help="USD per million input tokens")
    st.add_argument("--output", required=True, help="USD per million output tokens")
    st.add_argument("--cached-input", default="", help="default: as --input")
    st.add_argument("--cache-write", default="", help="5-minute cache writes; default: as --input")
    st.add_argument("--cache-write-1h", default="", help="default: as --cache-write")
    st.add_argument("--provider", default="", help="only for this provider")
    st.add_argument("--route", default="", help="only for this Envoy route")
    st.add_argument("--note", default="")
    admin_flags(st)
    rm = psub.add_parser("delete", help="remove a price override")
    rm.add_argument("id")
    admin_flags(rm)


def _price_cells(p: pp.Price) -> list[str]:
    return [p.input, p.output, p.cached_input or "-", p.cache_write or "-"]


def run_price(args: argparse.Namespace, client: AdminClient) -> None:
    cmd = args.price_command
    if cmd == "list":
        prices: list[pp.ModelPrice] = []
        token = ""
        while True:
            resp = client.call(
                "ListPrices",
                pp.ListPricesRequest(
                    provider=args.provider or "",
                    model_contains=args.model or "",
                    page_size=1000,
                    page_token=token,
                ),
            )
            prices += resp.prices
            token = resp.next_page_token
            if not token:
                break
        if args.json:
            echo(json.dumps(as_json(prices), indent=2))
            return
        echo(
            table(
                ["provider", "model", "input", "output", "cached", "cache write", "source"],
                [
                    [
                        p.provider or "*",
                        p.model + (f" @{p.route}" if p.route else ""),
                        *_price_cells(p.price),
                        "override " + p.override_id if p.override_id else p.checked,
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
        o = client.call(
            "SetPriceOverride",
            pp.SetPriceOverrideRequest(
                override=pp.PriceOverride(
                    model=args.model,
                    provider=args.provider,
                    route=args.route,
                    note=args.note,
                    price=pp.Price(
                        input=args.input,
                        output=args.output,
                        cached_input=args.cached_input,
                        cache_write=args.cache_write,
                        cache_write_1h=args.cache_write_1h,
                    ),
                )
            ),
        )
        echo(
            json.dumps(as_json(o), indent=2)
            if args.json
            else f"{o.id}: {o.model} now ${o.price.input} in / ${o.price.output} out per million "
            "tokens"
        )
    elif cmd == "delete":
        client.call("DeletePriceOverride", pp.DeletePriceOverrideRequest(id=args.id))
        echo(json.dumps({"deleted": args.id}) if args.json else f"deleted {args.id}")
    else:  # argparse guarantees one of the above
        raise CliError(f"unknown price command {cmd!r}")
