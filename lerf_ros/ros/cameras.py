"""The trainer's cameras (ROS-free): which topics each one has, and what each one delivered.

A mobile manipulator has a head camera and often a wrist camera. The ``cameras`` parameter names camera
namespaces; each gives the RealSense / image_pipeline layout ``NS/color/image_raw``,
``NS/color/camera_info`` and, optionally, the registered depth ``NS/aligned_depth_to_color/image_raw``. All
of them train one map: every frame carries its camera's name (``Frame.camera``), its own image size and
intrinsics. Unset, the trainer has the one camera of ``image_topic`` / ``camera_info_topic`` /
``depth_topic``, as before.

Depth of a camera in the list is optional: its subscription exists, and a colour frame waits for the depth
of its stamp (``depth_wait_s``) only once that camera has delivered a depth image; a camera without a depth
stream costs nothing. With ``depth_topic`` (one camera) the wait is always made, as before.

A robot's "unknown camera" is a name no driver publishes under. Names that break ROS's rules stop start-up
(``params.py``); a valid name with no publisher, or one whose CameraInfo never comes, is reported per camera
in TrainingStatus (``camera_states``) and ``/diagnostics`` (`CameraInput.state`) after ``SILENT_S``, and the
node keeps running: drivers start late, and a wrist camera may be unplugged while the head camera works.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from lerf_ros.ros import ingest

COLOR_IMAGE = "color/image_raw"
COLOR_INFO = "color/camera_info"
ALIGNED_DEPTH = "aligned_depth_to_color/image_raw"
#: A camera that delivered nothing (or nothing usable) for this long after activation is reported, s.
SILENT_S = 5.0
OK = "ok"


@dataclass(frozen=True)
class CameraTopics:
    """One camera's name (status label and ``Frame.camera``) and topics (relative or absolute names as
    given; '' depth = none). depth_optional: wait for depth only once this camera has sent some."""

    name: str
    image: str
    camera_info: str
    depth: str
    depth_optional: bool


def camera_topics(cameras, image_topic: str, camera_info_topic: str, depth_topic: str) -> list[CameraTopics]:
    """The trainer's cameras: one per namespace of ``cameras``, or (None / empty) the one camera of the
    topic parameters, named by the namespace of its image topic ('camera' for camera/color/image_raw)."""
    if not cameras:
        suffix = "/" + COLOR_IMAGE
        name = image_topic[:-len(suffix)] if image_topic.endswith(suffix) and image_topic != suffix \
            else image_topic
        return [CameraTopics(name, image_topic, camera_info_topic, depth_topic, False)]
    return [CameraTopics(ns, f"{ns}/{COLOR_IMAGE}", f"{ns}/{COLOR_INFO}", f"{ns}/{ALIGNED_DEPTH}", True)
            for ns in cameras]


def state_kind(state: str) -> str:
    """A camera state without its numbers ("no image on X for 12 s" -> "no image on X for # s"): what a
    log line reports once, when it changes."""
    return re.sub(r"\d+", "#", state)


@dataclass(frozen=True)
class CameraReport:
    """What one camera delivered: frames received and dropped (since the start or the last reset),
    keyframes it has in the map, and its state: "ok" or why not (one line)."""

    name: str
    frames_received: int
    frames_dropped: int
    keyframes: int
    state: str


class CameraInput:
    """One camera's ingest state: its latest CameraInfo, depth buffer, image decimator and delivery gaps
    (each camera its own: another camera's image says nothing about this one's rate, pose or losses),
    counts and times (thread-safe).

    The subscription callbacks of all cameras run in one mutually exclusive group, the ingest thread reads
    ``depths`` and ``wants_depth``, the status and diagnostics read ``report``; ``_lock`` guards the rest.
    Times are ``time.monotonic()`` seconds given by the caller (tests pass their own).
    """

    def __init__(self, topics: CameraTopics, depths: ingest.DepthBuffer, now_s: float, decimator=None,
                 delivery=None):
        self.topics = topics
        self.name = topics.name
        self.depths = depths
        self.decimator = decimator  # ingest.Decimator
        self.delivery = delivery  # ingest.DeliveryGaps
        self._lock = threading.Lock()
        self._info = None  # (CameraIntrinsics | None, error text)
        self._since_s = now_s  # activation (or reset): the silence clock starts here
        self._last_image_s: float | None = None
        self._depth_seen = False
        self._received = self._dropped = 0

    # ---- written by the callbacks and the ingest thread
    def set_info(self, entry) -> None:
        with self._lock:
            self._info = entry

    @property
    def info(self):
        """(CameraIntrinsics | None, error text) of the latest CameraInfo, None before the first."""
        with self._lock:
            return self._info

    def image_received(self, now_s: float) -> None:
        with self._lock:
            self._received += 1
            self._last_image_s = now_s

    def dropped(self) -> None:
        with self._lock:
            self._dropped += 1

    def depth_received(self) -> None:
        with self._lock:
            self._depth_seen = True

    @property
    def wants_depth(self) -> bool:
        """Whether a colour frame of this camera waits for its depth: a depth topic that is required, or an
        optional one that has delivered at least once."""
        if not self.topics.depth:
            return False
        with self._lock:
            return not self.topics.depth_optional or self._depth_seen

    def activated(self, now_s: float) -> None:
        """The node subscribed (again): the silence clock starts now."""
        with self._lock:
            self._since_s, self._last_image_s = now_s, None

    def reset(self, now_s: float) -> None:
        """A map reset: counts to zero, depth, decimator and delivery gaps cleared, the silence clock from
        now; CameraInfo kept (a latched driver does not send it again)."""
        self.depths.clear()
        for part in (self.decimator, self.delivery):
            if part is not None:
                part.reset()
        with self._lock:
            self._since_s, self._last_image_s = now_s, None
            self._received = self._dropped = 0

    # ---- read by status and diagnostics
    def state(self, now_s: float, image_publishers: int | None = None,
              info_publishers: int | None = None, image_name: str = "", info_name: str = "") -> str:
        """"ok", or why this camera gives nothing usable, once ``SILENT_S`` has passed: no publisher on its
        image or CameraInfo topic (counts from the graph; None = unknown), no CameraInfo although images
        arrive, no image for a while. ``image_name`` / ``info_name``: the resolved topic names to print."""
        with self._lock:
            info, last, since, received = self._info, self._last_image_s, self._since_s, self._received
        image_name = image_name or self.topics.image
        info_name = info_name or self.topics.camera_info
        if last is None:
            silent = now_s - since
            if silent < SILENT_S:
                return OK
            if image_publishers == 0:
                return f"no publisher on {image_name} for {silent:.0f} s: is the camera namespace right?"
            if info_publishers == 0 and info is None:
                return f"no publisher on {info_name} for {silent:.0f} s"
            return f"no image received on {image_name} for {silent:.0f} s"
        if info is None and now_s - since >= SILENT_S:
            return f"{received} images but no CameraInfo on {info_name}: frames dropped"
        if info is not None and info[0] is None:
            return f"bad CameraInfo on {info_name}: {info[1]}"
        if now_s - last >= SILENT_S:
            return f"no image on {image_name} for {now_s - last:.0f} s"
        return OK

    def report(self, now_s: float, keyframes: int, **publishers) -> CameraReport:
        with self._lock:
            received, dropped = self._received, self._dropped
        return CameraReport(self.name, received, dropped, int(keyframes), self.state(now_s, **publishers))
