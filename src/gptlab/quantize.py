"""Int8 weight-only quantization for CPU inference: each linear layer's weights as int8 with a scale per output.

A decode step on a CPU reads every weight once per token, so its time is the weights' bytes over the memory's
bandwidth: int8 reads a quarter of fp32's. The matmul is PyTorch's own `aten._weight_int8pack_mm` (int8 weights
times bf16 activations, scaled per output channel), which `torch.compile` also lowers into its generated GEMM
kernels. Its activations are bf16: each linear layer's input is rounded to bf16 and its output computed in bf16,
then returned in the model's dtype, as llama.cpp's q8_0 rounds a layer's input to 8 bits. Everything else (the
residual stream, norms, attention, the KV cache, embeddings) stays as it was. Quantization is symmetric per output
channel (scale = the row's largest |w| / 127), done once at load; the fp32 weights are dropped.
tests/test_quantize.py checks the greedy text and bits per byte of a trained model against fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.model import GPT

QUANTIZE = ("int8",)  # what --quantize accepts


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 (out, in) with a bf16 scale per output channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # parameters without grad, not buffers: torch.compile's freezing folds in only parameters as constants
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        """The layer quantized: round(w / scale) with scale = max |w| of its output channel / 127 (in bf16)."""
        w = linear.weight.detach().float()
        # the kernel's scales are bf16: rounded first, so the weights are rounded to the steps it multiplies by
        scales = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.bfloat16).tiny) / 127).to(torch.bfloat16)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequantized(weight).T + bias, in x's dtype."""
        return int8_linear(x, self.weight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear with int8 weights (out, in) and bf16 scales (out,): x rounded to bf16, the result in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the kernel takes a matrix
    scales = scales.to(torch.bfloat16)  # (a no-op, unless the model was cast after quantizing)
    y = torch.ops.aten._weight_int8pack_mm(flat, weight, scales).to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def check_quantize(quantize: str | None, device: torch.device | str) -> None:
    """A user error for a --quantize this build cannot do on `device`."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise GptlabError(f"unknown --quantize {quantize!r}", f"use one of: {', '.join(QUANTIZE)}")
    if torch.device(device).type != "cpu":
        raise GptlabError(
            f"--quantize {quantize} is a CPU path, not for {torch.device(device).type}",
            "leave --quantize out on a GPU (use --dtype bfloat16 there), or add --device cpu",
        )


def quantize_int8(model: GPT) -> GPT:
    """Replace every linear layer of the model (attention, MLP and the output head) by its `Int8Linear`, in place.

    The embeddings stay as they are, a tied output head becomes its own int8 copy. For inference: the model is
    put in eval mode and its int8 weights cannot be trained.
    """
    model.eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear.of(child))
    return model
