"""trio-recycle: reuse TCP and UDP sockets in trio through connect(AF_UNSPEC)."""

from ._disconnect import can_recycle as can_recycle
from ._disconnect import disconnect as disconnect
from ._open_pool import open_socket_pool as open_socket_pool
from ._pool import SocketPool as SocketPool
from ._statistics import PeerStatistics as PeerStatistics
from ._statistics import PoolStatistics as PoolStatistics
from ._stream import RecyclingStream as RecyclingStream
from ._udp import RecyclingUDPSocket as RecyclingUDPSocket

__all__ = [
    "PeerStatistics",
    "PoolStatistics",
    "RecyclingStream",
    "RecyclingUDPSocket",
    "SocketPool",
    "can_recycle",
    "disconnect",
    "open_socket_pool",
]

__version__ = "0.2.0"
