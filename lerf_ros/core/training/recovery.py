"""Surviving a failed training step: non-finite losses, running out of GPU memory, and the snapshot
rolled back to.

`trainer.Trainer` applies nothing of a step whose loss or gradients are not finite (skipped on the device)
and raises `NonFiniteStep` when it reads the step's record back (every ``TrainerConfig.log_every`` steps);
when that report ends in two or more such steps in a row (or at once when the weights themselves are no
longer finite) it restores the last `Snapshot` of the weights and optimiser state. The engine counts the
events and gives up only after ``TrainerConfig.max_nonfinite_in_row`` in a row.

A step that raises ``torch.cuda.OutOfMemoryError`` applies nothing either (an update cut short inside the
optimiser is rolled back to the snapshot), releases CUDA's cached blocks and raises `OutOfMemoryStep`; the
engine then halves its rays per step (`halved_rays`, down to ``TrainerConfig.min_rays_per_step``) and
trains on. An out-of-memory step at the floor is an error. The smaller batch holds until the engine is reset
or restarted: growing back would run into the same limit again, and a fixed size keeps steps comparable.
"""

from __future__ import annotations

import traceback

import torch


class OutOfMemoryStep(RuntimeError):
    """A training step that ran out of GPU memory; nothing of it was applied.

    step: the trainer's step count (the step that failed); rays: rays in its batch; restored: it failed
    inside the optimiser update and the weights and optimiser state were rolled back to the last snapshot
    (taken at step ``snapshot_step``); partial: it failed inside the update and there was no snapshot to
    undo it with (``snapshot_every = 0``), so part of it may have been applied.
    """

    def __init__(self, step: int, rays: int, reason: str, restored: bool = False, partial: bool = False,
                 snapshot_step: int = -1):
        where = f"; rolled back to the snapshot of step {snapshot_step}" if restored else ""
        if partial:
            where = "; the optimiser update was cut short and there is no snapshot to undo it"
        super().__init__(f"out of memory at step {step} with {rays} rays per step{where} ({reason})")
        self.step, self.rays, self.restored, self.partial = step, rays, restored, partial


def halved_rays(rays: int, floor: int) -> int | None:
    """Rays per step after an out-of-memory step with ``rays``: half, not below ``floor``; None when
    ``rays`` is at the floor already (another halving would not be allowed)."""
    if rays <= floor:
        return None
    return max(floor, rays // 2)


def oom_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of an out-of-memory message (torch's goes on about the allocator), at most
    ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def release_cuda_cache(exc: BaseException | None = None) -> None:
    """Hand CUDA's cached blocks back after running out of memory (a no-op where CUDA is not in use).

    exc: the out-of-memory error still being handled; the finished frames in its traceback hold the failed
    step's tensors (activations, the autograd graph), so their locals are cleared first, or the blocks
    would stay in use. The traceback itself keeps its file and line information.
    """
    if exc is not None and exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class NonFiniteStep(RuntimeError):
    """Training steps whose loss or gradients were not finite; nothing of them was applied.

    step, terms: the last such step's count and the loss terms that were not finite ("grad:<group>" for a
    group with non-finite gradients); in_row: the longest run of such steps in a row the report saw (runs
    carried over from the report before included); restored: the weights and optimiser state were rolled
    back to the last snapshot (taken at step ``snapshot_step``); count: such steps in the report (1 with
    ``log_every = 1``).
    """

    def __init__(self, step: int, terms: tuple[str, ...], in_row: int, restored: bool, snapshot_step: int,
                 count: int = 1):
        where = f"; rolled back to the snapshot of step {snapshot_step}" if restored else "; skipped"
        more = f" ({count} non-finite steps in this report)" if count > 1 else ""
        super().__init__(f"non-finite loss at step {step} ({', '.join(terms) or '?'}){where}, "
                         f"{in_row} in a row{more}")
        self.step, self.terms, self.in_row, self.restored, self.count = step, terms, in_row, restored, count


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
