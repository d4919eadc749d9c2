"""Engines: protocol, registry, telemetry, model provisioning and one module per variant."""
