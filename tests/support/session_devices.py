"""A device as the crypto session tests model it: its keys, its session and prekey stores, and
the one-time prekeys a relay would still serve (each handed out once)."""

from __future__ import annotations

import hashlib
from typing import Final

from medrelay.crypto.identity import DeviceAddress, DeviceIdentity, DeviceKeys
from medrelay.crypto.keys import DHPrivateKey, SigningKey
from medrelay.crypto.rng import Rng
from medrelay.crypto.sessions import InMemoryPrekeyStore, InMemorySessionStore
from medrelay.crypto.x3dh import (
    OneTimePrekey,
    PrekeyBundle,
    generate_one_time_prekeys,
    generate_signed_prekey,
)

NOW_MS: Final = 1_790_000_000_000


class SessionDevice:
    def __init__(self, user_id: str, device_id: str, rng: Rng, *, one_time: int = 20) -> None:
        signing_key = SigningKey.generate(rng)
        dh_key = DHPrivateKey.generate(rng)
        identity = DeviceIdentity(
            user_id,
            device_id,
            signing_key.verify_key,
            dh_key.public_key,
            hashlib.sha256(f"cert:{user_id}/{device_id}".encode()).digest(),
        )
        self.keys = DeviceKeys(identity, signing_key, dh_key)
        self.sessions = InMemorySessionStore()
        self.prekeys = InMemoryPrekeyStore()
        self.prekeys.add_signed_prekey(generate_signed_prekey(self.keys, 1, NOW_MS, rng))
        pairs = generate_one_time_prekeys(1, one_time, rng)
        self.prekeys.add_one_time_prekeys(pairs)
        self.served: list[OneTimePrekey] = [pair.record for pair in pairs]

    @property
    def identity(self) -> DeviceIdentity:
        return self.keys.identity

    @property
    def address(self) -> DeviceAddress:
        return self.keys.identity.address

    def bundle(self, with_one_time: bool = True) -> PrekeyBundle:
        """As the relay serves it: the current SPK and an OPK that is never served again."""
        spk = self.prekeys.current_signed_prekey
        if spk is None:
            raise AssertionError("the device has no signed prekey")
        opk = self.served.pop(0) if with_one_time and self.served else None
        return PrekeyBundle(self.identity, spk, opk)

    def state(self) -> tuple[bytes, bytes]:
        return self.sessions.to_bytes(), self.prekeys.to_bytes()

    def reload(self) -> None:
        """Round-trip both stores through bytes, as a client that restarts does."""
        sessions, prekeys = self.state()
        self.sessions = InMemorySessionStore.from_bytes(sessions)
        self.prekeys = InMemoryPrekeyStore.from_bytes(prekeys)
