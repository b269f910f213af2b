"""What needs the ``llm`` extra (transformers, gguf): offline model loaders, tokenizers, the memory model."""
