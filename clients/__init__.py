"""medrelay.clients: the client engine, the reference CLI and the records gateway."""
