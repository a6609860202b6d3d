"""gptlab: train, evaluate, sample and serve GPT-style language models."""

__version__ = "0.1.0"
