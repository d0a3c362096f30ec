"""The embedded backend: one process, CPU or one GPU, the built-in tiny decoder or a Hugging Face causal LM."""
