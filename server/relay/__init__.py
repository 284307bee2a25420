"""medrelay.server.relay: the relay's policy and delivery logic, independent of transport and of
SQL (it talks to a `RelayStore`)."""
