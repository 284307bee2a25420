"""Test support for the client engine (in the spirit of `twisted.internet.testing`): an in-memory
relay that speaks protocol v1 to engines through a fake dialer and serves the HTTP endpoints
(enrollment, blobs) through a fake `HttpClient`, with a fake clinic authority.

It is not the real server: it implements just enough of docs/protocol.md, faithfully (frames
through the real codec, signatures checked, the device set checked, idempotent sends, queues,
acknowledgements), for engine and front-end tests to run without network, threads or real time.
Frames travel only when the test calls `pump()`, so a test decides the interleaving; knobs
(`down`, `refuse_next_send`, `invalidate_tokens`, `drop`...) inject failures.

Availability (docs/protocol.md §17), reduced to what clients see: a test sets
`relay.availability[user] = FakeAvailability(open_now=False, on_call=...)`; then a send to that
user gets a signed automatic reply (or the urgent notices), flags on the delivered items, and
`on_call_changed` when an urgent send does not address the clinician on call. Nothing is held.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from medrelay.clients.engine.client import Engine, open_engine
from medrelay.clients.engine.connection import FrameSink, FrameTransport
from medrelay.clients.engine.enrollment import (
    b64url,
    b64url_decode,
    enroll,
)
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.http import HttpResponse
from medrelay.clients.engine.linking import LinkCheck, LinkCode, LinkResult, join_link
from medrelay.clients.engine.store import (
    ProfileInfo,
    inline_runner,
)
from medrelay.crypto.certificates import (
    ClinicKeyCertificate,
    ClinicKeyPurpose,
    DeviceCertificate,
    Role,
    UserCertificate,
    issue_clinic_key_certificate,
    issue_user_certificate,
    verify_device,
)
from medrelay.crypto.checkpoint import Checkpoint, sign_checkpoint
from medrelay.crypto.errors import CryptoError
from medrelay.crypto.keys import DHPrivateKey, DHPublicKey, SigningKey, VerifyKey
from medrelay.crypto.linking import (
    check_commitment,
    commitment,
    display_code,
    new_link_code,
    normalize_link_code,
)
from medrelay.crypto.merkle import MerkleTree, leaf_hash
from medrelay.crypto.notices import NoticeKind, issue_notice
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.crypto.transparency import (
    CLINIC_SUBJECT,
    EventKind,
    LogEvent,
    log_origin,
    next_event,
)
from medrelay.crypto.x3dh import SignedPrekey
from medrelay.protocol.auth import auth_transcript
from medrelay.protocol.errors import ErrorCode, ProtocolError
from medrelay.protocol.frames import FrameDecoder, encode_frame
from medrelay.protocol.messages import (
    AbsenceSpan,
    Ack,
    Auth,
    Authenticated,
    Availability,
    AvailabilityGet,
    Bundle,
    BundleGet,
    ConsistencyProof,
    Deliver,
    DeliveredItem,
    DeviceBundle,
    DeviceEntry,
    DeviceList,
    DeviceRef,
    DevicesGet,
    Direction,
    Directory,
    DirectoryEntry,
    DirectorySearch,
    Error,
    Hello,
    HoursInterval,
    Indication,
    ItemFlag,
    ItemKind,
    Limits,
    LogAnswer,
    LogGet,
    LogLeaf,
    Message,
    PrekeysLow,
    PrekeysPut,
    PrekeysStored,
    Resume,
    Roster,
    RosterAdd,
    RosterGet,
    RosterRemove,
    RosterShift,
    ScheduleSet,
    Send,
    Sent,
    VisitClose,
    VisitInfo,
    VisitList,
    VisitOpen,
    Visits,
    Welcome,
)

FAR_FUTURE_MS: Final = 4_102_444_800_000
"""2100-01-01: test certificates never expire during a test."""
TOKEN_LIFETIME_MS: Final = 7 * 24 * 3600 * 1000
TEST_INDICATIONS: Final = (
    Indication("test-results", "Interpreting test results after ordered diagnostics"),
    Indication("sick-leave-closing", "Closing a sick-leave certificate"),
    Indication("treatment-questions", "Questions about the prescribed treatment"),
)
_VISIT_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

_T = TypeVar("_T")


class FakeClinic:
    """A clinic authority: root key, issuing key and its certificate."""

    def __init__(self, rng: Rng, *, clinic_id: str = "clinic.test") -> None:
        self.clinic_id = clinic_id
        self.root = SigningKey.generate(rng)
        self.issuing = SigningKey.generate(rng)
        self.issuing_certificate: ClinicKeyCertificate = issue_clinic_key_certificate(
            self.root,
            clinic_id=clinic_id,
            purpose=ClinicKeyPurpose.ISSUING,
            key=self.issuing.verify_key,
            not_before_ms=0,
            not_after_ms=FAR_FUTURE_MS,
            serial=1,
        )
        self.log_key = SigningKey.generate(rng)
        self.log_certificate: ClinicKeyCertificate = issue_clinic_key_certificate(
            self.root,
            clinic_id=clinic_id,
            purpose=ClinicKeyPurpose.LOG,
            key=self.log_key.verify_key,
            not_before_ms=0,
            not_after_ms=FAR_FUTURE_MS,
            serial=2,
        )
        self._serial = 2

    def certify(
        self, user_id: str, identity_key: VerifyKey, *, role: Role, display_name: str
    ) -> UserCertificate:
        self._serial += 1
        return issue_user_certificate(
            self.issuing,
            user_id=user_id,
            role=role,
            display_name=display_name,
            identity_key=identity_key,
            not_before_ms=0,
            not_after_ms=FAR_FUTURE_MS,
            serial=self._serial,
        )


@dataclass(slots=True)
class FakeDevice:
    user_id: str
    device_id: str
    certificate: bytes
    signing_key: VerifyKey
    signed_prekey: bytes
    one_time_prekeys: list[bytes]
    queue: list[DeliveredItem] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)


@dataclass(slots=True)
class FakeLinkSession:
    """One device link in progress (docs/protocol.md §16), as the fake relay keeps it."""

    code: str
    owner: tuple[str, str]
    commitment: bytes
    expires_ms: int
    state: str = "waiting"
    secret: bytes | None = None
    new_device: dict[str, Any] | None = None
    existing_key: str | None = None
    payload: str | None = None
    # A relay in the middle (`FakeRelay.link_mitm`) shows each side a key of its own.
    shown_to_new: DHPrivateKey | None = None
    shown_to_existing: DHPrivateKey | None = None


@dataclass(slots=True)
class FakeAvailability:
    """A clinician's state as the fake relay reports it (tests set it directly)."""

    open_now: bool = True
    on_call: str | None = None
    changes_at_ms: int | None = None
    time_zone: str = "Europe/Moscow"
    hours: tuple[HoursInterval, ...] = ()
    absences: tuple[AbsenceSpan, ...] = ()
    autoreply: str | None = None
    available_until_ms: int | None = None
    department: str | None = "cardiology"


