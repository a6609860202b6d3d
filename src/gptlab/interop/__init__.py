"""Moving models in and out of gptlab: Hugging Face `transformers` (and, later, nanoGPT)."""
