"""Generated protobuf and gRPC modules (``make protos``); not committed."""