@dataclass(slots=True)
class FakeUser:
    user_id: str
    role: Role
    display_name: str
    code: str | None
    certificate: bytes | None = None
    devices: dict[str, FakeDevice] = field(default_factory=dict)


class _Link:
    """One client connection: the client's transport and the relay's view of it."""

    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.sink: FrameSink | None = None
        self.decoder = FrameDecoder(Direction.CLIENT_TO_SERVER)
        self.inbound: list[bytes] = []
        self.outbound: list[bytes] = []
        self.closing = False
        self.closed = False
        self.challenge = b""
        self.device: FakeDevice | None = None
        self.claimed_user: str | None = None
        self.in_flight: set[int] = set()
        self.frames_from_client: list[Message] = []

    # FrameTransport (the client's side)

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.inbound.append(data)

    def close(self) -> None:
        self.closing = True

    # relay side

    def push(self, message: Message) -> None:
        if not self.closed:
            self.outbound.append(encode_frame(message))


class FakeDialer:
    """A `Dialer` connecting engines to a `FakeRelay`."""

    def __init__(self, relay: FakeRelay) -> None:
        self._relay = relay

    def dial(self, attach: Callable[[FrameTransport], FrameSink]) -> Deferred[None]:
        relay = self._relay
        relay.dials += 1
        if relay.down:
            return fail(ClientError(LocalCode.SERVER_UNREACHABLE, "cannot connect (fake)"))
        link = _Link(relay)
        relay.links.append(link)
        relay.all_links.append(link)
        link.sink = attach(link)
        link.sink.connection_made()
        return succeed(None)


