"""Staff requests through `StaffService` on a migrated SQLite database: registrars create
patients (whose codes then enroll), admins create staff, registrars link patients to clinicians,
and the directory shows each person only whom the policy lets them see, verified by certificate.
Every change and refusal is audited with the staff member as the actor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_app_support import (
    NOW_MS,
    IdentityWorld,
    failure_of,
    identity_world,
    sync_worker,
    value,
)

from medrelay.crypto.certificates import Role, UserCertificate
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import (
    AccountCreate,
    AccountCreated,
    Directory,
    DirectorySearch,
    LinkCreate,
    LinkEnd,
    LinkState,
)
from medrelay.server.audit import list_audit_txn
from medrelay.server.relay.errors import RelayError
from medrelay.server.relay.store import DeviceRecord
from medrelay.server.staff import StaffService

TODAY = "2025-11-23"  # NOW_MS's UTC date
DAY_MS = 24 * 3600 * 1000


@dataclass
class World(IdentityWorld):
    staff: StaffService

    def person(
        self,
        username: str,
        role: Role,
        name: str = "",
        specialty: str | None = None,
        department: str | None = None,
    ) -> DeviceRecord:
        self.enroll(username, role, display_name=name, specialty=specialty, department=department)
        return DeviceRecord(0, username, "d", role.value, b"", b"")

    def search(self, who: DeviceRecord, query: str = "", **filters: str) -> list[str]:
        answer = value(self.staff.search(who, DirectorySearch(rid=1, query=query, **filters)))
        assert isinstance(answer, Directory)
        for entry in answer.entries:  # every entry is a certificate naming the user
            assert UserCertificate.decode(entry.certificate).user_id == entry.user
        return sorted(entry.user for entry in answer.entries)

    def link(self, who: DeviceRecord, patient: str, clinician: str, **extra: str) -> LinkState:
        message = LinkCreate(rid=2, patient=patient, clinician=clinician, visit=TODAY, **extra)
        return value(self.staff.create_link(who, message))

    def refusal(self, d: object) -> RelayError:
        error = failure_of(d)  # type: ignore[arg-type]
        assert isinstance(error, RelayError)
        return error


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    base = identity_world(tmp_path, b"staff tests")
    staff = StaffService(
        database=base.database,
        worker=sync_worker(),
        clock=base.clock,
        rng=base.rng,
        enrollment=base.config.enrollment,
    )
    yield World(**vars(base), staff=staff)
    base.database.close()


def test_a_registrar_creates_a_patient_whose_code_enrolls(world: World) -> None:
    registrar = world.person("front.desk", Role.REGISTRAR)
    created = value(
        world.staff.create_account(
            registrar, AccountCreate(rid=3, user="petrov", role="patient", name="Ivan Petrov")
        )
    )
    assert isinstance(created, AccountCreated) and created.user == "petrov"
    assert created.expires_ms == NOW_MS + 72 * 3600 * 1000
    world.enroll_with("petrov", created.code)
    records = value(
        world.database.run_interaction("audit", list_audit_txn, action="account_create")
    )
    assert [(r.record.actor, r.record.target) for r in records][-1] == ("front.desk", "petrov")


@pytest.mark.parametrize(
    ("creator", "role"),
    [(Role.DOCTOR, "patient"), (Role.REGISTRAR, "doctor"), (Role.PATIENT, "patient")],
)
def test_account_creation_follows_the_policy_table(world: World, creator: Role, role: str) -> None:
    who = world.person("someone", creator)
    error = world.refusal(
        world.staff.create_account(who, AccountCreate(rid=1, user="new", role=role, name="N"))
    )
    assert error.code is ErrorCode.FORBIDDEN


def test_an_admin_creates_staff_and_a_taken_name_is_refused(world: World) -> None:
    admin = world.person("it.admin", Role.ADMIN)
    message = AccountCreate(
        rid=1, user="dr.new", role="doctor", name="Dr. New", specialty="cardiology"
    )
    assert value(world.staff.create_account(admin, message)).user == "dr.new"
    error = world.refusal(world.staff.create_account(admin, message))
    assert error.code is ErrorCode.FORBIDDEN and "already exists" in error.message
    bad = AccountCreate(rid=1, user="x", role="nurse", name="bad\u202ename")
    assert world.refusal(world.staff.create_account(admin, bad)).code is ErrorCode.INVALID_FIELD


def test_a_patient_finds_only_their_care_team(world: World) -> None:
    registrar = world.person("front.desk", Role.REGISTRAR)
    patient = world.person("petrov", Role.PATIENT, "Ivan Petrov")
    world.person("dr.ivanova", Role.DOCTOR, "Анна Иванова", "cardiology", "Ward 3")
    world.person("dr.sidorov", Role.DOCTOR, "Пётр Сидоров", "surgery", "Ward 1")
    assert world.search(patient) == ["petrov"]  # only themselves before any link
    state = world.link(registrar, "petrov", "dr.ivanova")
    assert state.ended_ms is None and state.visit == TODAY
    assert world.search(patient) == ["dr.ivanova", "petrov"]
    assert world.search(patient, "иванова") == ["dr.ivanova"]  # Cyrillic, case-folded
    ended = value(
        world.staff.end_link(registrar, LinkEnd(rid=4, patient="petrov", clinician="dr.ivanova"))
    )
    assert ended.ended_ms == NOW_MS
    assert world.search(patient) == ["petrov"]


def test_clinicians_find_staff_by_specialty_and_department(world: World) -> None:
    nurse = world.person("nurse.petrova", Role.NURSE, "Olga Petrova")
    world.person("dr.ivanova", Role.DOCTOR, "Anna Ivanova", "cardiology", "Ward 3")
    world.person("dr.sidorov", Role.DOCTOR, "Petr Sidorov", "surgery", "Ward 1")
    world.person("petrov", Role.PATIENT, "Ivan Petrov")
    assert world.search(nurse, specialty="Cardio") == ["dr.ivanova"]
    assert world.search(nurse, department="ward 1") == ["dr.sidorov"]
    assert world.search(nurse, "petrov") == ["nurse.petrova"]  # not the unlinked patient


def test_link_refusals_are_clear_and_audited(world: World) -> None:
    doctor = world.person("dr.ivanova", Role.DOCTOR)
    nurse = world.person("nurse.petrova", Role.NURSE)
    world.person("petrov", Role.PATIENT)
    future = LinkCreate(rid=1, patient="petrov", clinician="dr.ivanova", visit="2099-01-01")
    error = world.refusal(world.staff.create_link(doctor, future))
    assert error.code is ErrorCode.FORBIDDEN and "future" in error.message
    by_nurse = LinkCreate(rid=1, patient="petrov", clinician="dr.ivanova", visit=TODAY)
    assert world.refusal(world.staff.create_link(nurse, by_nurse)).code is ErrorCode.FORBIDDEN
    world.link(doctor, "petrov", "dr.ivanova", until="2026-01-31")
    again = world.refusal(world.staff.create_link(doctor, by_nurse))
    assert "already has an active care link" in again.message
    records = value(world.database.run_interaction("audit", list_audit_txn, action="link_create"))
    results = [(r.record.actor, r.record.result) for r in records]
    assert results == [
        ("dr.ivanova", "refused"),
        ("nurse.petrova", "refused"),
        ("dr.ivanova", "ok"),
        ("dr.ivanova", "refused"),
    ]
