"""The transformers family: bf16 baseline, bitsandbytes NF4/INT8, GPTQ INT4 and assisted generation."""
