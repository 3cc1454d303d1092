"""lerf_ros: online LERF (language embedded radiance fields) mapping and language queries for ROS 2.

The generated ROS interfaces (``lerf_ros.msg``, ``lerf_ros.srv`` and their typesupport extensions) are built
by CMake and may live in a different ``site-packages/lerf_ros`` directory than these sources (the no-ROS venv
keeps the sources as an editable install). Extending ``__path__`` over every ``lerf_ros`` directory on
``sys.path`` lets ``import lerf_ros.msg`` find them; in a colcon install both halves share one directory and
this is a no-op.
"""

__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
