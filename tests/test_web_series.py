"""The charts' data: every stored point for short ranges, bucket averages past MAX_POINTS, hourly
averages from the cache for long ranges (kept up to date as records arrive, are replaced or
pruned), the devices summed, and energy per day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pvtap.records import Origin, Record
from pvtap.store.local import LocalStore
from pvtap.web import series
from pvtap.web.stores import readable_stores

from .web_support import ALPHA, ENVOY, add_alpha, add_envoy, alpha_fields, ns, stores

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)
S = 1_000_000_000


def by_key(doc: dict) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(device, quantity) → the (time, value) pairs a chart draws (gaps left out)."""
    return {(s["device"], s["quantity"]): [(t, v) for t, v in zip(doc["times"], s["values"]) if v is not None]
            for s in doc["series"]}


def test_a_short_range_has_every_stored_point(data_dir):
    relay, enphase = stores(data_dir)
    with relay, enphase:
        add_alpha(relay, T0, 6)
        add_envoy(enphase, T0 + timedelta(seconds=25), (100.0, 150.0), (30.0, 31.0))
    doc = series.chart(readable_stores(data_dir), series.HourlyCache(), ns(T0), ns(T0 + timedelta(hours=6)))
    assert doc["bucket_s"] == 0
    got = by_key(doc)
    t = [(T0 + timedelta(seconds=10 * i)).timestamp() for i in range(6)]
    assert got[(ALPHA, "soc_pct")] == [(t[i], 50 + i / 2) for i in range(6)]
    assert got[(ALPHA, "pv_w")] == [(t[i], 1000.0 + 10 * i) for i in range(6)]
    assert got[(ALPHA, "grid_w")] == [(ti, 100.0) for ti in t]
    assert got[(ENVOY, "pv_w")] == [((T0 + timedelta(seconds=25)).timestamp(), 250.0)]  # the micros added up
    assert (ENVOY, "soc_pct") not in got
    # the PV of both devices summed, each device's last value held: the Envoy's 250 W from 12:00:25 on
    (total,) = doc["totals"]
    assert total["quantity"] == "pv_w" and total["devices"] == 2
    assert [v for v in total["values"]] == [1000.0, 1010.0, 1020.0, 1270.0, 1280.0, 1290.0, 1300.0]
    assert doc["times"][3] == (T0 + timedelta(seconds=25)).timestamp()


def test_more_points_than_a_chart_needs_are_averaged_in_buckets(data_dir, monkeypatch):
    monkeypatch.setattr(series, "MAX_POINTS", 10)
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 60)  # 10 minutes, every 10 s
    doc = series.chart(readable_stores(data_dir), series.HourlyCache(), ns(T0), ns(T0 + timedelta(minutes=10)))
    assert doc["bucket_s"] == 60  # the first nice bucket giving at most 10 over 10 minutes
    soc = by_key(doc)[(ALPHA, "soc_pct")]
    assert soc == [((T0 + timedelta(minutes=m)).timestamp(), sum(50 + i / 2 for i in range(6 * m, 6 * m + 6)) / 6)
                   for m in range(10)]


def test_long_ranges_come_from_hourly_averages(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 12, every=timedelta(minutes=30))  # two points an hour for six hours
    cache = series.HourlyCache()
    doc = series.chart(readable_stores(data_dir), cache, ns(T0), ns(T0 + timedelta(days=7)))
    assert doc["bucket_s"] == 3600
    soc = by_key(doc)[(ALPHA, "soc_pct")]
    assert soc == [((T0 + timedelta(hours=h)).timestamp(), (50 + h + 50 + h + 0.5) / 2) for h in range(6)]


def test_the_hourly_cache_follows_new_replaced_and_pruned_records(data_dir):
    path = data_dir / "relay.sqlite"
    cache = series.HourlyCache()
    since, until = ns(T0), ns(T0 + timedelta(days=3))
    with LocalStore.for_process(data_dir, "relay") as relay:
        add_alpha(relay, T0, 2, every=timedelta(hours=1))  # SoC 50 at 12:00, 50.5 at 13:00

        def soc() -> list[tuple[float, float]]:
            return by_key(series.chart([path], cache, since, until))[(ALPHA, "soc_pct")]

        assert soc() == [(T0.timestamp(), 50.0), ((T0 + timedelta(hours=1)).timestamp(), 50.5)]
        # a back-fill into the first hour: that hour is read again
        origin = Origin("alphaess", ALPHA, "c1", "up")
        relay.append([Record("alphaess_backfill", T0 + timedelta(minutes=30), {"serial": ALPHA},
                             {**alpha_fields(0), "SOC": 60.0}, origin)])
        assert soc() == [(T0.timestamp(), 55.0), ((T0 + timedelta(hours=1)).timestamp(), 50.5)]
        # replay replaces a payload's records (delete, insert with a new id): 12:00 is now 40, (40 + 60) / 2
        first_raw = next(relay.raw_payloads()).id
        (old,) = [s.record for s in relay.records() if s.raw_id == first_raw]
        relay.replace_records(first_raw, [Record(old.measurement, old.time, old.tags, {**old.fields, "SOC": 40.0},
                                                 old.origin)], None)
        assert soc() == [(T0.timestamp(), 50.0), ((T0 + timedelta(hours=1)).timestamp(), 50.5)]
        # pruning the oldest records (lowest ids): the cache starts afresh
        # (the lowest id left is 13:00's: 12:00's was replaced by a higher one), as the size bound does
        relay._db.execute("DELETE FROM records WHERE id = (SELECT MIN(id) FROM records)")
        assert soc() == [(T0.timestamp(), 50.0)]