class FakeRelay:
    """An in-memory relay. Call `pump()` to move frames; `http` serves the HTTP endpoints."""

    def __init__(self, clinic: FakeClinic, clock: IReactorTime, rng: Rng) -> None:
        self.clinic = clinic
        self.clock = clock
        self.rng = rng
        self.users: dict[str, FakeUser] = {}
        self.tokens: dict[bytes, tuple[str, str]] = {}
        self.sent: dict[tuple[str, str, bytes], tuple[bytes, int]] = {}
        self.blobs: dict[str, bytes] = {}
        self.links: list[_Link] = []
        self.all_links: list[_Link] = []
        self.next_seq = 1
        self.dials = 0
        self.down = False
        self.invalidate_tokens = False
        self.refuse_next_send: ErrorCode | None = None
        self.forbidden_pairs: set[tuple[str, str]] = set()
        self.drop_after_send = False
        self.lose_sends = False
        self.prekey_low_threshold = 10
        self.prekey_target = 100
        self.http = FakeHttp(self)
        self.link_sessions: dict[str, FakeLinkSession] = {}
        self.link_ttl_ms = 600_000
        self.link_mitm = False
        """Play a relay in the middle of device links: each side sees an ephemeral key of the
        relay's (committed to consistently), so the two screens show different digits."""
        self.dialer = FakeDialer(self)
        # The identity log (docs/protocol.md §13), and knobs for the tests that play a
        # malicious server: `forks` shows a user another leaf list than everyone else's;
        # `hidden_events` leaves (subject, seq) events out of the answers.
        self.log_leaves: list[bytes] = []
        self.log_heads: dict[str, LogEvent] = {}
        self.forks: dict[str, list[bytes]] = {}
        self.hidden_events: set[tuple[str, int]] = set()
        self.directory_override: list[DirectoryEntry] = []
        self.availability: dict[str, FakeAvailability] = {}
        self.shifts: list[RosterShift] = []
        self.after_availability: Callable[[], None] | None = None
        """Called once after answering the next `availability_get` (a roster changing while
        the client composes its urgent message)."""
        self.notice_key = clinic.issuing
        """What signs clinic notices (a test swaps in another key to play a forger)."""
        self.tamper_proofs = False
        # Visits: `care_links` holds the (patient, clinician) pairs with an active care link;
        # the clinic's indications and consent mode are knobs.
        self.care_links: set[tuple[str, str]] = set()
        self.visits: dict[str, VisitInfo] = {}
        self.indications: tuple[Indication, ...] = TEST_INDICATIONS
        self.consent_mode = "notice"
        self.refuse_next_visit: ErrorCode | None = None
        """Refuse the next visit request with this code (a failure between two steps)."""
        self.clinic_keys: list[bytes] = []
        for certificate in (clinic.issuing_certificate, clinic.log_certificate):
            self.clinic_keys.append(certificate.encode())
            self.log_event(EventKind.CLINIC_KEY_CERTIFIED, CLINIC_SUBJECT, certificate.encode())

    def log_event(self, kind: EventKind, subject: str, payload: bytes) -> bytes:
        """Append an event to the real log; returns its encoding."""
        event = next_event(self.log_heads.get(subject), kind, subject, self.now_ms(), payload)
        self.log_heads[subject] = event
        self.log_leaves.append(event.encode())
        return event.encode()

    def _log_answer(self, link: _Link, message: LogGet) -> None:
        viewer = link.device.user_id if link.device is not None else ""
        leaves = self.forks.get(viewer, self.log_leaves)
        tree = MerkleTree.from_leaf_hashes(leaf_hash(leaf) for leaf in leaves)
        size = tree.size
        if any(not 0 < old <= size for old in message.sizes):
            link.push(_error(ErrorCode.INVALID_FIELD, message.rid))
            return
        origin = log_origin(self.clinic.clinic_id)
        note = sign_checkpoint(Checkpoint(origin, size, tree.root()), origin, self.clinic.log_key)
        events = []
        if message.user is not None:
            for index, leaf in enumerate(leaves):
                event = LogEvent.decode(leaf)
                if event.subject == message.user and (
                    (event.subject, event.seq) not in self.hidden_events
                ):
                    proof = tree.inclusion_proof(index)
                    if self.tamper_proofs and proof:
                        proof = (bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:])
                    events.append(LogLeaf(index, leaf, proof))
        link.push(
            LogAnswer(
                rid=message.rid,
                checkpoint=note.encode(),
                clinic_keys=tuple(self.clinic_keys),
                consistency=tuple(
                    ConsistencyProof(old, tree.consistency_proof(old)) for old in message.sizes
                ),
                events=tuple(events),
                user=message.user,
            )
        )

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- administration --------------------------------------------------------------------

    def add_user(
        self, user_id: str, code: str, *, role: Role = Role.DOCTOR, display_name: str = ""
    ) -> None:
        self.users[user_id] = FakeUser(user_id, role, display_name or user_id, code)

    def device(self, user_id: str, device_id: str) -> FakeDevice:
        return self.users[user_id].devices[device_id]

    def only_device(self, user_id: str) -> FakeDevice:
        (device,) = self.users[user_id].devices.values()
        return device

    def expire(self, sender: tuple[str, str], message_id: bytes, missed: tuple[str, str]) -> None:
        """Queue an expiry notice for `sender`'s device: `missed` never fetched `message_id`."""
        device = self.device(*sender)
        device.queue.append(
            DeliveredItem(
                seq=self._seq(),
                kind=ItemKind.EXPIRED,
                message_id=message_id,
                time_ms=self.now_ms(),
                user=missed[0],
                device=missed[1],
            )
        )
        self._push_queues()

    def drop(self) -> None:
        """Break every connection (both sides see it lost)."""
        for link in self.links:
            link.closing = True
        self.pump()

    def client_frames(self, user_id: str) -> list[Message]:
        """Every frame the devices of `user_id` sent, over all their connections, in order."""
        return [
            message
            for link in self.all_links
            if link.claimed_user == user_id
            for message in link.frames_from_client
        ]

    def connected(self, user_id: str, device_id: str) -> bool:
        return any(
            link.device is not None
            and (link.device.user_id, link.device.device_id) == (user_id, device_id)
            and not link.closed
            for link in self.links
        )

    # -- moving frames ---------------------------------------------------------------------

    def pump(self, max_rounds: int = 1000) -> None:
        """Deliver queued frames both ways until nothing moves."""
        for _ in range(max_rounds):
            moved = False
            for link in list(self.links):
                if link.closed:
                    continue
                while link.inbound:
                    moved = True
                    data = link.inbound.pop(0)
                    self._receive(link, data)
                while link.outbound and not link.closed:
                    moved = True
                    data = link.outbound.pop(0)
                    assert link.sink is not None  # noqa: S101
                    link.sink.data_received(data)
                if link.closing and not link.inbound and not link.outbound:
                    moved = True
                    link.closed = True
                    self.links.remove(link)
                    assert link.sink is not None  # noqa: S101
                    link.sink.connection_lost()
            if not moved:
                return
        raise RuntimeError("the fake relay kept moving frames: a loop?")

    def _receive(self, link: _Link, data: bytes) -> None:
        try:
            link.decoder.receive_data(data)
            while (message := link.decoder.next_message()) is not None:
                link.frames_from_client.append(message)
                self._dispatch(link, message)
        except ProtocolError as exc:
            link.push(Error(code=exc.code, message=exc.message, rid=exc.rid))
            if exc.fatal:
                link.closing = True

    def _dispatch(self, link: _Link, message: Message) -> None:
        if isinstance(message, Hello):
            link.challenge = self.rng(32)
            link.push(
                Welcome(
                    version=1,
                    agent="fake-relay",
                    clinic=self.clinic.clinic_id,
                    challenge=link.challenge,
                    time_ms=self.now_ms(),
                    limits=Limits(max_frame=1 << 20, max_ciphertext=1 << 18, max_envelopes=128,
                                  max_acks=1024),
                )
            )  # fmt: skip
        elif isinstance(message, Auth):
            self._auth(link, message)
        elif isinstance(message, Resume):
            self._resume(link, message)
        elif link.device is None:
            link.push(_error(ErrorCode.NOT_AUTHENTICATED, getattr(message, "rid", None)))
        elif isinstance(message, DevicesGet):
            user = self.users.get(message.user)
            if user is None or user.certificate is None:
                link.push(_error(ErrorCode.UNKNOWN_USER, message.rid))
                return
            link.push(
                DeviceList(
                    rid=message.rid,
                    user=user.user_id,
                    user_certificate=user.certificate,
                    devices=tuple(
                        DeviceEntry(d.device_id, d.certificate) for d in user.devices.values()
                    ),
                )
            )
        elif isinstance(message, BundleGet):
            self._bundle(link, message)
        elif isinstance(message, LogGet):
            self._log_answer(link, message)
        elif isinstance(message, DirectorySearch):
            # Everyone enrolled whose username contains the query (no policy: unit tests of
            # the client's verification); `directory_override` plays a lying server.
            entries = [
                DirectoryEntry(user.user_id, user.certificate)
                for user in self.users.values()
                if user.certificate is not None and message.query in user.user_id
            ]
            link.push(Directory(rid=message.rid, entries=tuple(self.directory_override or entries)))
        elif isinstance(message, PrekeysPut):
            link.device.one_time_prekeys.extend(message.one_time_prekeys)
            if message.signed_prekey is not None:
                link.device.signed_prekey = message.signed_prekey
            link.push(
                PrekeysStored(rid=message.rid, one_time_count=len(link.device.one_time_prekeys))
            )
        elif isinstance(message, Send):
            self._send(link, link.device, message)
        elif isinstance(message, AvailabilityGet | ScheduleSet):
            self._availability(link, message)
        elif isinstance(message, RosterAdd | RosterRemove | RosterGet):
            self._roster(link, message)
        elif isinstance(message, VisitOpen | VisitClose | VisitList):
            self._visit(link, link.device.user_id, message)
        elif isinstance(message, Ack):
            device = link.device
            acked = set(message.seqs)
            device.acked.extend(message.seqs)
            device.queue = [i for i in device.queue if i.seq not in acked]
            link.in_flight -= acked

    def _auth(self, link: _Link, message: Auth) -> None:
        link.claimed_user = message.user
        user = self.users.get(message.user)
        device = None if user is None else user.devices.get(message.device)
        transcript = auth_transcript(
            link.challenge, self.clinic.clinic_id, message.user, message.device
        )
        try:
            if device is None:
                raise CryptoError("unknown device")
            device.signing_key.verify(transcript, message.signature)
        except CryptoError:
            link.push(_error(ErrorCode.AUTH_FAILED, message.rid))
            link.closing = True
            return
        token = self.rng(32)
        self.tokens[token] = (message.user, message.device)
        self._logged_in(link, device, message.rid, token)

    def _resume(self, link: _Link, message: Resume) -> None:
        owner = self.tokens.get(message.token)
        if owner is not None:
            link.claimed_user = owner[0]
        if owner is None or self.invalidate_tokens:
            link.push(_error(ErrorCode.TOKEN_INVALID, message.rid))
            link.closing = True
            return
        self._logged_in(link, self.device(*owner), message.rid, None)

    def _logged_in(self, link: _Link, device: FakeDevice, rid: int, token: bytes | None) -> None:
        for other in self.links:
            if other is not link and other.device is device and not other.closing:
                other.push(_error(ErrorCode.SESSION_REPLACED, None))
                other.closing = True
        link.device = device
        link.push(
            Authenticated(
                rid=rid,
                user=device.user_id,
                device=device.device_id,
                expires_ms=self.now_ms() + TOKEN_LIFETIME_MS,
                token=token,
            )
        )
        remaining = len(device.one_time_prekeys)
        if remaining < self.prekey_low_threshold:
            link.push(PrekeysLow(remaining=remaining, wanted=self.prekey_target - remaining))
        self._push_queues()

    def _bundle(self, link: _Link, message: BundleGet) -> None:
        user = self.users.get(message.user)
        if user is None or user.certificate is None:
            link.push(_error(ErrorCode.UNKNOWN_USER, message.rid))
            return
        bundles = []
        for device in user.devices.values():
            otk = device.one_time_prekeys.pop(0) if device.one_time_prekeys else None
            bundles.append(
                DeviceBundle(device.device_id, device.certificate, device.signed_prekey, otk)
            )
        link.push(
            Bundle(
                rid=message.rid,
                user=user.user_id,
                user_certificate=user.certificate,
                devices=tuple(bundles),
            )
        )

    def _send(self, link: _Link, sender: FakeDevice, message: Send) -> None:
        digest = hashlib.sha256(
            b"".join(
                e.user.encode() + b"\0" + e.device.encode() + b"\0" + e.ciphertext
                for e in message.envelopes
            )
        ).digest()
        key = (sender.user_id, sender.device_id, message.message_id)
        if key in self.sent:
            stored_digest, time_ms = self.sent[key]
            if stored_digest != digest:
                link.push(_error(ErrorCode.ID_CONFLICT, message.rid))
            else:
                link.push(Sent(rid=message.rid, message_id=message.message_id, time_ms=time_ms))
            return
        if self.lose_sends:
            link.closing = True  # lost before it was stored, and the relay goes away
            self.down = True
            return
        if self.refuse_next_send is not None:
            code, self.refuse_next_send = self.refuse_next_send, None
            link.push(_error(code, message.rid))
            return
        addressed = {e.user for e in message.envelopes}
        away = {u: self.availability[u] for u in addressed if not self._open(u)}
        for state in away.values():
            if message.urgent and state.on_call is not None and state.on_call not in addressed:
                link.push(_error(ErrorCode.ON_CALL_CHANGED, message.rid))
                return
        for user_id in addressed:
            user = self.users.get(user_id)
            if user is None or user.certificate is None:
                link.push(_error(ErrorCode.UNKNOWN_USER, message.rid))
                return
            if (sender.user_id, user_id) in self.forbidden_pairs:
                link.push(_error(ErrorCode.FORBIDDEN, message.rid))
                return
        current = {
            (u, d)
            for u in addressed | {sender.user_id}
            for d in self.users[u].devices
            if (u, d) != (sender.user_id, sender.device_id)
        }
        targets = {(e.user, e.device) for e in message.envelopes}
        if targets != current:
            link.push(
                Error(
                    code=ErrorCode.STALE_DEVICES,
                    message="the device set is not current",
                    rid=message.rid,
                    missing=tuple(DeviceRef(u, d) for u, d in sorted(current - targets)) or None,
                    extra=tuple(DeviceRef(u, d) for u, d in sorted(targets - current)) or None,
                )
            )
            return
        time_ms = self.now_ms()
        self.sent[key] = (digest, time_ms)
        for envelope in message.envelopes:
            flags = [ItemFlag.URGENT] if message.urgent else []
            if envelope.user in away:
                flags.append(ItemFlag.AFTER_HOURS)
            self.device(envelope.user, envelope.device).queue.append(
                DeliveredItem(
                    seq=self._seq(),
                    kind=ItemKind.MESSAGE,
                    message_id=message.message_id,
                    time_ms=time_ms,
                    user=sender.user_id,
                    device=sender.device_id,
                    ciphertext=envelope.ciphertext,
                    flags=tuple(flags) or None,
                )
            )
        on_call = None
        for clinician, state in sorted(away.items()):
            if message.urgent:
                on_call = state.on_call
                kind = NoticeKind.URGENT_UNROUTED if on_call is None else NoticeKind.URGENT_ROUTED
            else:
                kind = NoticeKind.AUTO_REPLY
            self.push_notice(sender.user_id, clinician, message.message_id, kind, state)
        if self.drop_after_send:
            self.drop_after_send = False
            link.closing = True  # the answer is lost: the client must resend
        else:
            link.push(
                Sent(
                    rid=message.rid,
                    message_id=message.message_id,
                    time_ms=time_ms,
                    reads_at_ms=next(
                        (s.changes_at_ms for s in away.values() if s.changes_at_ms), None
                    ),
                    on_call=on_call,
                )
            )
        self._push_queues()

    # -- visits ----------------------------------------------------------------------------

    def _visits_answer(self, rid: int, visits: list[VisitInfo]) -> Visits:
        return Visits(
            rid=rid, visits=tuple(visits), indications=self.indications, consent=self.consent_mode
        )

    def _visit(
        self, link: _Link, user_id: str, message: VisitOpen | VisitClose | VisitList
    ) -> None:
        """The server's semantics: doctors open visits for patients they have an active care
        link with (one open visit per pair); only the visit's clinician closes it; everyone
        lists their own, newest first; the records account may read any visit by id."""
        role = self.users[user_id].role
        if self.refuse_next_visit is not None:
            code, self.refuse_next_visit = self.refuse_next_visit, None
            link.push(_error(code, message.rid))
            return
        if isinstance(message, VisitOpen):
            self._visit_open(link, user_id, role, message)
            return
        if isinstance(message, VisitClose):
            found = self.visits.get(message.visit.upper())
            if found is None or found.clinician != user_id:
                link.push(_error(ErrorCode.NOT_FOUND, message.rid))
            elif found.closed_ms is not None and found.conclusion != message.conclusion:
                link.push(_error(ErrorCode.FORBIDDEN, message.rid))
            else:
                if found.closed_ms is None:
                    found = dataclasses.replace(
                        found, closed_ms=self.now_ms(), conclusion=message.conclusion
                    )
                    self.visits[found.visit] = found
                link.push(self._visits_answer(message.rid, [found]))
            return
        if message.visit is not None:
            found = self.visits.get(message.visit.upper())
            if found is None or (
                user_id not in (found.patient, found.clinician) and role is not Role.RECORDS
            ):
                link.push(_error(ErrorCode.NOT_FOUND, message.rid))
                return
            shown = [] if message.open_only and found.closed_ms is not None else [found]
            link.push(self._visits_answer(message.rid, shown))
            return
        own = [
            v
            for v in self.visits.values()
            if user_id in (v.patient, v.clinician)
            and not (message.open_only and v.closed_ms is not None)
        ]
        own.sort(key=lambda v: v.opened_ms, reverse=True)
        link.push(self._visits_answer(message.rid, own))

    def _visit_open(self, link: _Link, user_id: str, role: Role, message: VisitOpen) -> None:
        patient = self.users.get(message.patient)
        refusal: tuple[ErrorCode, str] | None = None
        if role is not Role.DOCTOR:
            refusal = (ErrorCode.FORBIDDEN, "only doctors open visits")
        elif message.indication not in {i.code for i in self.indications}:
            refusal = (ErrorCode.INVALID_FIELD, f"{message.indication!r} is not an indication")
        elif patient is None or patient.role is not Role.PATIENT:
            refusal = (ErrorCode.UNKNOWN_USER, f"no patient {message.patient}")
        elif (message.patient, user_id) not in self.care_links:
            refusal = (
                ErrorCode.FORBIDDEN,
                f"you have no care link with {message.patient}: a teleconsultation follows an "
                "in-person visit",
            )
        elif any(
            (v.patient, v.clinician) == (message.patient, user_id) and v.closed_ms is None
            for v in self.visits.values()
        ):
            refusal = (ErrorCode.FORBIDDEN, f"{message.patient} already has an open visit")
        if refusal is not None:
            link.push(Error(code=refusal[0], message=refusal[1], rid=message.rid))
            return
        visit_id = "V" + "".join(_VISIT_ALPHABET[b % 32] for b in self.rng(8))
        info = VisitInfo(
            visit=visit_id,
            thread=self.rng(16),
            patient=message.patient,
            clinician=user_id,
            indication=message.indication,
            consent=self.consent_mode,
            opened_ms=self.now_ms(),
        )
        self.visits[visit_id] = info
        link.push(self._visits_answer(message.rid, [info]))

    # -- availability ----------------------------------------------------------------------

    def _open(self, user_id: str) -> bool:
        state = self.availability.get(user_id)
        return state is None or state.open_now

    def push_notice(
        self,
        patient: str,
        clinician: str,
        message_id: bytes,
        kind: NoticeKind,
        state: FakeAvailability,
        *,
        recipient: str | None = None,
    ) -> None:
        """Queue a clinic notice for every device of `patient` (signed for `recipient`,
        default the patient), as the relay does when a message lands outside hours."""
        notice = issue_notice(
            self.notice_key,
            kind=kind,
            clinic_id=self.clinic.clinic_id,
            recipient=recipient or patient,
            clinician=clinician,
            in_reply_to=message_id,
            issued_at_ms=self.now_ms(),
            reads_at_ms=state.changes_at_ms,
            time_zone=state.time_zone,
            text=f"{clinician} is away. In an emergency call 103 or 112.",
            emergency_numbers=("103", "112"),
            on_call=state.on_call if kind is NoticeKind.URGENT_ROUTED else None,
        )
        for device in self.users[patient].devices.values():
            device.queue.append(
                DeliveredItem(
                    seq=self._seq(),
                    kind=ItemKind.NOTICE,
                    message_id=message_id,
                    time_ms=self.now_ms(),
                    user=clinician,
                    device="",
                    ciphertext=notice.encode(),
                )
            )
        self._push_queues()

    def _availability(self, link: _Link, message: AvailabilityGet | ScheduleSet) -> None:
        if message.user not in self.users:
            link.push(_error(ErrorCode.UNKNOWN_USER, message.rid))
            return
        scheduled = message.user in self.availability
        state = self.availability.setdefault(message.user, FakeAvailability())
        if isinstance(message, ScheduleSet):
            scheduled = scheduled or message.hours is not None
            if message.time_zone is not None:
                state.time_zone = message.time_zone
            if message.hours is not None:
                state.hours = message.hours
            if message.autoreply is not None:
                state.autoreply = message.autoreply or None
            if message.available_until_ms is not None:
                state.available_until_ms = message.available_until_ms or None
            if message.absences is not None:
                state.absences = message.absences
        link.push(
            Availability(
                rid=message.rid,
                user=message.user,
                time_zone=state.time_zone,
                viewer_time_zone=state.time_zone,
                hours=state.hours,
                absences=state.absences,
                open_now=state.open_now,
                policy="hold",
                emergency=("103", "112"),
                scheduled=scheduled,
                changes_at_ms=state.changes_at_ms,
                available_until_ms=state.available_until_ms,
                department=state.department,
                on_call=None if state.open_now else state.on_call,
                autoreply=state.autoreply,
            )
        )
        hook, self.after_availability = self.after_availability, None
        if hook is not None and isinstance(message, AvailabilityGet):
            hook()

    def _roster(self, link: _Link, message: RosterAdd | RosterRemove | RosterGet) -> None:
        if isinstance(message, RosterAdd):
            shift_id = max((s.shift for s in self.shifts), default=0) + 1
            self.shifts.append(
                RosterShift(
                    shift_id,
                    message.clinician,
                    message.department,
                    message.starts_ms,
                    message.ends_ms,
                )
            )
        elif isinstance(message, RosterRemove):
            if not any(s.shift == message.shift for s in self.shifts):
                link.push(_error(ErrorCode.NOT_FOUND, message.rid))
                return
            self.shifts = [s for s in self.shifts if s.shift != message.shift]
        link.push(Roster(rid=message.rid, shifts=tuple(self.shifts)))

    def _seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _push_queues(self) -> None:
        for link in self.links:
            device = link.device
            if device is None or link.closing:
                continue
            fresh = [i for i in device.queue if i.seq not in link.in_flight][:256]
            if fresh:
                link.in_flight.update(i.seq for i in fresh)
                link.push(Deliver(items=tuple(fresh)))

    # -- HTTP ------------------------------------------------------------------------------

    def token_owner(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        value = headers.get("Authorization", "")
        if not value.startswith("Bearer "):
            return None
        try:
            token = b64url_decode(value[len("Bearer ") :], "token")
        except ClientError:
            return None
        return self.tokens.get(token)

    def enroll(self, body: Mapping[str, Any]) -> tuple[int, object]:
        user = self.users.get(str(body.get("username")))
        if user is None or user.code is None or body.get("code") != user.code:
            return 403, {"error": {"code": "enrollment_failed", "message": "refused"}}
        try:
            identity_key = VerifyKey.from_text(str(body["identity_key"]))
            device_cert = DeviceCertificate.decode(
                b64url_decode(body["device_certificate"], "device_certificate")
            )
            user_cert = self.clinic.certify(
                user.user_id, identity_key, role=user.role, display_name=user.display_name
            )
            identity = verify_device(user_cert, device_cert)
            spk_bytes = b64url_decode(body["signed_prekey"], "signed_prekey")
            SignedPrekey.decode(spk_bytes).verify(identity)
            otks = [b64url_decode(o, "one_time_prekey") for o in body["one_time_prekeys"]]
        except (CryptoError, ClientError, KeyError, TypeError):
            return 400, {"error": {"code": "invalid_field", "message": "bad enrollment"}}
        user.code = None
        user.certificate = user_cert.encode()
        self.log_event(EventKind.USER_CERTIFIED, user.user_id, user_cert.encode())
        self.log_event(EventKind.DEVICE_ADDED, user.user_id, device_cert.encode())
        user.devices[device_cert.device_id] = FakeDevice(
            user.user_id,
            device_cert.device_id,
            device_cert.encode(),
            device_cert.signing_key,
            spk_bytes,
            otks,
        )
        return 200, {
            "username": user.user_id,
            "device_id": device_cert.device_id,
            "clinic": self.clinic.clinic_id,
            "user_certificate": b64url(user_cert.encode()),
            "issuing_certificate": b64url(self.clinic.issuing_certificate.encode()),
            "root_key": self.clinic.root.verify_key.to_text(),
            "server_time": self.now_ms(),
        }

    def link_request(
        self, method: str, path: str, headers: Mapping[str, str], body: Mapping[str, Any]
    ) -> tuple[int, object]:
        """The `/v1/link` endpoints: the real server's flow and checks, minus its limits."""
        parts = [p for p in path.split("/")[3:] if p]
        if method == "POST" and not parts:
            owner = self.token_owner(headers)
            if owner is None:
                return 401, _error_json("token_invalid")
            self.link_sessions = {c: s for c, s in self.link_sessions.items() if s.owner != owner}
            code = new_link_code(self.rng)
            self.link_sessions[code] = FakeLinkSession(
                code,
                owner,
                b64url_decode(body["commitment"], "commitment"),
                self.now_ms() + self.link_ttl_ms,
            )
            return 201, {"code": display_code(code), "expires": self.now_ms() + self.link_ttl_ms}
        try:
            session = self.link_sessions[normalize_link_code(parts[0])]
        except (ValueError, KeyError, IndexError):
            return 404, _error_json("not_found")
        if session.expires_ms <= self.now_ms():
            return 404, _error_json("not_found")
        action = (method, parts[1] if len(parts) > 1 else "")
        owned = self.token_owner(headers) == session.owner
        bearer = headers.get("Authorization", "")[len("Bearer ") :]
        joined = session.secret is not None and bearer == b64url(session.secret)
        if session.state == "cancelled" and method == "POST" and action[1] not in ("join", ""):
            message = "this device link was cancelled on the other device; nothing was linked"
            return 409, {"error": {"code": "unexpected_message", "message": message}}
        if action == ("POST", "join"):
            if session.state != "waiting":
                return 404, _error_json("not_found")
            session.secret = self.rng(32)
            session.state = "claimed"
            shown = session.commitment
            if self.link_mitm:
                session.shown_to_new = DHPrivateKey.generate(self.rng)
                shown = commitment(session.shown_to_new.public_key)
            return 200, {
                "secret": b64url(session.secret),
                "username": session.owner[0],
                "commitment": b64url(shown),
                "expires": session.expires_ms,
            }
        if action == ("POST", "cancel") and (owned or joined):
            if session.state in ("completed", "cancelled"):
                return 409, _error_json("unexpected_message")
            session.state = "cancelled"
            return 200, {"state": "cancelled"}
        if action[1] in ("device", "confirm", "peer"):
            if not joined:
                return 404, _error_json("not_found")
            if action == ("POST", "device") and session.state == "claimed":
                session.new_device = dict(body)
                session.state = "joined"
                if self.link_mitm:
                    session.shown_to_existing = DHPrivateKey.generate(self.rng)
                return 200, {"state": "joined", "expires": session.expires_ms}
            if action == ("POST", "confirm") and session.state == "revealed":
                session.state = "confirmed"
                return 200, {"state": "confirmed"}
            if action == ("GET", "peer"):
                answer: dict[str, object] = {"state": session.state}
                if session.state in ("revealed", "confirmed", "completed"):
                    shown_key = session.existing_key
                    if session.shown_to_new is not None:
                        shown_key = session.shown_to_new.public_key.to_text()
                    answer["ephemeral_key"] = shown_key
                if session.state == "completed":
                    answer["payload"] = session.payload
                return 200, answer
            return 409, _error_json("unexpected_message")
        if not owned:
            return 404, _error_json("not_found")
        if action == ("GET", ""):
            answer = {"state": session.state, "expires": session.expires_ms}
            new = session.new_device
            if new is not None and session.state in (
                "joined",
                "revealed",
                "confirmed",
                "completed",
            ):
                answer["ephemeral_key"] = new["ephemeral_key"]
                if session.shown_to_existing is not None:
                    answer["ephemeral_key"] = session.shown_to_existing.public_key.to_text()
                answer["device"] = new["device"]
            return 200, answer
        if action == ("POST", "reveal") and session.state == "joined":
            key = DHPublicKey.from_text(str(body["ephemeral_key"]))
            if not check_commitment(session.commitment, key):
                return 400, _error_json("invalid_field")
            session.existing_key = key.to_text()
            session.state = "revealed"
            return 200, {"state": "revealed"}
        if action == ("POST", "complete") and session.state == "confirmed":
            return self._complete_link(session, body)
        return 409, _error_json("unexpected_message")

    def _complete_link(
        self, session: FakeLinkSession, body: Mapping[str, Any]
    ) -> tuple[int, object]:
        user = self.users[session.owner[0]]
        new = session.new_device
        assert user.certificate is not None and new is not None  # noqa: S101
        try:
            cert_bytes = b64url_decode(body["device_certificate"], "device_certificate")
            cert = DeviceCertificate.decode(cert_bytes)
            verify_device(UserCertificate.decode(user.certificate), cert)
        except (CryptoError, ClientError):
            return 403, _error_json("forbidden")
        keys = new["device"]
        if (cert.device_id, cert.signing_key.to_text(), cert.dh_key.to_text()) != (
            keys["device_id"],
            keys["signing_key"],
            keys["dh_key"],
        ):
            return 400, _error_json("invalid_field")
        self.log_event(EventKind.DEVICE_ADDED, user.user_id, cert_bytes)
        user.devices[cert.device_id] = FakeDevice(
            user.user_id,
            cert.device_id,
            cert_bytes,
            cert.signing_key,
            b64url_decode(new["signed_prekey"], "signed_prekey"),
            [b64url_decode(o, "one_time_prekey") for o in new["one_time_prekeys"]],
        )
        session.payload = str(body["payload"])
        session.state = "completed"
        return 200, {"state": "completed", "device_id": cert.device_id, "time": self.now_ms()}


def _error_json(code: str) -> dict[str, object]:
    return {"error": {"code": code, "message": f"refused: {code}"}}


def _error(code: ErrorCode, rid: int | None) -> Error:
    return Error(code=code, message=f"refused: {code.value}", rid=rid)


class FakeHttp:
    """The relay's HTTP endpoints as an `HttpClient`."""

    def __init__(self, relay: FakeRelay) -> None:
        self._relay = relay
        self.requests: list[tuple[str, str]] = []

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_response_bytes: int = 64 * 1024,
    ) -> Deferred[HttpResponse]:
        relay = self._relay
        path = urlsplit(url).path
        self.requests.append((method, path))
        if relay.down:
            return fail(ClientError(LocalCode.SERVER_UNREACHABLE, "cannot connect (fake)"))
        headers = headers or {}
        if method == "POST" and path == "/v1/enroll":
            status, answer = relay.enroll(json.loads(body or b"{}"))
            return succeed(_json(status, answer))
        if path == "/v1/link" or path.startswith("/v1/link/"):
            status, answer = relay.link_request(method, path, headers, json.loads(body or b"{}"))
            return succeed(_json(status, answer))
        if path.startswith("/v1/blobs"):
            if relay.token_owner(headers) is None:
                return succeed(
                    _json(401, {"error": {"code": "not_authenticated", "message": "no"}})
                )
            if method == "POST" and path == "/v1/blobs":
                blob_id = relay.rng(16).hex()
                relay.blobs[blob_id] = body or b""
                return succeed(_json(201, {"blob_id": blob_id}))
            if method == "GET":
                data = relay.blobs.get(unquote(path[len("/v1/blobs/") :]))
                if data is None:
                    return succeed(_json(404, {"error": {"code": "not_found", "message": "no"}}))
                if len(data) > max_response_bytes:
                    return fail(ClientError(LocalCode.BAD_SERVER_ANSWER, "too large"))
                return succeed(HttpResponse(200, data, "application/octet-stream"))
        return succeed(_json(404, {"error": {"code": "not_found", "message": "no such path"}}))


