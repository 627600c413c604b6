"""FoxESS vendor facts (shared/reference/foxess.md §4, §6, §8): where the devices connect, and
what the M1's cloud presents."""

from __future__ import annotations

#: H1/H3/KH WiFi dongles: cleartext TCP to the cloud.
H_SERIES_CLOUD = "www.foxesscloud.com:10001"
H_SERIES_PORT = 10001
#: The M1's TLS data channel: the cloud address foxess_local_gateway relays to, its self-signed
#: certificate's SHA-256 (as that project documents it) and subject.
M1_CLOUD = "8.209.116.72:14431"
M1_PORT = 14431
M1_CLOUD_PIN_SHA256 = "0ff6d2d0b548f0a03dced31ce7621a8c9497bdc074d723bc152094e4d299c1b7"
M1_CLOUD_SUBJECT = "/C=CN/ST=JiangSu/L=Wuxi/O=FoxESS/CN=monitor"
#: The M1's LAN channels: the TCP hub channel and the UDP broadcasts (ESP-MESH, heartbeat).
HUB_PORT = 6666
MESH_PORT = 6364
HEARTBEAT_PORT = 3334
