"""Engine variants, one subpackage per family: transformers (bf16, bnb, GPTQ, speculative), vLLM and
remote servers. The registry names them by "module:Class" strings and imports them only when chosen."""
