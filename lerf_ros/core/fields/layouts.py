"""The parameter layouts of the field backends, and conversion between them: portable maps.

A map records each hash grid's and MLP's backend (`module_backends`); loading converts the saved
parameters of every module into the layout of the module the loading machine built (`convert_state`),
so a map trained with the PyTorch modules loads where tinycudann imports and the other way round.

Hash grids: one flat table ``<module>.params`` (tinycudann's HashGrid layout: level-major, the per-level
entry offsets of `hash_encoding.level_layout`, F features per entry) whatever the backend ("tcnn",
"torch", "triton"): nothing to convert. Maps written before the duplicate key went also hold the same
tensor as ``<module>._tcnn.params``; it is dropped once checked equal to ``params``.

MLPs: tinycudann's FullyFusedMLP, as ``tcnn.Network`` builds it (an Identity encoding pads the input
with ones up to a multiple of 16, then the network), holds one flat ``<module>.net.params``: the weight
matrices of its layers one after the other, each row-major with output rows and input columns (the
orientation of ``nn.Linear.weight``)::

    first   (width, ceil16(in_dim))    columns in_dim.. multiply the padding ones: the first layer's bias
    hidden  (width, width)             num_hidden_layers - 1 of them
    last    (ceil16(out_dim), width)   rows out_dim.. are padding, never read

and no other biases (tiny-cuda-nn ``src/fully_fused_mlp.cu``: the constructor and ``set_params_impl``;
``include/tiny-cuda-nn/encodings/identity.h``: the padding value 1). The PyTorch MLP holds
``net.<2i>.weight`` / ``net.<2i>.bias`` per ``nn.Linear`` (i = 0 .. num_hidden_layers).
tcnn -> torch is exact: the first bias is the sum of the padding columns, the other biases are zero.
torch -> tcnn is exact when the hidden and output biases are zero and the first bias has a padding
column to go to (in_dim not a multiple of 16) or is zero; otherwise a `LayoutError` names the module
and the layer. A map trained with PyTorch MLPs has non-zero biases, so under "auto" those MLPs stay
PyTorch on a tinycudann machine (`torch_fallbacks`); only an explicit "tcnn" makes it an error.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .hash_encoding import HashEncoding
from .mlp import MLP

HASH_BACKENDS = ("tcnn", "torch", "triton")  # one layout
MLP_BACKENDS = ("tcnn", "torch")
_TCNN_ALIGN = 16  # FullyFusedMLP's REQUIRED_ALIGNMENT: input padding and output padding


class LayoutError(ValueError):
    """A module's saved parameters cannot be put into the loading model's layout; names the module."""

    def __init__(self, module: str, reason: str):
        super().__init__(f"module {module!r}: {reason}")
        self.module = module


@dataclasses.dataclass(frozen=True)
class ConvertedState:
    """state: the map's model state in the built model's layout; converted: the modules whose layout
    changed (their optimiser moments do not fit the new parameters)."""

    state: dict[str, torch.Tensor]
    converted: tuple[str, ...]


def ceil16(n: int) -> int:
    return -(-n // _TCNN_ALIGN) * _TCNN_ALIGN


def tcnn_mlp_shapes(in_dim: int, out_dim: int, width: int, num_hidden_layers: int) -> list[tuple[int, int]]:
    """(rows, columns) of each weight matrix of a tinycudann FullyFusedMLP, in parameter order."""
    if num_hidden_layers < 1:
        raise ValueError(f"FullyFusedMLP needs num_hidden_layers >= 1, got {num_hidden_layers}")
    return [(width, ceil16(in_dim)), *[(width, width)] * (num_hidden_layers - 1), (ceil16(out_dim), width)]


def tcnn_mlp_to_torch(flat: torch.Tensor, in_dim: int, out_dim: int, width: int, num_hidden_layers: int,
                      module: str = "mlp") -> dict[str, torch.Tensor]:
    """flat (n_params,) FullyFusedMLP parameters -> the PyTorch MLP's ``net.<2i>.weight`` / ``.bias``."""
    shapes = tcnn_mlp_shapes(in_dim, out_dim, width, num_hidden_layers)
    need = sum(r * c for r, c in shapes)
    if flat.ndim != 1 or flat.numel() != need:
        raise LayoutError(module, f"tinycudann parameters of shape {tuple(flat.shape)}, a FullyFusedMLP "
                                  f"{in_dim} -> {num_hidden_layers} x {width} -> {out_dim} has {need}")
    flat = flat.float()
    mats, pos = [], 0
    for rows, cols in shapes:
        mats.append(flat[pos:pos + rows * cols].view(rows, cols))
        pos += rows * cols
    out = {"net.0.weight": mats[0][:, :in_dim].clone(),
           "net.0.bias": mats[0][:, in_dim:].sum(dim=1)}  # the padding inputs are ones
    for i, w in enumerate(mats[1:], start=1):
        rows = out_dim if i == len(mats) - 1 else width
        out[f"net.{2 * i}.weight"] = w[:rows].clone()
        out[f"net.{2 * i}.bias"] = torch.zeros(rows, dtype=flat.dtype, device=flat.device)
    return out


