"""SecretsService: thin async methods over control_plane.secrets_admin."""

from __future__ import annotations

import grpc

from control_plane.api.errors import unary
from control_plane.keyring import CLEAR
from control_plane.secrets_admin import SecretsAdmin
from spendgate.v1 import secrets_pb2 as spb
from spendgate.v1 import secrets_pb2_grpc


class SecretsServicer(secrets_pb2_grpc.SecretsServiceServicer):
    def __init__(self, admin: SecretsAdmin) -> None:
        self.admin = admin

    @unary
    async def GetSecretsStatus(
        self, request: spb.GetSecretsStatusRequest, context: grpc.aio.ServicerContext
    ) -> spb.SecretsStatus:
        keyring, counts = await self.admin.status()
        ids = list(keyring.ids) if keyring is not None else []
        return spb.SecretsStatus(
            current_key_id=keyring.current_id if keyring is not None else "",
            key_ids=ids,
            stored=[
                spb.StoredSecrets(key_id=kid, count=n, configured=kid != CLEAR and kid in ids)
                for kid, n in sorted(counts.items())
            ],
        )

    @unary
    async def RotateSecrets(
        self, request: spb.RotateSecretsRequest, context: grpc.aio.ServicerContext
    ) -> spb.RotateSecretsResponse:
        result = await self.admin.rotate()
        return spb.RotateSecretsResponse(
            current_key_id=result.current_key_id,
            rotated=result.rotated,
            unchanged=result.unchanged,
            unreadable=[
                spb.UnreadableSecret(webhook_id=u.webhook_id, field=u.field, reason=u.reason)
                for u in result.unreadable
            ],
        )
