"""Objects named on the command line by id or by name: every CLI command
that takes one accepts either."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import grpc

from spendgate.cli.client import CliError


class Named(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


def by_id_or_name(
    ref: str,
    *,
    kind: str,
    id_prefix: str,
    get: Callable[[str], T],
    listing: Callable[[], Sequence[T]],
    list_command: str,
) -> T:
    """The object ``ref`` names: its id, else its name. Names are unique per
    kind; a control plane of an earlier release may still hold two, then the
    error lists their ids."""
    not_found: CliError | None = None
    if ref.startswith(id_prefix):
        try:
            return get(ref)
        except CliError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            not_found = e  # a name may look like an id
    named = [o for o in listing() if o.name == ref]
    if len(named) == 1:
        return named[0]
    if named:
        ids = ", ".join(o.id for o in named)
        raise CliError(f"{len(named)} {kind}s are named '{ref}' ({ids}); give the id")
    if not_found is not None:
        raise not_found
    raise CliError(f"no {kind} has the id or name '{ref}' (see `{list_command}`)")
