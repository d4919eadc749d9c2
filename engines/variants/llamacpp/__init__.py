"""llama.cpp on GGUF files as they ship (llama-cpp-python, a CPU build), and the Q8_0/F16 ladder."""
