"""The FHIR mapping: a verified record becomes a valid, deterministic R4 transaction Bundle with
stable clinic-owned identifiers, conditional creates and a Provenance carrying the signatures."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from record_world import CLINIC, DOCTOR, PATIENT, SECRET_TEXT, T0
from records_world import RECORDS, World

from medrelay.clients.records.fhir_mapping import (
    ATTACHMENT_SHA256_URL,
    SIGNED_CONTENT_FORMAT,
    SOURCE_SIGNATURE,
    MappingError,
    MirrorInput,
    build_transaction,
    canonical_json,
    validate,
)
from medrelay.crypto.content import SignedContent
from medrelay.crypto.records import verify_record_bundle
from medrelay.crypto.rng import Rng


def mirror_input(world: World) -> tuple[MirrorInput, list[SignedContent]]:
    messages = world.exchange()
    bundle = world.bundle(messages)
    record = verify_record_bundle(bundle, clinic_id=CLINIC, root_key=world.root.verify_key)
    return (
        MirrorInput(
            clinic_id=CLINIC,
            mirror_id="0123456789abcdef0123456789abcdef",
            record=record,
            signed_messages=bundle.messages,
            gateway_user=RECORDS,
            recorded_ms=T0 + 200 * 60_000,
            indication_name="Hypertension follow-up",
        ),
        messages,
    )


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_the_bundle_validates_and_maps_every_part(rng: Rng) -> None:
    source, messages = mirror_input(World(rng))
    bundle = build_transaction(source)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    (encounter,) = resources(bundle, "Encounter")
    assert encounter["class"]["code"] == "VR"
    assert encounter["status"] == "finished"
    assert encounter["reasonCode"][0]["coding"][0]["code"] == "I10"
    assert encounter["reasonCode"][0]["text"] == "Hypertension follow-up"
    assert encounter["subject"]["identifier"] == {
        "system": "urn:medrelay:clinic-a:user",
        "value": PATIENT,
    }
    communications = resources(bundle, "Communication")
    assert len(communications) == len(messages)
    assert communications[0]["payload"][0]["contentString"].startswith(SECRET_TEXT)
    # the reply links to the message it answers, by its urn:uuid fullUrl
    assert communications[1]["inResponseTo"][0]["reference"] == bundle["entry"][1]["fullUrl"]
    attachment = communications[2]["payload"][1]["contentAttachment"]
    assert attachment["extension"][0]["url"] == ATTACHMENT_SHA256_URL
    descriptor = messages[2].content.attachments[0]
    assert attachment["extension"][0]["valueString"] == descriptor.plaintext_sha256.hex()
    assert communications[3]["category"][0]["coding"][0]["code"] == "conclusion"
    (composition,) = resources(bundle, "Composition")
    assert composition["type"]["coding"][0]["code"] == "11488-4"
    assert "amlodipine" in composition["section"][0]["text"]["div"]
    assert composition["section"][0]["entry"][0]["reference"] == bundle["entry"][4]["fullUrl"]
    (provenance,) = resources(bundle, "Provenance")
    assert len(provenance["target"]) == len(bundle["entry"]) - 1
    signatures = provenance["signature"]
    assert [s["sigFormat"] for s in signatures] == [SIGNED_CONTENT_FORMAT] * len(messages)
    for signature, signed in zip(signatures, messages, strict=True):
        assert base64.b64decode(signature["data"]) == signed.encode()
        assert signature["who"]["identifier"]["value"] == signed.content.sender_user_id
    # nobody is named: people are identifiers only
    text = json.dumps(bundle)
    assert '"name"' not in text
    assert DOCTOR in text


def test_the_clinicians_signed_request_is_kept_as_the_source_signature(rng: Rng) -> None:
    source, messages = mirror_input(World(rng))
    request = b"the record_bundle message as the doctor's device signed it"
    bundle = build_transaction(dataclasses.replace(source, request_signed=request))
    Bundle.model_validate(bundle)
    (provenance,) = resources(bundle, "Provenance")
    *authors, last = provenance["signature"]
    assert len(authors) == len(messages)
    assert last["type"][0]["code"] == SOURCE_SIGNATURE
    assert base64.b64decode(last["data"]) == request
    assert last["who"]["identifier"]["value"] == DOCTOR


def test_attachment_bytes_are_embedded_with_r4s_sha1_hash(rng: Rng) -> None:
    source, _ = mirror_input(World(rng))
    data = b"%PDF-1.7 an ECG trace"
    bundle = build_transaction(dataclasses.replace(source, attachment_data={(2, 0): data}))
    Bundle.model_validate(bundle)
    attachment = resources(bundle, "Communication")[2]["payload"][1]["contentAttachment"]
    assert base64.b64decode(attachment["data"]) == data
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()  # noqa: S324
    described_only = resources(build_transaction(source), "Communication")[2]["payload"][1]
    assert "data" not in described_only["contentAttachment"]


def test_every_entry_is_idempotent_on_the_server(rng: Rng) -> None:
    source, _ = mirror_input(World(rng))
    bundle = build_transaction(source)
    for entry in bundle["entry"]:
        request = entry["request"]
        resource = entry["resource"]
        if resource["resourceType"] == "Provenance":
            assert request == {"method": "PUT", "url": f"Provenance/{resource['id']}"}
        else:
            identifier = resource["identifier"]
            first = identifier[0] if isinstance(identifier, list) else identifier
            assert first["system"].startswith("urn:medrelay:clinic-a:")
            assert request["ifNoneExist"] == f"identifier={first['system']}|{first['value']}"
        assert entry["fullUrl"].startswith("urn:uuid:")


def test_the_same_record_always_builds_the_same_bytes(rng: Rng) -> None:
    source, _ = mirror_input(World(rng))
    assert canonical_json(build_transaction(source)) == canonical_json(build_transaction(source))


def test_identifiers_are_stable_across_mirrors_of_the_same_visit(rng: Rng) -> None:
    source, _ = mirror_input(World(rng))
    first = build_transaction(source)
    other = build_transaction(
        MirrorInput(
            clinic_id=source.clinic_id,
            mirror_id="fedcba9876543210fedcba9876543210",
            record=source.record,
            signed_messages=source.signed_messages,
            gateway_user=RECORDS,
            recorded_ms=source.recorded_ms + 1,
        )
    )
    urls = [e["fullUrl"] for e in first["entry"][:-1]]
    assert urls == [e["fullUrl"] for e in other["entry"][:-1]]
    assert first["entry"][-1]["fullUrl"] != other["entry"][-1]["fullUrl"]


def test_an_invalid_bundle_is_a_mapping_error_without_values() -> None:
    with pytest.raises(MappingError, match="does not validate") as info:
        validate({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {}}]})
    assert "\n" not in str(info.value)
    with pytest.raises(MappingError, match="unknown resource type"):
        validate(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "NoSuchThing"},
                        "request": {"method": "POST", "url": "NoSuchThing"},
                    }
                ],
            }
        )
