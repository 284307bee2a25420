"""Teleconsultation visits through the relay (`visit_open`, `visit_close`, `visit_list`, docs/
protocol.md §18) with the SQL stores on a fake clock: who may open, close and read a visit, every
refusal's code and words, the server-made ids, the consent mode kept from the opening, the audit
records (fields named, never the indication or the conclusion id), the metrics, and the records
gateway's receipts to patients."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from relay_harness import FakeClient, Relay
from store_worlds import SqlWorld, postgres_world, sqlite_world

from medrelay.crypto.rng import seeded_rng
from medrelay.protocol.messages import (
    CONSENT_MODES,
    Deliver,
    DeviceList,
    DevicesGet,
    Error,
    Indication,
    Message,
    OutboundEnvelope,
    Send,
    Sent,
    VisitClose,
    VisitInfo,
    VisitList,
    VisitOpen,
    Visits,
)
from medrelay.server import audit
from medrelay.server.config import (
    DEFAULT_INDICATIONS,
    ConsentMode,
    IndicationConfig,
    VisitsConfig,
)
from medrelay.server.policy import utc_date
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.visits import (
    VISIT_ID,
    VisitService,
    draw_ids,
    normalize_visit_id,
    visit_id_of,
)

DAY_MS = 86_400_000
CONCLUSION = b"conclusion-id-01"
Row = tuple[str, str, str, str, str]


class World:
    def __init__(self, sql: SqlWorld) -> None:
        self.sql = sql
        self.relay = Relay(sql)
        self.now = int(self.relay.clock.seconds() * 1000)
        self.devices: dict[str, DeviceRecord] = {}
        for name, role in (
            ("doc", "doctor"),
            ("doc2", "doctor"),
            ("nurse", "nurse"),
            ("pat", "patient"),
            ("pat2", "patient"),
            ("pat3", "patient"),
            ("rec", "records"),
        ):
            self.relay.account(name, role)
            self.devices[name] = self.relay.device(name, "d1")
        sql.add_care_link("pat", "doc", start_ms=self.now - DAY_MS, ends_ms=self.now + 300 * DAY_MS)
        sql.add_care_link("pat", "nurse", start_ms=self.now - DAY_MS, ends_ms=self.now + DAY_MS)
        sql.add_care_link("pat", "doc2", start_ms=self.now - DAY_MS, ends_ms=self.now + DAY_MS)
        self.pat2_link_end = self.now - 2 * DAY_MS
        sql.add_care_link(
            "pat2", "doc", start_ms=self.now - 30 * DAY_MS, ends_ms=self.pat2_link_end
        )
        self.use(VisitsConfig())
        self.clients: dict[str, FakeClient] = {}

    def use(self, config: VisitsConfig) -> None:
        self.relay.service.visits = VisitService(
            database=self.sql.db,
            clock=self.relay.clock,
            rng=seeded_rng(b"visits"),
            config=config,
            metrics=self.relay.metrics,
        )

    def client(self, who: str) -> FakeClient:
        if who not in self.clients:
            self.clients[who] = self.relay.online(self.devices[who])
        return self.clients[who]

    def ask(self, who: str, message: Message) -> Message:
        client = self.client(who)
        client.send(message)
        self.relay.settle()
        answers = [m for m in client.take() if not isinstance(m, Deliver)]
        (answer,) = answers
        return answer

    def visits(self, who: str, message: Message) -> Visits:
        answer = self.ask(who, message)
        assert isinstance(answer, Visits), answer
        assert answer.indications == tuple(Indication(i.code, i.name) for i in DEFAULT_INDICATIONS)
        return answer

    def refused(self, who: str, message: Message, code: str) -> str:
        answer = self.ask(who, message)
        assert isinstance(answer, Error), answer
        assert answer.code == code, answer
        return answer.message

    def open(self, who: str = "doc", patient: str = "pat", indication: str = "test-results") -> str:
        answer = self.visits(who, VisitOpen(rid=1, patient=patient, indication=indication))
        (visit,) = answer.visits
        return visit.visit

    def records(self) -> list[Row]:
        entries = self.sql.run(audit.list_audit_txn, limit=1000)
        return [
            (e.record.actor, e.record.action, e.record.target, e.record.result, e.record.detail)
            for e in entries
            if e.record.action.startswith("visit_")
        ]

    def advance(self, ms: int) -> None:
        self.relay.clock.advance(ms / 1000)
        self.now += ms


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "sqlite":
        sql = sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    else:
        sql = postgres_world(request.getfixturevalue("postgres_relay_url"))
    try:
        yield World(sql)
    finally:
        sql.close()


# --- opening ------------------------------------------------------------------------------------


def test_a_doctor_opens_a_visit_for_a_linked_patient(world: World) -> None:
    answer = world.visits("doc", VisitOpen(rid=7, patient="pat", indication="sick-leave-closing"))
    assert answer.rid == 7
    assert answer.consent == "notice"
    (visit,) = answer.visits
    assert VISIT_ID.fullmatch(visit.visit)
    assert len(visit.thread) == 16
    assert visit == VisitInfo(
        visit=visit.visit,
        thread=visit.thread,
        patient="pat",
        clinician="doc",
        indication="sick-leave-closing",
        consent="notice",
        opened_ms=world.now,
    )
    assert world.records() == [
        ("doc", "visit_open", "pat", "ok", f"visit={visit.visit}; fields=indication,consent")
    ]
    assert world.relay.counter("medrelay_visits_total", event="opened") == 1
    # Another doctor linked to the same patient has a visit of their own.
    other = world.open("doc2")
    assert other != visit.visit


def test_opening_is_refused_with_the_reason(world: World) -> None:
    message = world.refused(
        "nurse", VisitOpen(rid=1, patient="pat", indication="test-results"), "forbidden"
    )
    assert message == (
        "not allowed: nurse accounts cannot open teleconsultation visits with patient accounts"
    )
    for who in ("pat", "rec"):
        world.refused(who, VisitOpen(rid=1, patient="pat", indication="test-results"), "forbidden")
    message = world.refused(
        "doc", VisitOpen(rid=1, patient="pat3", indication="test-results"), "forbidden"
    )
    assert message == (
        "you have no care link with pat3: a teleconsultation follows an in-person visit; ask "
        "the front desk to record it (medrelay-server admin link)"
    )
    message = world.refused(
        "doc", VisitOpen(rid=1, patient="pat2", indication="test-results"), "forbidden"
    )
    assert f"ended on {utc_date(world.pat2_link_end - 1)}" in message
    assert "medrelay-server admin link" in message
    message = world.refused(
        "doc", VisitOpen(rid=1, patient="pat", indication="astrology"), "invalid_field"
    )
    assert message.startswith("indication: 'astrology' is not one of the clinic's indications")
    assert all(i.code in message for i in DEFAULT_INDICATIONS)
    world.refused(
        "doc", VisitOpen(rid=1, patient="nobody", indication="test-results"), "unknown_user"
    )
    world.refused("doc", VisitOpen(rid=1, patient="doc2", indication="test-results"), "forbidden")
    first = world.open()
    message = world.refused(
        "doc", VisitOpen(rid=1, patient="pat", indication="therapy-control"), "forbidden"
    )
    assert message == f"pat already has an open visit with you, {first}; close it first"
    # Forbidden attempts are recorded as refused; invalid input and unknown people are not.
    refused = [r for r in world.records() if r[3] == "refused"]
    assert refused == [
        ("nurse", "visit_open", "pat", "refused", "reason=forbidden"),
        ("pat", "visit_open", "pat", "refused", "reason=forbidden"),
        ("rec", "visit_open", "pat", "refused", "reason=forbidden"),
        ("doc", "visit_open", "pat3", "refused", "reason=forbidden"),
        ("doc", "visit_open", "pat2", "refused", "reason=forbidden"),
        ("doc", "visit_open", "doc2", "refused", "reason=forbidden"),
        ("doc", "visit_open", "pat", "refused", "reason=forbidden"),
    ]
    assert world.relay.counter("medrelay_visits_total", event="opened") == 1


def test_a_closed_patient_account_cannot_get_a_visit(world: World) -> None:
    world.sql.revoke_account("pat")
    message = world.refused(
        "doc", VisitOpen(rid=1, patient="pat", indication="test-results"), "unknown_user"
    )
    assert "closed" in message


def test_the_audit_log_never_holds_the_indication_or_the_conclusion(world: World) -> None:
    visit = world.open(indication="dispensary-observation")
    world.visits("doc", VisitClose(rid=2, visit=visit, conclusion=CONCLUSION))
    for entry in world.sql.run(audit.list_audit_txn, limit=1000):
        assert "dispensary" not in entry.record.detail
        assert CONCLUSION.hex() not in entry.record.detail
    assert world.sql.run(audit.verify_audit_txn).intact


# --- closing ------------------------------------------------------------------------------------


def test_the_visits_doctor_closes_it_once_with_a_conclusion(world: World) -> None:
    visit = world.open()
    world.advance(15 * 60_000)
    answer = world.visits("doc", VisitClose(rid=3, visit=visit, conclusion=CONCLUSION))
    (closed,) = answer.visits
    assert (closed.visit, closed.closed_ms, closed.conclusion) == (visit, world.now, CONCLUSION)
    assert closed.opened_ms == world.now - 15 * 60_000
    # The same close again (its answer was lost): the same answer, nothing new recorded.
    world.advance(60_000)
    again = world.visits("doc", VisitClose(rid=4, visit=visit, conclusion=CONCLUSION))
    assert again.visits == answer.visits
    message = world.refused(
        "doc", VisitClose(rid=5, visit=visit, conclusion=b"another-id-00001"), "forbidden"
    )
    assert message == (
        f"visit {visit} was already closed at {audit.utc_text(closed.closed_ms or 0)}; its "
        "conclusion cannot change"
    )
    assert world.records()[1:] == [
        ("doc", "visit_close", "pat", "ok", f"visit={visit}; fields=conclusion"),
        ("doc", "visit_close", "", "refused", f"visit={visit}; reason=forbidden"),
    ]
    assert world.relay.counter("medrelay_visits_total", event="closed") == 1
    # Closed, the pair may open a new one.
    assert world.open() != visit


def test_someone_elses_visit_is_answered_as_one_that_does_not_exist(world: World) -> None:
    visit = world.open()
    for who, code in (("doc2", "not_found"), ("pat", "forbidden"), ("nurse", "forbidden")):
        world.refused(who, VisitClose(rid=1, visit=visit, conclusion=CONCLUSION), code)
    theirs = world.refused(
        "doc2", VisitClose(rid=1, visit=visit, conclusion=CONCLUSION), "not_found"
    )
    missing = world.refused(
        "doc2", VisitClose(rid=1, visit="V00000000", conclusion=CONCLUSION), "not_found"
    )
    assert theirs == f"no visit {visit} of yours"
    assert missing == "no visit V00000000 of yours"
    theirs = world.refused("doc2", VisitList(rid=1, visit=visit), "not_found")
    assert theirs == f"no visit {visit} of yours"
    world.refused("pat2", VisitList(rid=1, visit=visit), "not_found")


def test_closing_does_not_depend_on_the_link_still_being_active(world: World) -> None:
    visit = world.open("doc2")
    world.advance(2 * DAY_MS)  # the doc2 link has ended
    world.visits("doc2", VisitClose(rid=1, visit=visit, conclusion=CONCLUSION))


# --- listing ------------------------------------------------------------------------------------


def test_everyone_lists_their_own_visits_newest_first(world: World) -> None:
    first = world.open("doc")
    world.advance(60_000)
    second = world.open("doc2")
    world.visits("doc", VisitClose(rid=1, visit=first, conclusion=CONCLUSION))

    def ids(who: str, **options: object) -> list[str]:
        answer = world.visits(who, VisitList(rid=9, **options))  # type: ignore[arg-type]
        assert answer.rid == 9
        return [v.visit for v in answer.visits]

    assert ids("pat") == [second, first]
    assert ids("pat", open_only=True) == [second]
    assert ids("doc") == [first]
    assert ids("doc", open_only=True) == []
    assert ids("doc2") == [second]
    assert ids("pat2") == ids("nurse") == ids("rec") == []
    assert ids("pat", visit=first) == [first]
    assert ids("pat", visit=first, open_only=True) == []
    assert ids("doc", visit=first.lower().replace("1", "l")) == [first]


def test_the_records_gateway_reads_any_visit_but_only_by_id(world: World) -> None:
    visit = world.open()
    (seen,) = world.visits("rec", VisitList(rid=1, visit=visit)).visits
    assert (seen.visit, seen.patient, seen.clinician) == (visit, "pat", "doc")
    assert world.visits("rec", VisitList(rid=1)).visits == ()
    message = world.refused("rec", VisitList(rid=1, visit="V00000000"), "not_found")
    assert message == "no visit V00000000"


def test_the_consent_mode_of_the_opening_stays_with_the_visit(world: World) -> None:
    assert set(CONSENT_MODES) == {mode.value for mode in ConsentMode}
    world.use(VisitsConfig(consent=ConsentMode.EXPLICIT))
    answer = world.visits("doc", VisitOpen(rid=1, patient="pat", indication="test-results"))
    assert answer.consent == "explicit"
    assert answer.visits[0].consent == "explicit"
    world.use(VisitsConfig())
    answer = world.visits("pat", VisitList(rid=1))
    assert answer.consent == "notice"
    assert answer.visits[0].consent == "explicit"


def test_a_clinics_own_indications_are_offered_and_enforced(world: World) -> None:
    ours = (IndicationConfig("wound-check", "Checking how a wound heals"),)
    world.use(VisitsConfig(indications=ours))
    answer = world.ask("doc", VisitOpen(rid=1, patient="pat", indication="wound-check"))
    assert isinstance(answer, Visits)
    assert answer.indications == (Indication("wound-check", "Checking how a wound heals"),)
    message = world.refused(
        "doc", VisitOpen(rid=1, patient="pat2", indication="test-results"), "invalid_field"
    )
    assert message.endswith("indications (wound-check)")


def test_a_server_without_visits_says_so(world: World) -> None:
    world.relay.service.visits = None
    message = world.refused("pat", VisitList(rid=1), "not_found")
    assert message == "this server does not serve visit_list"


# --- the records gateway's receipts -------------------------------------------------------------


def test_the_records_gateway_writes_to_patients_who_verify_it_but_cannot_write_back(
    world: World,
) -> None:
    rec = world.client("rec")
    rid = rec.send_text(b"receipt-id-00001", [("pat", "d1")])
    world.relay.settle()
    (sent,) = [m for m in rec.take() if isinstance(m, Sent)]
    assert sent.rid == rid
    answer = world.ask("pat", DevicesGet(rid=2, user="rec"))
    assert isinstance(answer, DeviceList)
    message = world.refused(
        "pat",
        Send(
            rid=3,
            message_id=b"reply-id-0000001",
            envelopes=(OutboundEnvelope("rec", "d1", b"x"),),
        ),
        "forbidden",
    )
    assert "patient accounts cannot write to records accounts" in message


# --- visit ids ----------------------------------------------------------------------------------


def test_visit_ids_are_v_and_eight_crockford_characters() -> None:
    assert visit_id_of(bytes(5)) == "V00000000"
    assert visit_id_of(b"\xff" * 5) == "VZZZZZZZZ"
    assert visit_id_of(bytes([0x08, 0x86, 0x42, 0x98, 0xE8])) == "V12345678"
    with pytest.raises(ValueError):
        visit_id_of(bytes(4))
    drawn = draw_ids(seeded_rng(b"ids"))
    assert len(drawn) == 4
    assert all(VISIT_ID.fullmatch(v) and len(t) == 16 for v, t in drawn)
    assert len({v for v, _ in drawn}) == 4
    assert normalize_visit_id("v1234567o") == "V12345670"
    assert normalize_visit_id("vlI345678") == "V11345678"
    assert normalize_visit_id("V1234") == "V1234"
    assert normalize_visit_id("Vabc!") == "Vabc!"
    assert not re.fullmatch(VISIT_ID, "VU0000000")
