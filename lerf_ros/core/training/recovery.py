"""Surviving a non-finite training step: the exception that reports it and the snapshot rolled back to.

`trainer.Trainer` applies nothing of a step whose loss or gradients are not finite and raises
`NonFiniteStep`; from the second such step in a row on (or at once when the weights themselves are no
longer finite) it restores the last `Snapshot` of the weights and optimiser state. The engine counts the
events and gives up only after ``TrainerConfig.max_nonfinite_in_row`` in a row.
"""

from __future__ import annotations

import torch


class NonFiniteStep(RuntimeError):
    """A training step whose loss or gradients were not finite; nothing of it was applied.

    terms: the loss terms that were not finite ("grad:<group>" for a group with non-finite gradients);
    in_row: non-finite steps in a row, this one included; restored: the weights and optimiser state were
    rolled back to the last snapshot (taken at step ``snapshot_step``).
    """

    def __init__(self, step: int, terms: tuple[str, ...], in_row: int, restored: bool, snapshot_step: int):
        where = f"; rolled back to the snapshot of step {snapshot_step}" if restored else "; skipped"
        super().__init__(f"non-finite loss at step {step} ({', '.join(terms) or '?'}){where}, "
                         f"{in_row} in a row")
        self.step, self.terms, self.in_row, self.restored = step, terms, in_row, restored


class Snapshot:
    """Copies of every parameter and optimiser-state tensor (on the CPU when training on CUDA: the GPU
    presets' grids are ~1 GB), refreshed in place so a snapshot allocates once."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.step = -1
        self._params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._state: dict[int, dict] = {}

    @staticmethod
    def _copy(src: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
        if dst is None or dst.shape != src.shape or dst.dtype != src.dtype:
            pin = src.is_cuda
            dst = torch.empty(src.shape, dtype=src.dtype, device="cpu" if src.is_cuda else src.device,
                              pin_memory=pin)
        dst.copy_(src.detach(), non_blocking=src.is_cuda)  # stream-ordered; read back only by restore
        return dst

    @torch.no_grad()
    def take(self, step: int) -> None:
        """Copy the current weights and optimiser state, as of training step ``step``."""
        params = [p for o in self.optimizers.values() for g in o.param_groups for p in g["params"]]
        old = {id(p): c for p, c in self._params}
        self._params = [(p, self._copy(p, old.get(id(p)))) for p in params]
        state: dict[int, dict] = {}
        for o in self.optimizers.values():
            for p, st in o.state.items():
                prev = self._state.get(id(p), {})
                state[id(p)] = {k: self._copy(v, prev.get(k)) if torch.is_tensor(v) else v
                                for k, v in st.items()}
        self._state = state
        self.step = step

    @torch.no_grad()
    def restore(self) -> None:
        """Put the copied weights and optimiser state back (a parameter first updated after the copy loses
        its Adam moments, as it had none then)."""
        for p, c in self._params:
            p.copy_(c, non_blocking=True)
        for o in self.optimizers.values():
            for p in list(o.state):
                saved = self._state.get(id(p))
                if saved is None:
                    del o.state[p]
                    continue
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        o.state[p][k].copy_(v, non_blocking=True)
                    else:
                        o.state[p][k] = v
