"""medrelay.server: the Twisted services (transport, relay, identity, storage, metrics)."""
