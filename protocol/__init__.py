"""medrelay.protocol: the wire protocol, sans-IO (frame codec, message types, error codes)."""
