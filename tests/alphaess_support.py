"""The AlphaESS test vectors of `shared/reference/alphaess.md` §6, copied verbatim (hex), with the
header values and CRC each is stated to have. Serials in them are the reference's placeholders."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vector:
    name: str
    hex: str
    b1: int
    type: int
    body: bytes
    crc: int

    @property
    def frame(self) -> bytes:
        return bytes.fromhex(self.hex)


SUCCESS = b'{"Status":"Success"}'
REALTIME_BODY = (b'{"Time":"2024/03/03 22:05:21","SN":"AL0123456789012","Ppv1":"0","Ppv2":"0","PrealL1":"420",'
                 b'"PrealL2":"0.0","PrealL3":"0.0","PmeterL1":"-4","PmeterL2":"0","PmeterL3":"0","PmeterDC":"0",'
                 b'"Pbat":"539.4400","Sva":"405","VarAC":"-669","VarDC":"96","SOC":"38.0"}')
LOGIN_BODY = b'{"UserName":"serialnumber","Password":"password","CompanyName":"AlphaESS"}'
RESUME_BODY = (b'{"CmdIndex":"35967905","Command":"Resume","Parameter1":"2021/03/24 10:17:43",'
               b'"Parameter2":"641"}')
EVENT_BODY = (b'{"MsgType":"EventLog","MsgContent":"21/03/24 10:01:40 41;21/03/24 10:00:46 42;",'
              b'"Description":"OK"}')


def _ack(n: int, crc: int) -> Vector:
    head = f"010{2}{n:02x}00000014"
    return Vector(f"ack 1-2-{n}", head + SUCCESS.hex() + f"{crc:04x}", 2, n, SUCCESS, crc)


VECTORS = [
    # 6.1 attested by sources
    Vector("empty 1-1-0", "01010000000000110a", 1, 0, b"", 0x110A),
    Vector("ack 1-2-16 (TV test_checksum_is_valid)",
           "010210000000147b22537461747573223a2253756363657373227d57ac", 2, 16, SUCCESS, 0x57AC),
    Vector("SetConfig 1-1-8 (D)",
           "0101080000002d7b22436f6d6d616e64223a22536574436f6e666967222c22436d64496e646578223a22353134323230"
           "3934227d8d96", 1, 8, b'{"Command":"SetConfig","CmdIndex":"51422094"}', 0x8D96),
    # 6.2 reconstructed
    Vector("login 1-1-2",
           "0101020000004a7b22557365724e616d65223a2273657269616c6e756d626572222c2250617373776f7264223a22706173"
           "73776f7264222c22436f6d70616e794e616d65223a22416c706861455353227dbb2d", 1, 2, LOGIN_BODY, 0xBB2D),
    Vector("ack 1-2-2", "010202000000147b22537461747573223a2253756363657373227d7053", 2, 2, SUCCESS, 0x7053),
    Vector("ack 1-2-0", "010200000000147b22537461747573223a2253756363657373227dc2f8", 2, 0, SUCCESS, 0xC2F8),
    _ack(3, 0x8907), _ack(4, 0xE7AD), _ack(5, 0x1EF9), _ack(8, 0x8852), _ack(9, 0x7106), _ack(12, 0xAD07),
    Vector("serial 1-1-3", "010103000000187b22534e223a22414c30313233343536373839303132227d4f9b",
           1, 3, b'{"SN":"AL0123456789012"}', 0x4F9B),
    Vector("Resume 1-1-8",
           "010108000000607b22436d64496e646578223a223335393637393035222c22436f6d6d616e64223a22526573756d6522"
           "2c22506172616d6574657231223a22323032312f30332f32342031303a31373a3433222c22506172616d657465723222"
           "3a22363431227dfce5", 1, 8, RESUME_BODY, 0xFCE5),
    Vector("Resume ack 1-2-8",
           "0102080000003d7b22436f6d6d616e64223a22526573756d65222c22436d64496e646578223a2233353936373930352"
           "22c22537461747573223a2253756363657373227dd23e", 2, 8,
           b'{"Command":"Resume","CmdIndex":"35967905","Status":"Success"}', 0xD23E),
    Vector("SetConfig ack 1-2-8",
           "010208000000407b22436f6d6d616e64223a22536574436f6e666967222c22436d64496e646578223a22353134323230"
           "3934222c22537461747573223a2253756363657373227d8aab", 2, 8,
           b'{"Command":"SetConfig","CmdIndex":"51422094","Status":"Success"}', 0x8AAB),
    Vector("realtime 1-1-16",
           "010110000000ff7b2254696d65223a22323032342f30332f30332032323a30353a3231222c22534e223a22414c3031323334"
           "353637383930313222"
           "2c2250707631223a2230222c2250707632223a2230222c22507265616c4c31223a22343230222c22507265616c4c32223a"
           "22302e30222c22507265616c4c33223a22302e30222c22506d657465724c31223a222d34222c22506d657465724c32223a"
           "2230222c22506d657465724c33223a2230222c22506d657465724443223a2230222c2250626174223a223533392e343430"
           "30222c22537661223a22343035222c225661724143223a222d363639222c225661724443223a223936222c22534f43223a"
           "2233382e30227d4c44", 1, 16, REALTIME_BODY, 0x4C44),
    Vector("event log 1-1-9",
           "010109000000637b224d736754797065223a224576656e744c6f67222c224d7367436f6e74656e74223a2232312f30332f"
           "32342031303a30313a34302034313b32312f30332f32342031303a30303a34362034323b222c224465736372697074696f"
           "6e223a224f4b227df480", 1, 9, EVENT_BODY, 0xF480),
    Vector("SDK system info 0x43", "010143000000" "00de4f", 1, 0x43, b"", 0xDE4F),
    Vector("SDK running info 0x44", "010144000000" "001efa", 1, 0x44, b"", 0x1EFA),
    Vector("SDK auto-check 0x54", "010154000000" "00dd3b", 1, 0x54, b"", 0xDD3B),
]

BY_NAME = {v.name: v for v in VECTORS}