def _json(status: int, value: object) -> HttpResponse:
    return HttpResponse(status, json.dumps(value).encode(), "application/json")


def run_until(
    d: Deferred[_T], relay: FakeRelay, clock: Any, *, step_s: float = 0.1, max_steps: int = 2000
) -> _T:
    """Pump the relay and advance the fake clock until `d` fires; its result, or its error
    raised. `clock` is a `twisted.internet.task.Clock`."""
    results: list[object] = []
    d.addBoth(results.append)
    for _ in range(max_steps):
        relay.pump()
        if results:
            break
        clock.advance(step_s)
    else:
        raise AssertionError("the Deferred never fired")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


# --- device links -----------------------------------------------------------------------------


@dataclass
class ScriptedLinkUi:
    """A `LinkUi` that records what it was shown and answers `answer` (a bool, or a function of
    the digits); `on_code` runs when the existing device shows its code."""

    answer: bool | Callable[[LinkCheck], bool] = True
    on_code: Callable[[LinkCode], None] | None = None
    codes: list[LinkCode] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    checks: list[LinkCheck] = field(default_factory=list)

    def show_code(self, code: LinkCode) -> None:
        self.codes.append(code)
        if self.on_code is not None:
            self.on_code(code)

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def confirm(self, check: LinkCheck) -> Deferred[bool]:
        self.checks.append(check)
        answer = self.answer(check) if callable(self.answer) else self.answer
        return succeed(answer)


