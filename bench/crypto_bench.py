"""Benchmark of the end-to-end encryption core (medrelay.crypto), one core.

Prints, for each operation, the median time per operation over several timed batches, and its
ratio to a baseline measured in the same run (one raw libsodium XChaCha20-Poly1305 encrypt plus
decrypt of 256 bytes): on a shared, noisy machine the ratio is steadier than the absolute figure.

    .venv/bin/python bench/crypto_bench.py [--repeats 7] [--cpu 0] [--json]

Targets (issue "Foundation and the end-to-end encryption core"): a 256-byte ratchet encrypt plus
decrypt in at most 100 µs; a signed message end to end (sign, encrypt, decrypt, verify) in at
most 200 µs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from nacl import bindings

from medrelay.crypto.content import (
    Content,
    SignedContent,
    sign_content,
    verify_signed_content,
)
from medrelay.crypto.identity import DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.ratchet import RatchetSession
from medrelay.crypto.rng import Rng, seeded_rng
from medrelay.crypto.sessions import (
    InMemoryPrekeyStore,
    InMemorySessionStore,
    decrypt_from_device,
    encrypt_for_devices,
)
from medrelay.crypto.x3dh import (
    PrekeyBundle,
    generate_one_time_prekeys,
    generate_signed_prekey,
    initiate,
    respond,
)

NOW_MS = 1_800_000_000_000


@dataclass(frozen=True)
class Result:
    name: str
    median_us: float
    runs_us: list[float]


def make_device(rng: Rng, user: str, device: str) -> DeviceKeys:
    signing = SigningKey.generate(rng)
    dh = DHPrivateKey.generate(rng)
    identity = DeviceIdentity(
        user_id=user,
        device_id=device,
        signing_key=signing.verify_key,
        dh_key=dh.public_key,
        certificate_hash=hashlib.sha256(f"{user}/{device}".encode()).digest(),
    )
    return DeviceKeys(identity=identity, signing_key=signing, dh_key=dh)


def measure(name: str, op: Callable[[int], None], batch: int, repeats: int) -> Result:
    """Median per-operation time of `repeats` batches; `op(n)` performs n operations."""
    op(max(1, batch // 10))  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        op(batch)
        runs.append((time.perf_counter() - start) / batch * 1e6)
    return Result(name, statistics.median(runs), runs)


def pair(rng: Rng) -> tuple[RatchetSession, RatchetSession]:
    """An established Alice/Bob ratchet pair (Bob has received and replied once)."""
    alice = make_device(rng, "alice", "a1")
    bob = make_device(rng, "bob", "b1")
    spk = generate_signed_prekey(bob, 1, NOW_MS, rng)
    setup = initiate(alice, PrekeyBundle(bob.identity, spk.record), rng)
    a = RatchetSession.initiator(
        setup.shared_secret, setup.associated_data, setup.peer_signed_prekey, rng
    )
    sk, ad = respond(bob, alice.identity, setup.header, spk.private_key, None)
    b = RatchetSession.responder(sk, ad, spk.private_key)
    b.decrypt(a.encrypt(b"hello", rng), rng)
    a.decrypt(b.encrypt(b"hi", rng), rng)
    return a, b


def bench_ratchet(size: int, repeats: int, batch: int, rng: Rng) -> list[Result]:
    """Encrypt and decrypt on a steady one-way chain, and a ping-pong with a DH step each way."""
    plaintext = b"x" * size
    a, b = pair(rng)
    messages: list[bytes] = []

    def encrypt(n: int) -> None:
        messages.clear()
        for _ in range(n):
            messages.append(a.encrypt(plaintext, rng))

    def decrypt(n: int) -> None:
        for message in messages[:n]:
            b.decrypt(message, rng)

    enc_runs, dec_runs, both_runs = [], [], []
    encrypt(10)
    decrypt(10)
    for _ in range(repeats):
        t0 = time.perf_counter()
        encrypt(batch)
        t1 = time.perf_counter()
        decrypt(batch)
        t2 = time.perf_counter()
        enc_runs.append((t1 - t0) / batch * 1e6)
        dec_runs.append((t2 - t1) / batch * 1e6)
        both_runs.append((t2 - t0) / batch * 1e6)
    results = [
        Result(f"ratchet encrypt {size} B", statistics.median(enc_runs), enc_runs),
        Result(f"ratchet decrypt {size} B", statistics.median(dec_runs), dec_runs),
        Result(f"ratchet encrypt+decrypt {size} B", statistics.median(both_runs), both_runs),
    ]

    def ping_pong(n: int) -> None:
        for _ in range(n // 2):
            b.decrypt(a.encrypt(plaintext, rng), rng)
            a.decrypt(b.encrypt(plaintext, rng), rng)

    results.append(
        measure(f"ratchet encrypt+decrypt {size} B, new DH step each", ping_pong, batch, repeats)
    )
    return results


def bench_session_setup(repeats: int, batch: int, rng: Rng) -> Result:
    """X3DH on both sides (bundle verified, 4 DH each) and both ratchet sessions created."""
    alice = make_device(rng, "alice", "a1")
    bob = make_device(rng, "bob", "b1")
    spk = generate_signed_prekey(bob, 1, NOW_MS, rng)
    otks = generate_one_time_prekeys(1, 1, rng)

    def setup(n: int) -> None:
        for _ in range(n):
            s = initiate(alice, PrekeyBundle(bob.identity, spk.record, otks[0].record), rng)
            RatchetSession.initiator(s.shared_secret, s.associated_data, s.peer_signed_prekey, rng)
            sk, ad = respond(bob, alice.identity, s.header, spk.private_key, otks[0].private_key)
            RatchetSession.responder(sk, ad, spk.private_key)

    return measure("session setup (X3DH both sides + ratchets)", setup, batch, repeats)


def bench_signatures(repeats: int, batch: int, rng: Rng) -> list[Result]:
    alice = make_device(rng, "alice", "a1")
    content = _content(alice, "x" * 256, rng)
    signed = sign_content(content, alice)

    def sign(n: int) -> None:
        for _ in range(n):
            sign_content(content, alice)

    def verify(n: int) -> None:
        for _ in range(n):
            verify_signed_content(signed, alice.identity)

    return [
        measure("sign content (256 B text)", sign, batch, repeats),
        measure("verify content (256 B text)", verify, batch, repeats),
    ]


def _content(sender: DeviceKeys, text: str, rng: Rng) -> Content:
    return Content(
        thread_id=rng(16),
        message_id=rng(16),
        sender_user_id=sender.identity.user_id,
        sender_device_id=sender.identity.device_id,
        sender_certificate_hash=sender.identity.certificate_hash,
        recipients=("bob",),
        sent_at_ms=NOW_MS,
        previous_hash=None,
        log_view=None,
        kind="text",
        text=text,
    )


def bench_signed_end_to_end(repeats: int, batch: int, rng: Rng) -> Result:
    """Sign, encrypt, decrypt, decode and verify one 256-byte text message."""
    alice = make_device(rng, "alice", "a1")
    a, b = pair(rng)
    content = _content(alice, "x" * 256, rng)

    def end_to_end(n: int) -> None:
        for _ in range(n):
            wire = a.encrypt(sign_content(content, alice).encode(), rng)
            verify_signed_content(SignedContent.decode(b.decrypt(wire, rng)), alice.identity)

    return measure("signed message end to end (256 B)", end_to_end, batch, repeats)


def bench_fanout(repeats: int, batch: int, rng: Rng) -> Result:
    """One signed message encrypted for 3 devices with established sessions (through the
    serialising in-memory session store, as a client does)."""
    alice = make_device(rng, "alice", "a1")
    targets = [make_device(rng, "bob", "b1"), make_device(rng, "bob", "b2")]
    targets.append(make_device(rng, "alice", "a2"))
    sessions = InMemorySessionStore()
    bundles = {}
    peers = []
    for target in targets:
        prekeys = InMemoryPrekeyStore()
        spk = generate_signed_prekey(target, 1, NOW_MS, rng)
        prekeys.add_signed_prekey(spk)
        bundles[target.identity.address] = PrekeyBundle(target.identity, spk.record)
        peers.append((target, prekeys, InMemorySessionStore()))
    plaintext = sign_content(_content(alice, "x" * 256, rng), alice).encode()
    first = encrypt_for_devices(
        alice, plaintext, [t.identity for t in targets], sessions, bundles, rng
    )
    # Each peer answers once so the sender's sessions are established (no X3DH header).
    for target, prekeys, peer_sessions in peers:
        decrypt_from_device(
            target, alice.identity, first[target.identity.address], peer_sessions, prekeys, rng
        )
        reply = encrypt_for_devices(target, b"ok", [alice.identity], peer_sessions, {}, rng)
        decrypt_from_device(
            alice, target.identity, reply[alice.identity.address], sessions,
            InMemoryPrekeyStore(), rng,
        )  # fmt: skip
    identities = [t.identity for t in targets]

    def fanout(n: int) -> None:
        for _ in range(n):
            encrypt_for_devices(alice, plaintext, identities, sessions, {}, rng)

    return measure("fan-out of one signed message to 3 devices", fanout, batch, repeats)


def baseline(repeats: int, batch: int, rng: Rng) -> Result:
    key, nonce, plaintext = rng(32), rng(24), b"x" * 256

    def aead(n: int) -> None:
        enc = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
        dec = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt
        for _ in range(n):
            dec(enc(plaintext, b"", nonce, key), b"", nonce, key)

    return measure("baseline: raw XChaCha20-Poly1305 enc+dec 256 B", aead, batch, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed batches per operation")
    parser.add_argument("--batch", type=int, default=2000, help="operations per batch")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    rng = seeded_rng(b"crypto bench")
    small = max(10, args.batch // 10)
    base = baseline(args.repeats, args.batch * 5, rng)
    results = [
        base,
        bench_session_setup(args.repeats, small, rng),
        *bench_ratchet(256, args.repeats, args.batch, rng),
        *bench_ratchet(4096, args.repeats, args.batch, rng),
        *bench_signatures(args.repeats, args.batch, rng),
        bench_signed_end_to_end(args.repeats, args.batch, rng),
        bench_fanout(args.repeats, small, rng),
    ]
    targets = {
        "ratchet encrypt+decrypt 256 B": 100.0,
        "signed message end to end (256 B)": 200.0,
    }
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "median_us": round(r.median_us, 2),
                        "ratio_to_baseline": round(r.median_us / base.median_us, 2),
                        "runs_us": [round(x, 2) for x in r.runs_us],
                        "target_us": targets.get(r.name),
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    else:
        print(f"{'operation':58} {'median µs':>10} {'x baseline':>11}  target")
        for r in results:
            target = targets.get(r.name)
            verdict = ""
            if target is not None:
                verdict = f"≤ {target:.0f} µs " + ("met" if r.median_us <= target else "MISSED")
            print(
                f"{r.name:58} {r.median_us:10.1f} {r.median_us / base.median_us:11.1f}  {verdict}"
            )
    missed = [r for r in results if r.name in targets and r.median_us > targets[r.name]]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
