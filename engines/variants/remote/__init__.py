"""Any OpenAI-compatible server over HTTP, with its Prometheus /metrics scraped."""
