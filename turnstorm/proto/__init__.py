"""Pure STUN/TURN protocol code: codec, credentials, transactions. No sockets, no clocks."""