def test_energy_per_day_in_the_browsers_days(data_dir):
    with LocalStore.for_process(data_dir, "enphase") as enphase:
        # two hours of 600 W (300 + 300) that straddle UTC midnight, seen from UTC+1
        start = datetime(2024, 6, 1, 22, 30, tzinfo=UTC)
        for i in range(24):
            add_envoy(enphase, start + timedelta(minutes=5 * i), (300.0, 300.0), (30.0, 30.0))
    doc = series.energy_per_day(readable_stores(data_dir), series.HourlyCache(), ns(start - timedelta(days=1)),
                                ns(start + timedelta(days=1)), ns(start + timedelta(days=2)), utc_offset_s=3600)
    # local midnights (as UTC): May 31, June 1, June 2 in UTC+1
    assert [datetime.fromtimestamp(d, UTC) for d in doc["days"]] == [datetime(2024, 5, 30, 23, tzinfo=UTC),
                                                                      datetime(2024, 5, 31, 23, tzinfo=UTC),
                                                                      datetime(2024, 6, 1, 23, tzinfo=UTC)]
    # hour 22 UTC is 23:00 on June 1 there, hours 23 and 0 UTC are June 2: 600 W each hour
    assert doc["pv_kwh"] == [None, pytest.approx(0.6), pytest.approx(1.2)]
    assert doc["house_kwh"] == [None] * 3 and doc["grid_import_kwh"] == [None] * 3


def test_points_ignore_records_without_the_field(data_dir):
    with LocalStore.for_process(data_dir, "relay") as relay:
        origin = Origin("alphaess", ALPHA, "c1", "up")
        relay.append([Record("alphaess_realtime", T0, {"serial": ALPHA}, {"SOC": "n/a", "Ppv1": 5.0}, origin)])
    doc = series.chart(readable_stores(data_dir), series.HourlyCache(), ns(T0), ns(T0 + timedelta(hours=1)))
    assert (ALPHA, "soc_pct") not in by_key(doc) and by_key(doc)[(ALPHA, "pv_w")] == [(T0.timestamp(), 5.0)]


def test_nice_buckets():
    assert [series._nice_bucket(s, 1000) for s in (600, 86_400, 2 * 86_400, 30 * 86_400, 365 * 86_400)] == \
        [1, 120, 300, 3600, 43200]


def test_duplicate_readings_are_averaged_and_parts_added(data_dir):
    relay, enphase = stores(data_dir)
    with relay, enphase:
        origin = Origin("alphaess", ALPHA, "c1", "up")
        relay.append([Record("alphaess_realtime", T0, {"serial": ALPHA}, {**alpha_fields(0), "SOC": soc}, origin)
                      for soc in (55.5, 55.6)])  # two frames in one second of the device's clock
        add_envoy(enphase, T0, (100.0, 150.0), (30.0, 31.0))
        add_envoy(enphase, T0, (100.0, 150.0), (30.0, 31.0))  # the same report sent again
    doc = series.chart(readable_stores(data_dir), series.HourlyCache(), ns(T0), ns(T0 + timedelta(hours=1)))
    got = by_key(doc)
    assert got[(ALPHA, "soc_pct")] == [(T0.timestamp(), 55.55)]
    assert got[(ENVOY, "pv_w")] == [(T0.timestamp(), 250.0)]  # not 500
    week = series.chart(readable_stores(data_dir), series.HourlyCache(), ns(T0), ns(T0 + timedelta(days=7)))
    assert by_key(week)[(ENVOY, "pv_w")] == [(T0.timestamp(), 250.0)]
    assert by_key(week)[(ALPHA, "soc_pct")] == [(T0.timestamp(), 55.55)]
