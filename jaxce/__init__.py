"""jaxce: classification losses for JAX with PyTorch's options and lean,
stable custom derivatives (forward and reverse mode)."""

from jaxce import checked
from jaxce._binary import binary_cross_entropy_with_logits
from jaxce._binary_probs import binary_cross_entropy
from jaxce._cross_entropy import cross_entropy, nll_loss
from jaxce._linear import linear_cross_entropy
from jaxce._log_softmax import log_softmax, logsumexp
from jaxce._optax import (
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "checked",
    "cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
