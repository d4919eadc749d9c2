"""Measurement: the bench, quality against bf16, the roofline, the KV calculator and the load test."""
