"""The optional activation fused after the affine step: ``y = act(x_hat * gamma + beta)``."""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "elu", "silu")


def default_param(name: str) -> float:
    """torch.nn's default negative slope (leaky_relu) or alpha (elu); 0 for the others.
    Plain enough for TorchScript, whose scripted layers resolve the default with it too."""
    if name == "leaky_relu":
        return 0.01
    if name == "elu":
        return 1.0
    return 0.0


@dataclass(frozen=True)
class Activation:
    """An activation by name; ``param`` is leaky_relu's negative slope or elu's alpha."""

    name: str = "identity"
    param: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"


IDENTITY = Activation()


def make_activation(name: str | None, param: float | None = None) -> Activation:
    """Validate a user-facing activation name and parameter."""
    if name is None and param is None:  # the default of every layer, on every call
        return IDENTITY
    name = "identity" if name is None else name
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {name!r}")
    if param is None:
        param = default_param(name)
    elif name not in ("leaky_relu", "elu"):
        raise ValueError(f"activation_param is only used by leaky_relu and elu, got {param!r} "
                         f"for activation {name!r}")
    return Activation(name, float(param))
