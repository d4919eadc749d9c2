"""vLLM in process: paged attention with BF16 or FP8 KV, speculative decoding, its own metrics."""
