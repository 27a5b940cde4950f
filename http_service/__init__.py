"""``acestep-http``: the HTTP door of the stack, a stateless edge in front of the gateway's gRPC."""
