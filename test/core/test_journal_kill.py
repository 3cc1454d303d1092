"""Crash-safe recording under SIGKILL: a recording process (``journal_recorder.py``) is killed at random
moments, 11 times, and restarted on the same journal each time. Every keyframe it reported accepted
before a kill is resumed by the next run, and the resumed training step is no older than the journal's
interval (plus one step call and one checkpoint write) before the kill."""

import itertools
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

RECORDER = Path(__file__).with_name("journal_recorder.py")
INTERVAL_S = 0.5
#: A checkpoint is snapshotted at the end of the first step() call after the interval, then written: the
#: training lost can exceed INTERVAL_S by one step call (features of two keyframes + a step) and one write.
MARGIN_S = 1.0
KILLS = 11
N_FRAMES, FRAME_PERIOD_S = 60, 0.1


class Run:
    """One recorder process; its stdout lines are collected by a thread as they arrive."""

    def __init__(self, root: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(RECORDER), str(root), str(INTERVAL_S), str(N_FRAMES), str(FRAME_PERIOD_S)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            assert left > 0 and self.proc.poll() is None, \
                f"no {prefix!r} line; rc {self.proc.poll()}; stderr: {self.stderr()}"
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.all.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> list[str]:
        """SIGKILL; then every line printed before it."""
        self.killed_at = time.monotonic()
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        while not self.lines.empty():
            self.all.append(self.lines.get())
        return self.all

    def stderr(self) -> str:
        return self.proc.stderr.read()[-3000:] if self.proc.poll() is not None else "(running)"


def test_sigkill_at_random_moments_loses_no_keyframe_and_at_most_the_interval_of_training(tmp_path):
    root = tmp_path / "journal"
    rng = random.Random(20240611)
    accepted: set[int] = set()  # stamps of keyframes a run reported accepted before it was killed
    steps: list[tuple[float, int]] = []  # (monotonic time, step reached by then) of the last run killed
    kill_time = None
    resumed_steps, skipped = [], []
    for run_index in range(KILLS + 1):
        run = Run(root)
        try:
            line = run.wait_for("RESUMED")
            _, n_kf, step, _, stamps = [*line.split(" "), ""][:5]
            resumed = {int(s) for s in stamps.split(",") if s}
            assert int(n_kf) == len(resumed)
            lost = accepted - resumed
            assert not lost, f"run {run_index}: accepted keyframes lost: {sorted(lost)}"
            if kill_time is not None:
                # What the killed run had trained by (kill - interval - margin) must have been checkpointed
                # (what it resumed with, at least).
                due = max(s for t, s in steps if t <= kill_time - INTERVAL_S - MARGIN_S)
                assert int(step) >= due, f"run {run_index}: resumed step {step}, {due} was reached " \
                                         f"{INTERVAL_S + MARGIN_S} s before the kill; " \
                                         f"{[(round(t - kill_time, 2), s) for t, s in steps[-40:]]}"
            resumed_steps.append(int(step))
            run.wait_for("READY")
            if run_index < KILLS:  # the last run only shows what the last kill left
                time.sleep(rng.uniform(0.0, 2.2))  # recording: keyframes, features, training, checkpoints
        finally:
            lines = run.kill()
            kill_time = run.killed_at
        steps = [(0.0, resumed_steps[-1])]  # the killed run's own start counts as reached long before
        for line in lines:
            if line.startswith("KF "):
                accepted.add(int(line.split()[1]))
            elif line.startswith("STEP "):
                _, s, t = line.split()
                steps.append((float(t), int(s)))
            elif line.startswith("SKIPPED "):
                skipped.append(line[len("SKIPPED "):])
    # The test did what it claims: keyframes arrived over several runs and training went on across kills.
    assert len(accepted) >= 20, len(accepted)
    assert sum(b > a for a, b in itertools.pairwise(resumed_steps)) >= 3, resumed_steps
    # Atomic writes: a kill leaves at most a temporary file or an entry whose write had not finished
    # (listed by a checkpoint taken meanwhile), never a torn or corrupted entry.
    torn = [s for s in skipped if "half-written" not in s and "missing" not in s]
    assert not torn, torn