def torch_mlp_to_tcnn(state: dict[str, torch.Tensor], in_dim: int, out_dim: int, width: int,
                      num_hidden_layers: int, module: str = "mlp") -> torch.Tensor:
    """The PyTorch MLP's ``net.<2i>.weight`` / ``.bias`` -> flat (n_params,) FullyFusedMLP parameters.

    LayoutError when a bias has no place in tinycudann's layout (see the module docstring)."""
    shapes = tcnn_mlp_shapes(in_dim, out_dim, width, num_hidden_layers)
    parts = []
    for i, (rows, cols) in enumerate(shapes):
        w, b = state.get(f"net.{2 * i}.weight"), state.get(f"net.{2 * i}.bias")
        true_rows = out_dim if i == len(shapes) - 1 else width
        true_cols = in_dim if i == 0 else width
        if w is None or tuple(w.shape) != (true_rows, true_cols):
            raise LayoutError(module, f"layer {i}: weight {None if w is None else tuple(w.shape)}, "
                                      f"expected {(true_rows, true_cols)}")
        padded = torch.zeros(rows, cols, dtype=torch.float32, device=w.device)
        padded[:true_rows, :true_cols] = w.float()
        if b is not None and bool(torch.any(b != 0)):
            if i == 0 and cols > in_dim:
                padded[:, in_dim] = b.float()  # the first padding input is 1: its column is the bias
            else:
                where = "no padding column (in_dim is a multiple of 16)" if i == 0 else "no biases there"
                size = b.abs().max().item()
                raise LayoutError(module, f"layer {i} has a non-zero bias (max |b| {size:.3g}); "
                                          f"tinycudann's FullyFusedMLP has {where}")
        parts.append(padded.reshape(-1))
    return torch.cat(parts)


def backend_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every hash grid and MLP in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (HashEncoding, MLP))]


def module_backends(model: nn.Module) -> dict[str, str]:
    """What a map records: path -> backend ("tcnn", "torch", "triton") of each hash grid and MLP."""
    return {n: m.implementation for n, m in backend_modules(model)}


def _own(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _saved_mlp_backend(path: str, own: dict, backends: dict | None) -> str:
    recorded = None if backends is None else backends.get(path)
    found = "tcnn" if "net.params" in own else "torch" if "net.0.weight" in own else None
    if recorded is not None and recorded not in MLP_BACKENDS:
        raise LayoutError(path, f"recorded backend {recorded!r} is not one of {MLP_BACKENDS}")
    if found is None:
        raise LayoutError(path, f"no MLP parameters in the map (keys {sorted(own)[:4]})")
    if recorded is not None and recorded != found:
        raise LayoutError(path, f"recorded as {recorded!r} but its parameters are in the {found!r} layout")
    return found


def _mlp_shape(mlp: MLP) -> tuple[int, int, int, int]:
    return mlp.in_dim, mlp.out_dim, mlp.config.hidden_dim, mlp.config.num_hidden_layers


def convert_state(model: nn.Module, state: dict[str, torch.Tensor],
                  backends: dict[str, str] | None) -> ConvertedState:
    """The saved ``state`` (recorded ``backends``; None: a map from before they were recorded, the layout
    is read from the keys) in the layout of ``model``'s modules. LayoutError names a module that cannot
    be converted; other mismatches are left to the caller's strict key / shape check."""
    out = dict(state)
    converted = []
    for path, mod in backend_modules(model):
        prefix = path + "."
        own = _own(state, prefix)
        if isinstance(mod, HashEncoding):
            recorded = None if backends is None else backends.get(path)
            if recorded is not None and recorded not in HASH_BACKENDS:
                raise LayoutError(path, f"recorded backend {recorded!r} is not one of {HASH_BACKENDS}")
            dup = own.get("_tcnn.params")
            if dup is not None:  # maps written before the duplicate key went
                if "params" in own and not torch.equal(dup, own["params"]):
                    raise LayoutError(path, "params and _tcnn.params differ (the same table saved twice)")
                out[prefix + "params"] = out.pop(prefix + "_tcnn.params")
            continue
        src, dst = _saved_mlp_backend(path, own, backends), mod.implementation
        if src == dst:
            continue
        for key in own:
            del out[prefix + key]
        if src == "tcnn":
            new = tcnn_mlp_to_torch(own["net.params"], *_mlp_shape(mod), module=path)
        else:
            if mod.config.num_hidden_layers < 1:
                raise LayoutError(path, "tinycudann's FullyFusedMLP needs a hidden layer")
            new = {"net.params": torch_mlp_to_tcnn(own, *_mlp_shape(mod), module=path)}
        out.update({prefix + k: v for k, v in new.items()})
        converted.append(path)
    return ConvertedState(out, tuple(converted))


def torch_fallbacks(model: nn.Module, state: dict[str, torch.Tensor],
                    backends: dict[str, str] | None) -> tuple[str, ...]:
    """MLPs that ``model`` built with tinycudann under "auto" whose saved PyTorch parameters tinycudann
    cannot hold (non-zero biases): they are to be built with PyTorch instead (`as_torch`). An explicit
    "tcnn" is not overridden: `convert_state` then raises for it."""
    out = []
    for path, mod in backend_modules(model):
        if not isinstance(mod, MLP) or mod.implementation != "tcnn" or mod.config.implementation != "auto":
            continue
        own = _own(state, path + ".")
        try:
            if _saved_mlp_backend(path, own, backends) == "torch":
                torch_mlp_to_tcnn(own, *_mlp_shape(mod), module=path)
        except LayoutError:
            out.append(path)
    return tuple(out)


def as_torch(model: nn.Module, path: str) -> None:
    """Replace the MLP at ``path`` in ``model`` by a PyTorch MLP of the same shape."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    if not isinstance(old, MLP):
        raise ValueError(f"{path!r} is not an MLP")
    config = dataclasses.replace(old.config, implementation="torch")
    setattr(parent, name, MLP(old.in_dim, old.out_dim, config))
