"""Small MLPs: tinycudann FullyFusedMLP when available on CUDA, plain PyTorch otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hash_encoding import IMPLEMENTATIONS, import_tcnn, resolve_implementation

_TCNN_WIDTHS = (16, 32, 64, 128)
_ACTIVATIONS = {"none": "None", "relu": "ReLU", "sigmoid": "Sigmoid"}


@dataclass(frozen=True)
class MLPConfig:
    """num_hidden_layers hidden layers of hidden_dim units with ReLU; output activation none|relu|sigmoid."""

    num_hidden_layers: int = 1
    hidden_dim: int = 64
    out_activation: str = "none"
    # "auto" | "torch" | "tcnn" | "triton"; Triton is the hash grid only, so "triton" builds the torch
    # MLP (one value can then select the backend of a whole field).
    implementation: str = "auto"

    def validate(self) -> MLPConfig:
        if self.num_hidden_layers < 0 or self.hidden_dim < 1:
            raise ValueError(
                f"MLP needs num_hidden_layers >= 0 and hidden_dim >= 1, "
                f"got {self.num_hidden_layers}, {self.hidden_dim}"
            )
        if self.out_activation not in _ACTIVATIONS:
            raise ValueError(
                f"out_activation must be one of {sorted(_ACTIVATIONS)}, got {self.out_activation!r}"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be auto, torch, tcnn or triton, got {self.implementation!r}"
            )
        return self


class MLP(nn.Module):
    """forward(x (N, in_dim)) -> (N, out_dim) float32.

    tinycudann's FullyFusedMLP only supports widths 16/32/64/128 and at least one hidden layer;
    other shapes fall back to PyTorch even under "auto" (and raise under "tcnn").
    """

    def __init__(self, in_dim: int, out_dim: int, config: MLPConfig):
        super().__init__()
        config.validate()
        self.in_dim, self.out_dim, self.config = in_dim, out_dim, config
        impl = resolve_implementation(config.implementation, encoding=False)
        fused_ok = config.hidden_dim in _TCNN_WIDTHS and config.num_hidden_layers >= 1
        if impl == "tcnn" and not fused_ok:
            if config.implementation == "tcnn":
                raise ValueError(
                    f"tcnn FullyFusedMLP needs hidden_dim in {_TCNN_WIDTHS}, got {config.hidden_dim}"
                )
            impl = "torch"
        self.implementation = impl
        if impl == "tcnn":
            self.net = import_tcnn().Network(
                n_input_dims=in_dim,
                n_output_dims=out_dim,
                network_config={
                    "otype": "FullyFusedMLP",
                    "activation": "ReLU",
                    "output_activation": _ACTIVATIONS[config.out_activation],
                    "n_neurons": config.hidden_dim,
                    "n_hidden_layers": config.num_hidden_layers,
                },
            )
        else:
            layers: list[nn.Module] = []
            width = in_dim
            for _ in range(config.num_hidden_layers):
                layers += [nn.Linear(width, config.hidden_dim), nn.ReLU()]
                width = config.hidden_dim
            layers.append(nn.Linear(width, out_dim))
            if config.out_activation == "relu":
                layers.append(nn.ReLU())
            elif config.out_activation == "sigmoid":
                layers.append(nn.Sigmoid())
            self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()
