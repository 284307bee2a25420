"""medrelay.server.transport: adapters between the network (WebSocket, HTTP) and the relay."""
