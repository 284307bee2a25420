"""medrelay.clients.cli: the reference command-line client, `medrelay`."""
