"""lowbit: quantization-aware training to 8, 4, 3, 2 and 1 bit, exported as real low-bit integer models.

    model = lowbit.prepare(model, lowbit.QuantConfig(...), calib=batches)   # fake-quant, trainable
    ...train...
    int_model = lowbit.convert(model)                                       # integer modules
    lowbit.save(int_model, "model.safetensors"); lowbit.load("model.safetensors")   # packed file
"""

from lowbit import quant
from lowbit.api import convert, prepare
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec, Rule
from lowbit.errors import ConfigError, FormatError
from lowbit.export.io import load, save

__version__ = "0.1.0"

__all__ = [
    "quant", "prepare", "convert", "save", "load", "QuantConfig", "QuantSpec", "Rule", "LowRankSpec", "ConfigError",
    "FormatError",
]
