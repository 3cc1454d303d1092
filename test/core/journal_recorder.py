"""A recording robot in one process, for the SIGKILL test (``test_journal_kill.py``): plain Python, no ROS.

    python journal_recorder.py JOURNAL_DIR INTERVAL_S N_FRAMES FRAME_PERIOD_S

Resumes the tiny-preset engine from the journal, prints what it resumed, then trains in a
``TrainingWorker`` thread while the main thread feeds the synthetic room's frames (those not resumed
already) at FRAME_PERIOD_S, then keeps training. Every line is flushed at once, so what the parent reads
before it kills the process was printed before the kill:

    RESUMED <keyframes> <step> <skipped> <stamp,stamp,...>   the resumed keyframes, by image stamp
    SKIPPED <file: reason>                                    one per skipped journal entry
    READY                                                     recording from here on
    KF <stamp>                                                add_frame accepted it (and has returned)
    STEP <step> <time.monotonic()>                            the training step at least reached by then
"""

import dataclasses
import sys
import time

import torch

from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.journal import Journal, JournalConfig
from lerf_ros.core.presets import make_preset
from lerf_ros.core.training.worker import TrainingWorker
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    root, interval_s = sys.argv[1], float(sys.argv[2])
    n_frames, period_s = int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    cfg = make_preset("tiny")
    cfg = dataclasses.replace(cfg, keyframes=dataclasses.replace(
        cfg.keyframes, min_translation_m=0.02, blur_threshold=0.0, max_keyframes=200))
    room = SyntheticRoom(0)
    frames = make_frames(room, orbit_trajectory(room, n_frames), default_intrinsics(48, 36))
    engine = LERFEngine(cfg, "cpu")
    journal = Journal(JournalConfig(root, interval_s=interval_s, max_mb=1000.0))
    report = journal.resume(engine)
    stamps = {f.stamp_ns for f in engine.store.frames()}
    say(f"RESUMED {report.keyframes} {engine.train_step} {len(report.skipped)} "
        + ",".join(str(s) for s in sorted(stamps)))
    for reason in report.skipped:
        say(f"SKIPPED {reason}")
    engine.attach_journal(journal)
    say("READY")
    worker = TrainingWorker(engine, steps_per_tick=1)
    worker.start()
    for frame in frames:
        if frame.stamp_ns in stamps:
            continue
        if engine.add_frame(frame).keyframe:
            say(f"KF {frame.stamp_ns}")
        say(f"STEP {engine.train_step} {time.monotonic()}")
        time.sleep(period_s)
    while True:  # trains until killed
        say(f"STEP {engine.train_step} {time.monotonic()}")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
