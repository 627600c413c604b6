"""The decoder packages satisfy the typing.Protocols the relay and the ingest worker rely on.

mypy checks the assignments below (a package that lost `redact_raw`, or a Tap whose `feed` took
other arguments, fails `make lint`); the tests check the same at run time."""

from __future__ import annotations

import pytest

from pvtap.decode import PROTOCOLS, Codec, StreamCodec, alphaess, codec_for, enphase, foxess, stream_codec
from pvtap.decode import LocalAnswerer as LocalAnswererProtocol
from pvtap.decode import Tap as TapProtocol
from pvtap.records import Origin

# checked by mypy: each package is a Codec, the relay's are StreamCodecs, their classes fit
STREAM_CODECS: tuple[StreamCodec, ...] = (alphaess, foxess)
CODECS: tuple[Codec, ...] = (alphaess, foxess, enphase)
_TAPS: tuple[TapProtocol, ...] = (alphaess.Tap(Origin("alphaess")), foxess.Tap(Origin("foxess")))
_ANSWERERS: tuple[LocalAnswererProtocol, ...] = (alphaess.LocalAnswerer(), foxess.LocalAnswerer())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_codec_for_returns_the_package_with_both_functions(protocol):
    codec = codec_for(protocol)
    assert callable(codec.redact_raw) and callable(codec.decode_raw)
    assert codec.__name__ == f"pvtap.decode.{protocol}"  # type: ignore[attr-defined]


def test_only_the_relay_protocols_are_stream_codecs():
    assert stream_codec(codec_for("alphaess")) is alphaess
    assert stream_codec(codec_for("foxess")) is foxess
    assert stream_codec(codec_for("enphase")) is None


def test_an_unknown_protocol_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'growatt'.*known: enphase, alphaess, foxess"):
        codec_for("growatt")
