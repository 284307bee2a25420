"""Care-link store functions (`medrelay.server.storage.care`) on SQLite and PostgreSQL: creating,
ending and listing links, the relationship of a pair, and bad input refused with one clear line
before anything is written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from store_worlds import SqlWorld, postgres_world, sqlite_world

from medrelay.crypto.certificates import Role
from medrelay.server.policy import Relationship, last_day
from medrelay.server.storage import care
from medrelay.server.storage.schema import care_links

DAY = care.DAY_MS
NOW = 1_763_884_800_000  # 2025-11-23T08:00:00Z


@pytest.fixture(params=["sqlite", "postgresql"])
def sql(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlWorld]:
    if request.param == "sqlite":
        world = sqlite_world(request.getfixturevalue("sqlite_relay_template"), tmp_path)
    else:
        world = postgres_world(request.getfixturevalue("postgres_relay_url"))
    for name, role in [
        ("petrov", "patient"),
        ("sidorov", "patient"),
        ("dr.ivanova", "doctor"),
        ("nurse.petrova", "nurse"),
        ("front.desk", "registrar"),
        ("it.admin", "admin"),
    ]:
        world.add_account(name, role)
    yield world
    world.close()


def create(sql: SqlWorld, **overrides: Any) -> care.CareLink:
    arguments: dict[str, Any] = {
        "patient": "petrov",
        "clinician": "dr.ivanova",
        "visit_date": "2025-11-20",
        "created_by": "front.desk",
        "actor_role": Role.REGISTRAR,
        "now_ms": NOW,
        **overrides,
    }
    return sql.run(care.create_link_txn, **arguments)


def link_rows(sql: SqlWorld) -> int:
    with sql.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(care_links)).scalar_one())


def test_a_link_records_the_visit_its_creator_and_a_year_by_default(sql: SqlWorld) -> None:
    link = create(sql)
    assert (link.patient, link.clinician, link.visit_date) == ("petrov", "dr.ivanova", "2025-11-20")
    assert (link.created_ms, link.created_by, link.ended_ms) == (NOW, "front.desk", None)
    assert last_day(link.ends_ms) == "2026-11-23"  # through the whole day a year on
    assert link.ends_ms == care.end_of_day_ms("2026-11-23")
    (listed,) = sql.run(care.links_txn, "petrov")
    assert listed == link
    assert sql.run(care.links_txn, "dr.ivanova") == [link]
    assert sql.run(care.links_txn, "nurse.petrova") == []


def test_relationship_follows_the_link_through_its_life(sql: SqlWorld) -> None:
    def state(a: str, b: str, now_ms: int) -> Relationship:
        return sql.run(care.relationship_txn, a, b, now_ms)

    assert state("petrov", "dr.ivanova", NOW) is Relationship.NONE
    create(sql, ends_ms=NOW + 10 * DAY)
    assert state("petrov", "dr.ivanova", NOW) is Relationship.ACTIVE
    assert state("dr.ivanova", "petrov", NOW + DAY) is Relationship.ACTIVE
    assert state("petrov", "dr.ivanova", NOW + 10 * DAY) is Relationship.ENDED
    assert state("petrov", "nurse.petrova", NOW) is Relationship.NONE
    assert state("dr.ivanova", "nurse.petrova", NOW) is Relationship.NONE
    sql.revoke_account("dr.ivanova")
    assert state("petrov", "dr.ivanova", NOW) is Relationship.REVOKED
    with pytest.raises(care.UnknownAccount, match="no account named 'ghost'"):
        state("petrov", "ghost", NOW)


def test_ending_early_keeps_the_history_and_a_new_link_renews(sql: SqlWorld) -> None:
    create(sql)
    ended = sql.run(
        care.end_link_txn,
        patient="petrov",
        clinician="dr.ivanova",
        ended_by="dr.ivanova",
        actor_role=Role.DOCTOR,
        now_ms=NOW + DAY,
    )
    assert (ended.ended_ms, ended.ended_by) == (NOW + DAY, "dr.ivanova")
    assert sql.run(care.relationship_txn, "petrov", "dr.ivanova", NOW + DAY) is Relationship.ENDED
    renewed = create(sql, visit_date="2025-11-24", now_ms=NOW + 2 * DAY)
    links = sql.run(care.links_txn, "petrov")
    assert [(x.pk, x.state(NOW + 2 * DAY)) for x in links] == [
        (ended.pk, Relationship.ENDED),
        (renewed.pk, Relationship.ACTIVE),
    ]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"patient": "ghost"}, care.UnknownAccount, "no account named 'ghost'"),
        ({"clinician": "ghost"}, care.UnknownAccount, "no account named 'ghost'"),
        ({"patient": "dr.ivanova"}, care.WrongRole, "dr.ivanova is a doctor, not a patient"),
        (
            {"clinician": "front.desk"},
            care.WrongRole,
            "front.desk is a registrar; care links are with doctors and nurses",
        ),
        ({"clinician": "sidorov"}, care.WrongRole, "sidorov is a patient; care links are"),
        ({"visit_date": "2025-11-25"}, care.InvalidDate, "visit date 2025-11-25 is in the future"),
        ({"visit_date": "20.11.2025"}, care.InvalidDate, "is not a date in the form YYYY-MM-DD"),
        ({"visit_date": "2025-02-30"}, care.InvalidDate, "is not a valid calendar date"),
        ({"ends_ms": NOW}, care.InvalidDate, "the end date 2025-11-23 is already over"),
        (
            {"created_by": "nurse.petrova", "actor_role": Role.NURSE},
            care.NotAllowed,
            "not allowed: nurse accounts cannot create care links for patient accounts",
        ),
        (
            {"created_by": "petrov", "actor_role": Role.PATIENT},
            care.NotAllowed,
            "not allowed: you cannot create care links for your own account",
        ),
    ],
)
def test_bad_input_is_refused_with_one_line_and_writes_nothing(
    sql: SqlWorld, overrides: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)) as caught:
        create(sql, **overrides)
    assert isinstance(caught.value, care.CareLinkError) and "\n" not in str(caught.value)
    assert link_rows(sql) == 0


def test_a_visit_today_anywhere_on_earth_is_not_in_the_future(sql: SqlWorld) -> None:
    """08:00 UTC on 2025-11-23 is already 22:00 on the 23rd at UTC+14, not yet the 24th."""
    assert create(sql, visit_date="2025-11-23").visit_date == "2025-11-23"
    with pytest.raises(care.InvalidDate):
        create(sql, clinician="nurse.petrova", visit_date="2025-11-24")


def test_a_second_active_link_for_the_pair_is_refused(sql: SqlWorld) -> None:
    create(sql)
    with pytest.raises(care.LinkExists, match="petrov already has an active care link with dr"):
        create(sql, created_by="it.admin", actor_role=Role.ADMIN)
    assert link_rows(sql) == 1
    create(sql, clinician="nurse.petrova")  # another clinician is another pair
    assert link_rows(sql) == 2


def test_closed_accounts_cannot_be_linked(sql: SqlWorld) -> None:
    sql.revoke_account("petrov")
    with pytest.raises(care.AccountClosed, match="the account petrov is closed"):
        create(sql)
    assert link_rows(sql) == 0


def test_ending_needs_an_active_link_and_an_allowed_actor(sql: SqlWorld) -> None:
    def end(**overrides: Any) -> care.CareLink:
        arguments: dict[str, Any] = {
            "patient": "petrov",
            "clinician": "dr.ivanova",
            "ended_by": "front.desk",
            "actor_role": Role.REGISTRAR,
            "now_ms": NOW,
            **overrides,
        }
        return sql.run(care.end_link_txn, **arguments)

    with pytest.raises(
        care.NoActiveLink, match=re.escape("petrov has no active care link with dr.ivanova")
    ):
        end()
    create(sql)
    with pytest.raises(care.NotAllowed, match="nurse accounts cannot end care links"):
        end(ended_by="nurse.petrova", actor_role=Role.NURSE)
    assert sql.run(care.links_txn, "petrov")[0].ended_ms is None
    end()
    with pytest.raises(care.NoActiveLink):
        end(now_ms=NOW + 1)


def test_only_patients_and_clinicians_have_link_lists(sql: SqlWorld) -> None:
    with pytest.raises(care.WrongRole, match=re.escape("front.desk is a registrar; only patients")):
        sql.run(care.links_txn, "front.desk")
    with pytest.raises(care.UnknownAccount):
        sql.run(care.links_txn, "ghost")


def test_end_of_day_is_the_next_midnight_utc() -> None:
    assert care.end_of_day_ms("2025-11-23") == NOW - 8 * 3_600_000 + DAY
    with pytest.raises(care.InvalidDate, match="end date '2025-11' is not a date"):
        care.end_of_day_ms("2025-11")
