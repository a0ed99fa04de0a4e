"""The control plane's domain errors. api/errors.py maps them to gRPC status
codes, in one place; nothing else needs to know about gRPC.

    ControlPlaneError
     ├── NotFound          unknown id                     -> NOT_FOUND
     ├── InvalidArgument   field violations               -> INVALID_ARGUMENT (+ BadRequest)
     ├── EtagMismatch      stale read-modify-write        -> ABORTED
     ├── AlreadyExists     a unique field (a name) taken  -> ALREADY_EXISTS
     ├── FailedPrecondition the server cannot do it as set up -> FAILED_PRECONDITION
     └── Unavailable       database unreachable           -> UNAVAILABLE
"""

from __future__ import annotations

from spendgate.domain.policies import FieldViolation


class ControlPlaneError(Exception):
    pass


class NotFound(ControlPlaneError):
    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"{kind} {id!r} not found")
        self.kind = kind
        self.id = id


class InvalidArgument(ControlPlaneError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class EtagMismatch(ControlPlaneError):
    def __init__(self, id: str, kind: str = "policy") -> None:
        super().__init__(
            f"{kind} {id!r} was changed by someone else (etag mismatch); read it again"
        )


class AlreadyExists(ControlPlaneError):
    """``field`` must be unique per kind and another object has the value."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field


class FailedPrecondition(ControlPlaneError):
    """The request is valid, but this server's configuration or stored state
    does not allow it (e.g. no key to encrypt a secret with)."""


class Unavailable(ControlPlaneError):
    pass
