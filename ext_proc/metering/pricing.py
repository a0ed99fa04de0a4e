"""The prices ext_proc charges with: the bundled catalog, the operator's
overrides (from the control plane), and what to do with a model that has no
price at all (``unpriced_models``).

``unpriced_models``:
  default  charge the configured default price (the shipped default,
           $15 input / $75 output per million tokens, is deliberately high:
           an unknown model must not be a way around a budget) — the default
  free     charge nothing, but count the response and log the model
  reject   answer 403 before the provider is called when the request names
           a model spendgate cannot price (and charge the default when the
           model only shows up in the response)
Every unpriced model is logged once at warning level, whatever the mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from spendgate.domain.pricing import ModelPrice, PriceBook

UNPRICED_MODES = ("default", "free", "reject")


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """An operator's price for ``model``, optionally only for one provider or route."""

    model: str
    price: ModelPrice
    provider: str = ""
    route: str = ""


class PriceTable:
    """Lookups are O(1); ``set_overrides`` swaps the whole override set at once."""

    def __init__(
        self,
        catalog: PriceBook,
        *,
        unpriced: str = "default",
        default_input: Decimal = Decimal(15),
        default_output: Decimal = Decimal(75),
    ) -> None:
        if unpriced not in UNPRICED_MODES:
            raise ValueError(f"unpriced_models must be one of {', '.join(UNPRICED_MODES)}")
        self.catalog = catalog
        self.unpriced = unpriced
        self.default = ModelPrice(
            provider="",
            model="(default)",
            input=default_input,
            output=default_output,
            cached_input=None,
            cache_write=None,
            cache_write_1h=None,
            source="spendgate setting default_input_price / default_output_price",
            checked="",
        )
        self._overrides: dict[tuple[str, str, str], ModelPrice] = {}

    def __len__(self) -> int:
        return len(self.catalog)

    def set_overrides(self, overrides: Iterable[PriceOverride]) -> None:
        self._overrides = {
            (o.model.lower(), o.provider.lower(), o.route): o.price for o in overrides
        }

    def lookup(self, model: str, provider: str = "", route: str = "") -> ModelPrice | None:
        """The most specific override (route, then provider, then any), else the
        catalog's price; None when spendgate knows no price for ``model``."""
        catalog = self.catalog.lookup(model, provider or None)
        if self._overrides:
            # An override for "gpt-4o" also prices "gpt-4o-2024-08-06": look
            # under the name as sent and under the catalog's name for it.
            names = [model.lower()]
            if catalog is not None and catalog.model.lower() != names[0]:
                names.append(catalog.model.lower())
            for name in names:
                for key in (
                    (name, provider, route),
                    (name, "", route),
                    (name, provider, ""),
                    (name, "", ""),
                ):
                    found = self._overrides.get(key)
                    if found is not None:
                        return found
        return catalog

    def for_charge(self, model: str, provider: str = "", route: str = "") -> ModelPrice | None:
        """The price to charge with: the known price, else the fallback the
        ``unpriced_models`` mode gives (None = charge nothing)."""
        found = self.lookup(model, provider, route)
        if found is not None:
            return found
        return None if self.unpriced == "free" else self.default
