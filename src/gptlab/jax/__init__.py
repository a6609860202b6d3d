"""The GPT of `gptlab.model` in JAX: a pure function of its parameters, loading and writing the same run directories.

`pip install gptlab[jax]` brings JAX and optax. `model.py` holds the forward pass and the conversion of parameters
to and from PyTorch; `generate.py` a jitted generator with a fixed-size KV cache; `optim.py` AdamW and Muon in optax;
`train.py` a jitted training step and the trainer behind `gptlab train ... train.backend=jax`.
"""

from __future__ import annotations

from gptlab.errors import GptlabError

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as e:  # an optional extra: say how to get it
    raise GptlabError(f"JAX is not installed: no module named '{e.name}'", "pip install gptlab[jax]") from e

from gptlab.jax.model import (  # noqa: E402
    forward,
    forward_cached,
    from_state,
    from_torch,
    init_params,
    load_params,
    new_cache,
    save_params,
    to_torch,
)

__all__ = [
    "forward", "forward_cached", "from_state", "from_torch", "init_params", "load_params", "new_cache",
    "save_params", "to_torch",
]  # fmt: skip
