"""vLLM client (adapters + chat) and the in-process transformers backend of the embedded mode."""
