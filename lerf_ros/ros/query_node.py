"""The query node: ``lerf/query`` (lerf_ros/srv/Query) over the live engine or a saved map.

Live mode (same process as the trainer, ``lerf_node``): answers from the ``EngineSlot`` the trainer trains;
the engine takes its lock inside ``query`` only briefly, so training goes on. Standalone mode
(``map_path`` set, query node alone): loads ``LERFEngine.load(map_path)``, no trainer runs; a map that
cannot be loaded is logged and every reply says why (found = false), the node stays up.

Each answer is also published for RViz in the world frame: ``lerf/relevancy_cloud`` (PointCloud2, transient
local so a late RViz still gets it) and ``lerf/target_marker`` (sphere + text Markers, transient local).
Requests never raise to the client: bad text, threshold or a failing model give found = false + message.
"""

from __future__ import annotations

import math

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.messages import cloud_to_msg, empty_cloud, target_marker
from lerf_ros.ros.params import QUERY, QUERY_NODE_NAME, declare_and_resolve

_LATCHED_CLOUD = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                            reliability=ReliabilityPolicy.RELIABLE)
# Two markers (sphere + text) make up one answer; a late subscriber must get both.
_LATCHED_MARKERS = QoSProfile(depth=2, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                              reliability=ReliabilityPolicy.RELIABLE)
MAX_NEGATIVES = 32


def load_map(path: str, device: str) -> tuple[object | None, str]:
    """(engine, '') or (None, why) for a map directory."""
    import os

    from lerf_ros.core.engine import LERFEngine

    if not os.path.isdir(path):
        return None, f"map_path {path!r} does not exist or is not a directory"
    try:
        return LERFEngine.load(path, device=device), ""
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"map_path {path!r} could not be loaded: {exc}"


class QueryNode(Node):
    """Serves ``lerf/query``; publishes the last answer's cloud and marker.

    slot: the live engine shared with a trainer in this process. With ``map_path`` set the node loads the
    map into a slot of its own; ``lerf_node`` (``main.build_nodes``) then hands that map to the trainer and
    gives the node the shared slot back, so both keep working on one model.
    """

    def __init__(self, slot: EngineSlot | None = None, *, node_name: str = QUERY_NODE_NAME, **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self.params = declare_and_resolve(self, QUERY)
        self.settings = self.params.query
        map_path = self.settings.map_path
        if map_path:
            engine, error = load_map(map_path, self.params.device)
            self.slot = EngineSlot(engine, error)
            if error:
                self.get_logger().error(error + "; the node stays up and answers found=false")
            else:
                self.get_logger().info(f"loaded the map at {map_path}")
        elif slot is not None:
            self.slot = slot
        else:
            self.slot = EngineSlot(None, "no model: start with map_path or in one process with the trainer "
                                         "(lerf_node)")
            self.get_logger().error(self.slot.error)
        from lerf_ros.srv import Query

        group = MutuallyExclusiveCallbackGroup()
        self.cloud_pub = self.create_publisher(PointCloud2, "lerf/relevancy_cloud", _LATCHED_CLOUD)
        self.marker_pub = self.create_publisher(Marker, "lerf/target_marker", _LATCHED_MARKERS)
        self.create_service(Query, "lerf/query", self._on_query, callback_group=group)

    def _threshold(self) -> float:
        # Read live: query_threshold is the one dynamic parameter.
        return float(self.get_parameter("query_threshold").value)

    def _refuse(self, response, header: Header, message: str):
        response.found = False
        response.message = message
        response.location.header = header
        response.cloud = empty_cloud(header)
        self.get_logger().warning(f"query refused: {message}", throttle_duration_sec=2.0)
        return response

    def _on_query(self, request, response):
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.settings.world_frame)
        text = str(request.text).strip()
        limit = self.settings.max_query_chars
        if not text:
            return self._refuse(response, header, "empty query text")
        if len(text) > limit:
            return self._refuse(response, header, f"query text has {len(text)} characters; the limit "
                                                  f"(max_query_chars) is {limit}")
        negatives = [str(n).strip() for n in request.negatives if str(n).strip()]
        if len(negatives) > MAX_NEGATIVES or any(len(n) > limit for n in negatives):
            return self._refuse(response, header,
                                f"at most {MAX_NEGATIVES} negatives of <= {limit} characters")
        threshold = float(request.threshold)
        if not math.isfinite(threshold) or threshold > 1.0:
            return self._refuse(response, header,
                                f"threshold {threshold} is not a confidence in [0, 1] (<= 0: node default)")
        if threshold <= 0.0:
            threshold = self._threshold()
        engine = self.slot.get()
        if engine is None:
            return self._refuse(response, header, self.slot.error or "no model loaded")
        try:
            # The engine lock lets a query in ahead of the trainer's next step.
            result = engine.query(text, negatives=negatives, threshold=threshold,
                                  with_cloud=bool(request.with_cloud))
        except (ValueError, RuntimeError) as exc:
            self.get_logger().error(f"query {text[:60]!r} failed: {exc}")
            return self._refuse(response, header, f"query failed: {exc}")
        return self._answer(response, header, text, result)

    def _answer(self, response, header: Header, text: str, result):
        response.found = bool(result.found)
        response.message = str(result.message)
        response.relevancy = float(result.relevancy)
        response.confidence = float(result.confidence)
        response.scale = float(result.scale_m)
        response.model_step = int(result.model_step)
        response.location.header = header
        if result.location_world is not None:
            x, y, z = (float(v) for v in np.asarray(result.location_world).reshape(3))
            response.location.point.x, response.location.point.y, response.location.point.z = x, y, z
        response.cloud = cloud_to_msg(result.cloud_xyz, result.cloud_relevancy, result.cloud_rgb, header)
        self.cloud_pub.publish(response.cloud)
        for marker in target_marker(result.location_world, text, response.relevancy, response.scale, header,
                                    response.found):
            self.marker_pub.publish(marker)
        return response
