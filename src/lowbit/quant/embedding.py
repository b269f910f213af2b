"""Embeddings as a quantized layer kind: ``QuantEmbedding``, and ``QuantTiedHead`` for an output head that
shares the embedding's weight.

A token embedding dominates a small LLM's file (SmolLM2-135M: 28 M of its 135 M parameters), so it is
quantized like a linear layer's weight: the table ``(vocab, dim)`` on the weight grid of
``quant.embedding`` (per row, or in groups along ``dim``: a GGUF format's blocks), trained by QAT (the
straight-through estimator; the scales by LSQ) or left at round-to-nearest when it does not train.
Lookups gather rows of the fake-quantized table, so what is trained is what ``convert`` exports.

A head tied to the embedding (``lm_head.weight is embed_tokens.weight``, as in SmolLM2 and Llama 3.2) must
read the same integers: ``prepare`` swaps such a float head for ``QuantTiedHead``, which multiplies by the
embedding's fake-quantized table and owns nothing itself. The embedding is held outside the module tree
(it is registered once, where it is), so ``state_dict`` and ``parameters()`` see it once.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lowbit.quant.calibrate import init_range
from lowbit.quant.modules import _set_bits, _watch_weight_grad, _weight_int
from lowbit.quant.quantizer import Quantizer
from lowbit.spec import QuantSpec

__all__ = ["QuantEmbedding", "QuantTiedHead", "EMBEDDING_SPEC_AXIS"]

EMBEDDING_SPEC_AXIS = 0  # rows (tokens) along dim 0: per-channel scales are per token, groups run along dim


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` over a fake-quantized table; the latent table is the original module's parameter."""

    weight_quantizer: Quantizer | None
    input_quantizer: None

    @classmethod
    def from_float(cls, mod: nn.Embedding, weight: QuantSpec) -> QuantEmbedding:
        if mod.max_norm is not None or mod.sparse:
            raise ValueError("max_norm and sparse embeddings are not supported (the table is quantized as a whole)")
        if weight.axis not in (0, -2):
            raise ValueError(f"weight.axis={weight.axis}: an embedding's scales run along its rows (axis 0)")
        new = cls(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx, scale_grad_by_freq=
                  mod.scale_grad_by_freq, device="meta")  # fmt: skip
        new.weight = mod.weight  # the same parameter: a tie to a head survives
        new.weight_quantizer = Quantizer(weight, tuple(mod.weight.shape))
        new.input_quantizer = None
        new.train(mod.training)
        new.weight_quantizer.to(mod.weight.device)
        init_range(new.weight_quantizer, new.weight.detach())
        return new

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def weight_int(self, transform: bool = True) -> Tensor:
        return _weight_int(self, transform)  # type: ignore[arg-type]

    def set_bits(self, bits: int) -> None:
        _set_bits(self, bits)  # type: ignore[arg-type]

    def watch_weight_grad(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(grad)`` with the loss's gradient w.r.t. the latent table on every backward pass."""
        return _watch_weight_grad(self, fn)  # type: ignore[arg-type]

    def forward(self, ids: Tensor) -> Tensor:
        return nn.functional.embedding(ids, self.quantized_weight(), self.padding_idx, None, 2.0,
                                       self.scale_grad_by_freq, False)  # fmt: skip


class QuantTiedHead(nn.Module):
    """An output head tied to a ``QuantEmbedding``: ``y = x · Q(E)ᵀ (+ b)``, the embedding's integers."""

    def __init__(self, embedding: QuantEmbedding, bias: nn.Parameter | None, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: registered once, where it lives
        self.embedding_name = name
        self.bias = bias
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def weight(self) -> nn.Parameter:  # what code that reads ``head.weight`` (ties, shapes) expects
        return self.embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        w = self.embedding.quantized_weight()
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to {self.embedding_name!r}, {self.in_features} -> {self.out_features}"
