"""Directory look-ups and staff requests (docs/protocol.md §15).

A directory entry is shown only after its certificate verified against the transparency log:
the entry must be exactly the user certificate the log's replayed chain ends with, and the
chain must verify to the clinic root key this profile pinned. So a name, role, specialty or
department on screen is the clinic's signed statement, never just the server's say-so.
"""

from __future__ import annotations

from dataclasses import dataclass

from medrelay.clients.engine.connection import Connector, expect
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.transparency import LogVerifier
from medrelay.crypto.certificates import UserCertificate
from medrelay.crypto.errors import CryptoError
from medrelay.protocol.messages import (
    AccountCreate,
    AccountCreated,
    Directory,
    DirectorySearch,
    LinkCreate,
    LinkEnd,
    LinkState,
)


@dataclass(frozen=True, slots=True)
class PersonView:
    """A person from the directory, as their log-verified certificate says."""

    user_id: str
    display_name: str
    role: str
    specialty: str
    department: str
    identity_key: str
    """The certified identity key (`ed25519-v1:...`)."""


@dataclass(frozen=True, slots=True)
class NewAccountView:
    user_id: str
    role: str
    code: str
    expires_ms: int


@dataclass(frozen=True, slots=True)
class CareLinkView:
    patient: str
    clinician: str
    visit_date: str
    ends_ms: int
    ended_ms: int | None


async def search_directory(
    connector: Connector,
    log: LogVerifier,
    query: str,
    *,
    specialty: str | None = None,
    department: str | None = None,
) -> list[PersonView]:
    """People matching the search, each verified against the identity log; an entry that does
    not verify is refused loudly (the server is lying about who someone is)."""
    answer = expect(
        await connector.request(
            lambda rid: DirectorySearch(
                rid=rid, query=query, specialty=specialty, department=department
            )
        ),
        Directory,
    )
    people = []
    for entry in answer.entries:
        try:
            certificate = UserCertificate.decode(entry.certificate)
        except CryptoError as exc:
            raise ClientError(
                LocalCode.PEER_UNVERIFIED, f"the directory entry of {entry.user} is damaged ({exc})"
            ) from None
        state = await log.user_state(entry.user)
        if state.certificate.encode() != entry.certificate or certificate.user_id != entry.user:
            raise ClientError(
                LocalCode.PEER_UNVERIFIED,
                f"SECURITY WARNING: the directory's entry for {entry.user} is not the "
                "certificate in the clinic's identity log; tell clinic IT",
            )
        if state.revoked:
            continue
        people.append(
            PersonView(
                user_id=entry.user,
                display_name=certificate.display_name,
                role=certificate.role.value,
                specialty=certificate.specialty,
                department=certificate.department,
                identity_key=certificate.identity_key.to_text(),
            )
        )
    return people


async def create_account(
    connector: Connector,
    username: str,
    role: str,
    name: str,
    *,
    specialty: str | None = None,
    department: str | None = None,
) -> NewAccountView:
    answer = expect(
        await connector.request(
            lambda rid: AccountCreate(
                rid=rid,
                user=username,
                role=role,
                name=name,
                specialty=specialty,
                department=department,
            )
        ),
        AccountCreated,
    )
    return NewAccountView(answer.user, role, answer.code, answer.expires_ms)


async def create_link(
    connector: Connector, patient: str, clinician: str, visit_date: str, until: str | None
) -> CareLinkView:
    answer = expect(
        await connector.request(
            lambda rid: LinkCreate(
                rid=rid, patient=patient, clinician=clinician, visit=visit_date, until=until
            )
        ),
        LinkState,
    )
    return _view(answer)


async def end_link(connector: Connector, patient: str, clinician: str) -> CareLinkView:
    answer = expect(
        await connector.request(lambda rid: LinkEnd(rid=rid, patient=patient, clinician=clinician)),
        LinkState,
    )
    return _view(answer)


def _view(answer: LinkState) -> CareLinkView:
    return CareLinkView(
        answer.patient, answer.clinician, answer.visit, answer.ends_ms, answer.ended_ms
    )
