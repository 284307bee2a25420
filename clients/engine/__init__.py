"""medrelay.clients.engine: the client engine (profile store, enrollment, relay connection,
messaging), a library with no user-interface concerns shared by the CLI and the records gateway."""
