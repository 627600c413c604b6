"""InfluxQL targets for the Grafana Foundation SDK, and the few query shapes the dashboards use.

The SDK has no InfluxDB query type for Grafana 11.6, so this is the SDK's documented way to add
one: a `Dataquery` with its JSON, and a builder. Every query is a raw InfluxQL string with
Grafana's macros (`$timeFilter`, `$__interval`) and the dashboard's variables.
"""

from __future__ import annotations

import typing

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DATASOURCE_UID = "pvtap-influxdb"
DATASOURCE = DataSourceRef(type_val="influxdb", uid=DATASOURCE_UID)


class InfluxQLQuery(cogvariants.Dataquery):
    def __init__(self, ref_id: str, query: str, alias: str, result_format: str) -> None:
        self.ref_id, self.query, self.alias, self.result_format = ref_id, query, alias, result_format

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"refId": self.ref_id, "datasource": DATASOURCE.to_json(), "rawQuery": True,
                                  "query": self.query, "resultFormat": self.result_format}
        if self.alias:
            out["alias"] = self.alias
        return out


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    """`InfluxQL('SELECT ...').alias('$tag_serial')`; refIds are given in order by the panel helper."""

    def __init__(self, query: str) -> None:
        self._query = " ".join(query.split())
        self._alias = ""
        self._format = "time_series"
        self._ref_id = "A"

    def alias(self, alias: str) -> typing.Self:
        self._alias = alias
        return self

    def table(self) -> typing.Self:
        self._format = "table"
        return self

    def ref_id(self, ref_id: str) -> typing.Self:
        self._ref_id = ref_id
        return self

    def build(self) -> InfluxQLQuery:
        return InfluxQLQuery(self._ref_id, self._query, self._alias, self._format)


def matches(tag: str, variable: str) -> str:
    """The WHERE condition for a multi-value variable (Grafana expands it to a regex group)."""
    return f'"{tag}" =~ /^${variable}$/'


def series(measurement: str, select: str, where: str = "", by: str = "", fill: str = "none") -> str:
    """`SELECT <select> FROM <m> WHERE $timeFilter [AND where] GROUP BY time($__interval)[, by] fill(...)`."""
    condition = f" AND {where}" if where else ""
    group = f", {by}" if by else ""
    return (f'SELECT {select} FROM "{measurement}" WHERE $timeFilter{condition} '
            f"GROUP BY time($__interval){group} fill({fill})")


def latest_sum(measurement: str, expression: str, where: str, per: str) -> str:
    """The sum over devices of each one's latest value of `expression` (of last() calls)."""
    return (f'SELECT sum("v") FROM (SELECT {expression} AS "v" FROM "{measurement}" WHERE $timeFilter AND {where} '
            f'GROUP BY "{per}") WHERE $timeFilter')


def summed_series(measurement: str, expression: str, where: str, per: str) -> str:
    """Over time: the sum over devices of each one's mean of `expression` (of mean() calls)."""
    return (f'SELECT sum("v") FROM (SELECT {expression} AS "v" FROM "{measurement}" WHERE $timeFilter AND {where} '
            f'GROUP BY time($__interval), "{per}" fill(none)) WHERE $timeFilter GROUP BY time($__interval) fill(none)')


def spread_sum(measurement: str, fields: dict[str, str], where: str, per: str) -> str:
    """Energy in the time range from lifetime counters: per device max − min, summed."""
    inner = ", ".join(f'spread("{field}") AS "{name}"' for name, field in fields.items())
    outer = ", ".join(f'sum("{name}") AS "{name}"' for name in fields)
    return (f'SELECT {outer} FROM (SELECT {inner} FROM "{measurement}" WHERE $timeFilter AND {where} '
            f'GROUP BY "{per}") WHERE $timeFilter')
