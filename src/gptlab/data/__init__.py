"""Text sources, prepared token files and the batches read from them."""
