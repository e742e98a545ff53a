"""The xDS protocol layer: snapshots, per-stream state machines and the gRPC ADS server."""
