"""The runtime on llama.cpp: the LLM (llm.py, the only code that builds a llama_batch), sampling,
the decode loop, batched decoding, model files and placement, the engine and its chat sessions."""
