"""Stand-alone process serving lerf_ros/srv/Query with a fixed answer, for the two-process DDS test.

Usage: ``python query_service_server.py SERVICE_NAME ANSWER_JSON``. ANSWER_JSON holds
``{"points": [[x, y, z, relevancy, r, g, b], ...], "location": [x, y, z], "relevancy": float,
"scale": float, "model_step": int, "frame_id": str}``. The reply echoes the request fields in ``message``
so the client can check they crossed the wire. Prints ``READY`` once the service exists; runs until SIGINT.
"""

import json
import sys

import numpy as np
import rclpy
from lerf_ros.srv import Query
from rclpy.executors import ExternalShutdownException
from sensor_msgs.msg import PointCloud2, PointField

# x, y, z, relevancy, rgb: 5 float32 (rgb = 0x00RRGGBB as uint32 bits in a float32 slot, as RViz expects).
CLOUD_DTYPE = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("relevancy", "<f4"), ("rgb", "<f4")]
)


def make_cloud(points: np.ndarray, frame_id: str) -> PointCloud2:
    """(N, 7) float array [x, y, z, relevancy, r, g, b] (rgb 0..255) -> unorganised PointCloud2."""
    data = np.zeros(len(points), dtype=CLOUD_DTYPE)
    for i, name in enumerate(("x", "y", "z", "relevancy")):
        data[name] = points[:, i]
    rgb = points[:, 4:7].astype(np.uint32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    data["rgb"] = packed.astype("<u4").view("<f4")
    cloud = PointCloud2()
    cloud.header.frame_id = frame_id
    cloud.height = 1
    cloud.width = len(points)
    cloud.fields = [
        PointField(name=name, offset=CLOUD_DTYPE.fields[name][1], datatype=PointField.FLOAT32, count=1)
        for name in CLOUD_DTYPE.names
    ]
    cloud.is_bigendian = False
    cloud.point_step = CLOUD_DTYPE.itemsize
    cloud.row_step = cloud.point_step * cloud.width
    cloud.is_dense = True
    cloud.data = data.tobytes()
    return cloud


def main() -> int:
    service_name, answer_json = sys.argv[1], sys.argv[2]
    answer = json.loads(answer_json)
    points = np.asarray(answer["points"], dtype=np.float64).reshape(-1, 7)

    rclpy.init()  # installs rclpy's SIGINT handler: the test stops this process with SIGINT
    node = rclpy.create_node("lerf_query_test_server")

    def handle(request: Query.Request, response: Query.Response) -> Query.Response:
        response.found = True
        response.message = json.dumps(
            {"text": request.text, "negatives": list(request.negatives),
             "threshold": request.threshold, "with_cloud": request.with_cloud}
        )
        response.location.header.frame_id = answer["frame_id"]
        response.location.header.stamp = node.get_clock().now().to_msg()
        response.location.point.x, response.location.point.y, response.location.point.z = answer["location"]
        response.relevancy = answer["relevancy"]
        response.scale = answer["scale"]
        response.model_step = answer["model_step"]
        shown = points if request.with_cloud else points[:0]
        response.cloud = make_cloud(shown, answer["frame_id"])
        return response

    node.create_service(Query, service_name, handle)
    print("READY", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