@dataclass
class LinkOutcome:
    """How a link ended on each side: a result, or the error that side raised (`new` is None
    when the new device never started)."""

    existing: LinkResult | Exception
    new: ProfileInfo | Exception | None
    existing_ui: ScriptedLinkUi
    new_ui: ScriptedLinkUi


def _settle(world_run: Callable[[Deferred[_T]], _T], d: Deferred[_T]) -> _T | Exception:
    try:
        return world_run(d)
    except Exception as exc:  # a test inspects it
        return exc


# --- a whole test world -----------------------------------------------------------------------

TEST_PASSPHRASE: Final = "correct horse battery staple"  # noqa: S105 (a test fixture)
TEST_SERVER_URL: Final = "http://relay.test:8448"
TEST_START_S: Final = 1_763_884_800.0


class ClientWorld:
    """A fake relay, a fake clock, a seeded random source and profiles under `root`: enough to
    run engines (and the CLI) against each other in a unit test."""

    def __init__(self, root: Path, *, seed: bytes = b"medrelay client tests") -> None:
        self.root = root
        self.clock = Clock()
        self.clock.advance(TEST_START_S)
        self.rng = seeded_rng(seed)
        self.clinic = FakeClinic(self.rng)
        self.relay = FakeRelay(self.clinic, self.clock, self.rng)
        self.seal_params = SealParams.for_tests()

    def run(self, d: Deferred[_T]) -> _T:
        return run_until(d, self.relay, self.clock)

    def profile_dir(self, user_id: str, name: str = "main") -> Path:
        return self.root / f"{user_id}-{name}"

    def enroll(
        self,
        user_id: str,
        *,
        role: Role = Role.DOCTOR,
        passphrase: str = TEST_PASSPHRASE,
        name: str = "main",
    ) -> ProfileInfo:
        code = f"CODE-{user_id}"
        self.relay.add_user(user_id, code, role=role)
        return self.run(
            enroll(
                profile_dir=self.profile_dir(user_id, name),
                passphrase=passphrase,
                server_url=TEST_SERVER_URL,
                username=user_id,
                code=code,
                http=self.relay.http,
                clock=self.clock,
                rng=self.rng,
                runner=inline_runner,
                seal_params=self.seal_params,
            )
        )

    def open(self, user_id: str, name: str = "main", passphrase: str = TEST_PASSPHRASE) -> Engine:
        return self.run(
            open_engine(
                self.profile_dir(user_id, name),
                passphrase,
                reactor=self.clock,
                clock=self.clock,
                rng=self.rng,
                runner=inline_runner,
                http=self.relay.http,
                dialer=self.relay.dialer,
            )
        )

    def link(
        self,
        user_id: str,
        name: str,
        *,
        from_name: str = "main",
        existing_ui: ScriptedLinkUi | None = None,
        new_ui: ScriptedLinkUi | None = None,
        passphrase: str = TEST_PASSPHRASE,
    ) -> LinkOutcome:
        """Link a new device `name` for real (docs/protocol.md §16): the engine of `from_name`
        starts the link, and the new device joins with the code it shows; both run against the
        fake relay until each has finished."""
        existing_ui = existing_ui or ScriptedLinkUi()
        new_ui = new_ui or ScriptedLinkUi()
        joining: list[Deferred[ProfileInfo]] = []
        shown = existing_ui.on_code

        def start_new(code: LinkCode) -> None:
            if shown is not None:
                shown(code)
            joining.append(
                join_link(
                    profile_dir=self.profile_dir(user_id, name),
                    passphrase=passphrase,
                    server_url=TEST_SERVER_URL,
                    code=code.code,
                    http=self.relay.http,
                    clock=self.clock,
                    rng=self.rng,
                    runner=inline_runner,
                    ui=new_ui,
                    seal_params=self.seal_params,
                )
            )

        existing_ui.on_code = start_new
        engine = self.open(user_id, from_name)
        try:
            existing = _settle(self.run, engine.link_device(existing_ui))
            new: ProfileInfo | Exception | None = None
            if joining:
                new = _settle(self.run, joining[0])
        finally:
            existing_ui.on_code = shown
            self.run(engine.close())
        return LinkOutcome(existing, new, existing_ui, new_ui)

    def link_device(self, user_id: str, name: str, *, from_name: str = "main") -> ProfileInfo:
        """Add another device `name` to an enrolled user through the real link flow (`link`,
        both sides confirming), and return the new profile's info."""
        outcome = self.link(user_id, name, from_name=from_name)
        if isinstance(outcome.existing, Exception):
            raise outcome.existing
        if not isinstance(outcome.new, ProfileInfo):
            raise outcome.new or AssertionError("the new device never joined")
        return outcome.new
