"""The five dashboards, on the measurements and fields the decoders write (docs/*.md "Records").

Signs as the devices send them: AlphaESS `Pbat` > 0 discharging, `PmeterL*` > 0 importing.
A house's load is only known where a device measures it: AlphaESS grid meter plus inverter
output (`PmeterL1..3 + PrealL1..3`).
"""

from __future__ import annotations

from collections.abc import Callable

from grafana_foundation_sdk.builders import common, dashboard, gauge, stat, statushistory, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from .influxql import DATASOURCE, InfluxQL, latest_sum, matches, series, spread_sum, summed_series

TAG = "pvtap"
REFRESH = "1m"
PanelBuilder = (timeseries.Panel | stat.Panel | gauge.Panel | table.Panel | statushistory.Panel)

ENVOY, ALPHA, FOX = matches("envoy", "envoy"), matches("serial", "alphaess"), matches("serial", "foxess")
#: A T-series behind an RS485-to-TCP bridge sends no serial (only its realtime broadcast): its
#: records have no serial tag, so they are shown whichever inverters are selected.
FOX_T = f"({FOX} OR \"serial\" = '')"
#: the FoxESS measurements that name an inverter, for the variable listing them
FOX_SERIALS = 'SHOW TAG VALUES FROM /^foxess_(telemetry|h1_realtime|t_realtime)$/ WITH KEY = "serial"'


# -- helpers --------------------------------------------------------------------------------------

class Board:
    """A dashboard under construction: panels get ids 1, 2, ... and refIds A, B, ... in order."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.builder = (Dashboard(title).uid(uid).description(description).tags([TAG]).refresh(REFRESH)
                        .time("now-24h", "now").timezone("browser").editable()
                        .tooltip(dm.DashboardCursorSync.CROSSHAIR))
        self.next_id = 1

    def variable(self, name: str, label: str, query: str) -> Board:
        self.builder.with_variable(
            dashboard.QueryVariable(name).label(label).query(query).datasource(DATASOURCE).multi(True)
            .include_all(True).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])))
        return self

    def row(self, title: str) -> Board:
        self.builder.with_row(dashboard.Row(title).id(self._id()))
        return self

    def panel(self, panel: PanelBuilder, title: str, *queries: InfluxQL, width: int = 12, height: int = 8,
              unit: str = "", description: str = "") -> Board:
        panel.id(self._id()).title(title).datasource(DATASOURCE).span(width).height(height)
        if unit:
            panel.unit(unit)
        if description:
            panel.description(description)
        for index, query in enumerate(queries):
            panel.with_target(query.ref_id(chr(ord("A") + index)))
        self.builder.with_panel(panel)
        return self

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def lines() -> timeseries.Panel:
    return timeseries.Panel().line_width(1).fill_opacity(10).show_points(cm.VisibilityMode.NEVER) \
        .legend(common.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM))


def bars() -> timeseries.Panel:
    return timeseries.Panel().draw_style(cm.GraphDrawStyle.BARS).fill_opacity(80) \
        .stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))


def now_stat() -> stat.Panel:
    return stat.Panel().reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)) \
        .color_mode(cm.BigValueColorMode.VALUE).graph_mode(cm.BigValueGraphMode.NONE)


def today(panel: stat.Panel) -> stat.Panel:
    return panel.time_from("now/d")


def events_table() -> table.Panel:
    return table.Panel()


# -- Overview ------------------------------------------------------------------------------------

def overview() -> dm.Dashboard:
    b = Board("pvtap-overview", "pvtap overview",
              "PV, battery, grid and house power now and over time, battery state of charge, energy today.")
    b.variable("envoy", "Envoy", 'SHOW TAG VALUES FROM "enphase_envoy" WITH KEY = "envoy"')
    b.variable("alphaess", "AlphaESS", 'SHOW TAG VALUES FROM "alphaess_realtime" WITH KEY = "serial"')
    b.variable("foxess", "FoxESS", FOX_SERIALS)
    b.row("Now")
    b.panel(now_stat(), "PV power", *pv_now(), width=6, height=5, unit="watt",
            description="Latest value per source: Enphase microinverters (last 5-minute interval, summed), "
                        "AlphaESS PV strings, FoxESS M1 AC output, H-series PV strings and T-series generation.")
    b.panel(now_stat(), "Battery power", InfluxQL(latest_sum("alphaess_realtime", 'last("Pbat")', ALPHA, "serial"))
            .alias("AlphaESS"), width=6, height=5, unit="watt", description="> 0 discharging, < 0 charging.")
    b.panel(now_stat(), "Grid power", *grid_now(), width=6, height=5, unit="watt",
            description="> 0 importing from the grid, < 0 exporting.")
    b.panel(now_stat(), "House load", InfluxQL(latest_sum(
        "alphaess_realtime", " + ".join(f'last("{f}")' for f in (*PMETER, *PREAL)), ALPHA, "serial")).alias("AlphaESS"),
        width=6, height=5, unit="watt", description="AlphaESS: grid meter plus inverter output.")
    b.row("Over time")
    b.panel(lines(), "Power", *power_series(), width=18, height=9, unit="watt")
    b.panel(gauge.Panel().min(0).max(100), "Battery state of charge", InfluxQL(
        f'SELECT last("SOC") FROM "alphaess_realtime" WHERE $timeFilter AND {ALPHA} GROUP BY "serial"')
        .alias("$tag_serial"), width=6, height=9, unit="percent")
    b.panel(lines(), "State of charge", InfluxQL(series("alphaess_realtime", 'mean("SOC")', ALPHA, '"serial"'))
            .alias("SoC $tag_serial"), width=24, height=6, unit="percent")
    b.row("Energy today")
    b.panel(today(now_stat()), "Energy today per source", *energy_today(), width=24, height=5, unit="kwatth",
            description="Since local midnight: Enphase from the intervals' energy, AlphaESS and FoxESS from the "
                        "differences of their lifetime counters.")
    return b.builder.build()


PMETER = ("PmeterL1", "PmeterL2", "PmeterL3")
PREAL = ("PrealL1", "PrealL2", "PrealL3")


def pv_now() -> list[InfluxQL]:
    return [
        InfluxQL(latest_sum("enphase_interval", 'last("avg_power_w")', ENVOY, "eqid")).alias("Enphase"),
        InfluxQL(latest_sum("alphaess_realtime", 'last("Ppv1") + last("Ppv2")', ALPHA, "serial")).alias("AlphaESS"),
        InfluxQL(latest_sum("foxess_telemetry", 'last("ac_power_w")', FOX, "serial")).alias("FoxESS M1"),
        InfluxQL(latest_sum("foxess_h1_realtime", 'last("pv1_power_w") + last("pv2_power_w")', FOX, "serial"))
        .alias("FoxESS H-series"),
        InfluxQL(latest_sum("foxess_t_realtime", 'last("generation_power_w")', FOX_T, "serial"))
        .alias("FoxESS T-series"),
    ]


def grid_now() -> list[InfluxQL]:
    return [
        InfluxQL(latest_sum("alphaess_realtime", " + ".join(f'last("{f}")' for f in PMETER), ALPHA, "serial"))
        .alias("AlphaESS meter"),
        InfluxQL(latest_sum("foxess_h1_realtime", 'last("grid_power_w")', FOX, "serial")).alias("FoxESS H-series"),
    ]


def power_series() -> list[InfluxQL]:
    grid = " + ".join(f'mean("{f}")' for f in PMETER)
    house = " + ".join(f'mean("{f}")' for f in (*PMETER, *PREAL))
    return [
        InfluxQL(summed_series("enphase_interval", 'mean("avg_power_w")', ENVOY, "eqid")).alias("PV Enphase"),
        InfluxQL(series("alphaess_realtime", f'mean("Ppv1") + mean("Ppv2") AS "PV AlphaESS", mean("Pbat") AS '
                        f'"Battery", {grid} AS "Grid", {house} AS "House"', ALPHA)).alias("$col"),
        InfluxQL(summed_series("foxess_telemetry", 'mean("ac_power_w")', FOX, "serial")).alias("PV FoxESS M1"),
        InfluxQL(summed_series("foxess_h1_realtime", 'mean("pv1_power_w") + mean("pv2_power_w")', FOX, "serial"))
        .alias("PV FoxESS H-series"),
        InfluxQL(summed_series("foxess_t_realtime", 'mean("generation_power_w")', FOX_T, "serial"))
        .alias("PV FoxESS T-series"),
    ]


def energy_today() -> list[InfluxQL]:
    return [
        InfluxQL(f'SELECT sum("energy_wh") / 1000 FROM "enphase_interval" WHERE $timeFilter AND {ENVOY}')
        .alias("PV Enphase"),
        InfluxQL(spread_sum("alphaess_extended", {"PV AlphaESS": "EpvTotal", "Grid in": "Einput",
                                                  "Grid out": "Eoutput", "Battery charged": "Echarge",
                                                  "Battery discharged": "EDischarge"}, ALPHA, "serial"))
        .alias("$col"),
        InfluxQL(spread_sum("foxess_telemetry", {"PV FoxESS M1": "generation_total_kwh"}, FOX, "serial"))
        .alias("$col"),
        InfluxQL(spread_sum("foxess_t_realtime", {"PV FoxESS T-series": "total_yield_kwh"}, FOX_T, "serial"))
        .alias("$col"),
    ]


# -- Enphase -------------------------------------------------------------------------------------

def enphase() -> dm.Dashboard:
    b = Board("pvtap-enphase", "pvtap Enphase", "Per-microinverter power, energy per day, temperature, AC and DC "
              "voltage, and the Envoy's events, from its reports to the Enphase cloud.")
    b.variable("envoy", "Envoy", 'SHOW TAG VALUES FROM "enphase_envoy" WITH KEY = "envoy"')
    b.variable("eqid", "Microinverter",
               'SHOW TAG VALUES FROM "enphase_interval" WITH KEY = "eqid" WHERE "envoy" =~ /^$envoy$/')
    micro = f'{ENVOY} AND {matches("eqid", "eqid")}'
    b.panel(lines(), "Power per microinverter", InfluxQL(series("enphase_interval", 'mean("avg_power_w")', micro,
                                                                '"eqid"')).alias("$tag_eqid"), width=24, unit="watt")
    b.panel(bars(), "Energy per day (UTC days)", InfluxQL(
        f'SELECT sum("energy_wh") FROM "enphase_interval" WHERE $timeFilter AND {micro} '
        'GROUP BY time(1d), "eqid" fill(none)').alias("$tag_eqid"), width=24, unit="watth")
    for title, field, unit in (("Temperature", "temperature_c", "celsius"), ("AC voltage", "ac_voltage_v", "volt"),
                               ("DC voltage", "dc_voltage_v", "volt"), ("AC frequency", "ac_frequency_hz", "hertz")):
        b.panel(lines(), title, InfluxQL(series("enphase_reading", f'mean("{field}")', micro, '"eqid"'))
                .alias("$tag_eqid"), unit=unit)
    b.panel(now_stat(), "Reports received", InfluxQL(
        f'SELECT count("report_timestamp") FROM "enphase_envoy" WHERE $timeFilter AND {ENVOY} GROUP BY "envoy"')
        .alias("$tag_envoy"), width=6, height=6)
    b.panel(events_table(), "Events", InfluxQL(
        f'SELECT "event_code", "description", "state", "eqid" FROM "enphase_event" WHERE $timeFilter AND {ENVOY} '
        "ORDER BY time DESC LIMIT 500").table(), width=18, height=6)
    return b.builder.build()


# -- AlphaESS ------------------------------------------------------------------------------------

def alphaess() -> dm.Dashboard:
    b = Board("pvtap-alphaess", "pvtap AlphaESS", "Power flows, state of charge, battery and cell extremes, "
              "inverter temperature, events and commands of AlphaESS systems.")
    b.variable("alphaess", "System", 'SHOW TAG VALUES FROM "alphaess_realtime" WITH KEY = "serial"')
    grid = " + ".join(f'mean("{f}")' for f in PMETER)
    b.panel(lines(), "Power flows", InfluxQL(series(
        "alphaess_realtime", f'mean("Ppv1") + mean("Ppv2") AS "PV", mean("Pbat") AS "Battery", {grid} AS "Grid", '
        + " + ".join(f'mean("{f}")' for f in (*PMETER, *PREAL)) + ' AS "House"', ALPHA, '"serial"'))
        .alias("$col $tag_serial"), width=18, height=9, unit="watt",
        description="Battery > 0 discharging; grid > 0 importing; house = grid meter + inverter output.")
    b.panel(gauge.Panel().min(0).max(100), "State of charge", InfluxQL(
        f'SELECT last("SOC") FROM "alphaess_realtime" WHERE $timeFilter AND {ALPHA} GROUP BY "serial"')
        .alias("$tag_serial"), width=6, height=9, unit="percent")
    b.panel(lines(), "Battery voltage and current", InfluxQL(series(
        "alphaess_extended", 'mean("BatV") AS "V", mean("BatC") AS "A"', ALPHA, '"serial"'))
        .alias("$col $tag_serial"))
    b.panel(table.Panel(), "Cell extremes", InfluxQL(
        'SELECT last("VcellLow") % 65536 AS "lowest cell mV", last("VcellHigh") % 65536 AS "highest cell mV", '
        'last("TcellLow") % 65536 AS "coldest cell °C", last("TcellHigh") % 65536 AS "warmest cell °C" '
        f'FROM "alphaess_extended" WHERE $timeFilter AND {ALPHA} GROUP BY "serial"').table(),
        description="The low 16 bits of the packed VcellLow/High and TcellLow/High words (module, cell, value: "
                    "an inference from captures, see docs/alphaess.md).")
    b.panel(lines(), "Temperatures", InfluxQL(series("alphaess_extended", 'mean("Tinv") AS "inverter"', ALPHA,
                                                     '"serial"')).alias("$col $tag_serial"), unit="celsius")
    b.panel(lines(), "Grid voltage and frequency", InfluxQL(series(
        "alphaess_extended", 'mean("Ua") AS "L1 V", mean("Ub") AS "L2 V", mean("Uc") AS "L3 V", mean("Fac") AS "Hz"',
        ALPHA, '"serial"')).alias("$col $tag_serial"))
    b.panel(events_table(), "Events", InfluxQL(
        f'SELECT "device_time", "code", "msg_type" FROM "alphaess_event" WHERE $timeFilter AND {ALPHA} '
        "ORDER BY time DESC LIMIT 500").table())
    b.panel(events_table(), "Commands from the cloud", InfluxQL(
        f'SELECT "kind", "command", "status" FROM "alphaess_command" WHERE $timeFilter AND {ALPHA} '
        "ORDER BY time DESC LIMIT 500").table())
    return b.builder.build()


# -- FoxESS --------------------------------------------------------------------------------------

def foxess() -> dm.Dashboard:
    b = Board("pvtap-foxess", "pvtap FoxESS", "FoxESS M1/Q1 microinverters (TLS 14431), H-series dongles "
              "(10001) and T-series inverters (RS485 through a TCP bridge): power, PV strings, temperature, "
              "lifetime energy, presence broadcasts.")
    b.variable("foxess", "Inverter", FOX_SERIALS)
    pv_m1 = ", ".join(f'mean("pv{i}_power_w") AS "PV{i}"' for i in range(1, 5))
    b.panel(lines(), "AC power", InfluxQL(series("foxess_telemetry", 'mean("ac_power_w")', FOX, '"serial"'))
            .alias("M1 $tag_serial"), InfluxQL(series("foxess_h1_realtime", 'mean("grid_power_w")', FOX, '"serial"'))
            .alias("H-series grid $tag_serial"), width=24, unit="watt")
    b.panel(lines(), "PV strings", InfluxQL(series("foxess_telemetry", pv_m1, FOX, '"serial"'))
            .alias("$col $tag_serial"), InfluxQL(series(
                "foxess_h1_realtime", 'mean("pv1_power_w") AS "PV1", mean("pv2_power_w") AS "PV2"', FOX, '"serial"'))
            .alias("$col $tag_serial"), unit="watt",
            description="PV3 and PV4 only on four-string models (Q1).")
    b.panel(lines(), "PV string voltage", InfluxQL(series(
        "foxess_telemetry", ", ".join(f'mean("pv{i}_voltage_v") AS "PV{i}"' for i in range(1, 5)), FOX, '"serial"'))
        .alias("$col $tag_serial"), unit="volt")
    b.panel(lines(), "Temperature", InfluxQL(series("foxess_telemetry", 'mean("temperature_c")', FOX, '"serial"'))
            .alias("$tag_serial"), unit="celsius")
    b.panel(lines(), "H-series battery", InfluxQL(series(
        "foxess_h1_realtime", 'mean("battery_voltage_v") AS "V", mean("battery_current_a") AS "A"', FOX, '"serial"'))
        .alias("$col $tag_serial"))
    b.panel(now_stat(), "Lifetime energy", InfluxQL(
        'SELECT last("generation_total_kwh") AS "generated", last("export_total_kwh") AS "exported" '
        f'FROM "foxess_telemetry" WHERE $timeFilter AND {FOX} GROUP BY "serial"').alias("$col $tag_serial"),
        unit="kwatth")
    b.panel(table.Panel(), "State", InfluxQL(
        'SELECT last("state_text") AS "state", last("fault_word_1") AS "fault 1", last("fault_word_2") AS "fault 2" '
        f'FROM "foxess_telemetry" WHERE $timeFilter AND {FOX} GROUP BY "serial"').table())
    b.panel(bars(), "Presence broadcasts", InfluxQL(series(
        "foxess_presence", 'count("seq") AS "mesh join_me_req", count("device_clock") AS "heartbeat"', "",
        fill="0")).alias("$col"),
            width=24, description="ESP-MESH join_me_req (UDP 6364) and heartbeats (UDP 3334) heard on the LAN.")
    t_series(b)
    return b.builder.build()


def t_series(b: Board) -> None:
    """The T-series section: its broadcast realtime block (docs/foxess.md, foxess_t_realtime)."""
    b.row("T-series (three-phase, RS485 bridge)")
    b.panel(lines(), "T-series power", InfluxQL(series(
        "foxess_t_realtime", 'mean("generation_power_w") AS "generation", mean("grid_power_w") AS "grid", '
        'mean("load_power_w") AS "load"', FOX_T, '"serial"')).alias("$col $tag_serial"), width=24, unit="watt",
        description="As the inverter broadcasts them (the sign of grid power is not publicly documented). A "
                    "T-series behind an RS485 bridge sends no serial: shown whichever inverters are selected.")
    strings = range(1, 5)
    b.panel(lines(), "T-series PV strings", InfluxQL(series(
        "foxess_t_realtime", ", ".join(f'mean("pv{i}_power_w") AS "PV{i}"' for i in strings), FOX_T, '"serial"'))
        .alias("$col $tag_serial"), unit="watt", description="Voltage × current: the wire's power words read 0.")
    b.panel(lines(), "T-series PV string voltage", InfluxQL(series(
        "foxess_t_realtime", ", ".join(f'mean("pv{i}_voltage_v") AS "PV{i}"' for i in strings), FOX_T, '"serial"'))
        .alias("$col $tag_serial"), unit="volt")
    phases = ("r", "s", "t")
    b.panel(lines(), "T-series phase voltage", InfluxQL(series(
        "foxess_t_realtime", ", ".join(f'mean("phase_{p}_voltage_v") AS "{p.upper()}"' for p in phases), FOX_T,
        '"serial"')).alias("$col $tag_serial"), width=8, unit="volt")
    b.panel(lines(), "T-series phase power", InfluxQL(series(
        "foxess_t_realtime", ", ".join(f'mean("phase_{p}_power_w") AS "{p.upper()}"' for p in phases), FOX_T,
        '"serial"')).alias("$col $tag_serial"), width=8, unit="watt")
    b.panel(lines(), "T-series frequency", InfluxQL(series(
        "foxess_t_realtime", ", ".join(f'mean("phase_{p}_frequency_hz") AS "{p.upper()}"' for p in phases), FOX_T,
        '"serial"')).alias("$col $tag_serial"), width=8, unit="hertz")
    b.panel(lines(), "T-series temperatures", InfluxQL(series(
        "foxess_t_realtime", 'mean("boost_temperature_c") AS "boost", mean("inverter_temperature_c") AS "inverter", '
        'mean("ambient_temperature_c") AS "ambient"', FOX_T, '"serial"')).alias("$col $tag_serial"), unit="celsius")
    b.panel(now_stat(), "T-series energy", InfluxQL(
        'SELECT last("today_yield_kwh") AS "today", last("total_yield_kwh") AS "lifetime" '
        f'FROM "foxess_t_realtime" WHERE $timeFilter AND {FOX_T} GROUP BY "serial"').alias("$col $tag_serial"),
        width=6, unit="kwatth", description="The inverter's own counters (0.1 kWh).")
    b.panel(table.Panel(), "T-series fault words", InfluxQL(
        "SELECT " + ", ".join(f'last("fault_word_{i}") AS "fault {i}"' for i in range(1, 9))
        + f' FROM "foxess_t_realtime" WHERE $timeFilter AND {FOX_T} GROUP BY "serial"').table(), width=6,
        description="The latest of the eight 32-bit fault words; 0: no fault.")


# -- pvtap health --------------------------------------------------------------------------------

#: per device kind: (label, measurement, a field every record has, the device's tag)
REPORTERS = (("Envoy", "enphase_envoy", "report_timestamp", "envoy"),
             ("AlphaESS", "alphaess_realtime", "SOC", "serial"),
             ("FoxESS M1", "foxess_telemetry", "ac_power_w", "serial"),
             ("FoxESS H-series", "foxess_h1_realtime", "grid_power_w", "serial"),
             ("FoxESS T-series", "foxess_t_realtime", "generation_power_w", "serial"))


def health() -> dm.Dashboard:
    b = Board("pvtap-health", "pvtap health", "Is pvtap working: devices reporting, connections, bytes, decode "
              "errors, dropped copies, the InfluxDB backlog. Live numbers: /metrics of each process.")
    silent = statushistory.Panel().interval("15m").show_value(cm.VisibilityMode.NEVER) \
        .thresholds(dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="red"), dm.Threshold(value=1, color="green")])) \
        .color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS)) \
        .mappings([dm.ValueMap(options={"0": dm.ValueMappingResult(text="silent", color="red")})])
    b.panel(silent, "Devices reporting (red: silent)", *(
        InfluxQL(f'SELECT count("{field}") FROM "{measurement}" WHERE $timeFilter GROUP BY time($__interval), '
                 f'"{tag}" fill(0)').alias(f"{label} $tag_{tag}") for label, measurement, field, tag in REPORTERS),
        width=24, height=8, description="Records per 15 minutes or more; a device that stopped reporting turns red.")
    b.panel(table.Panel().with_transformation(dm.DataTransformerConfig(id_val="seriesToRows")), "Last contact", *(
        InfluxQL(f'SELECT last("{field}") FROM "{measurement}" WHERE time > now() - 30d GROUP BY "{tag}"')
        .alias(f"{label} $tag_{tag}") for label, measurement, field, tag in REPORTERS),
        width=8, height=8, description="Last record of each device in the last 30 days (the Time column).")
    b.panel(bars(), "Connections by outcome", InfluxQL(series(
        "pvtap_connection", 'count("duration_s")', "", '"protocol", "outcome"')).alias("$tag_protocol $tag_outcome"),
        width=16, height=8)
    b.panel(lines(), "Bytes", InfluxQL(series("pvtap_connection", 'sum("bytes_up") AS "up", sum("bytes_down") AS '
                                              '"down"', "", '"protocol"')).alias("$tag_protocol $col"),
            InfluxQL(series("pvtap_stats", 'non_negative_difference(last("bytes_up")) AS "up", '
                            'non_negative_difference(last("bytes_down")) AS "down"', "\"process\" = 'enphase'"))
            .alias("enphase $col"), unit="decbytes")
    b.panel(lines(), "Decode errors and dropped copies", InfluxQL(series(
        "pvtap_connection", 'sum("decode_errors") AS "framing errors", sum("dropped_copies") AS "dropped copies", '
        'sum("rejected") AS "rejected"', "", '"protocol"')).alias("$tag_protocol $col"),
        InfluxQL(series("pvtap_stats", 'non_negative_difference(last("decode_errors")) AS "decode errors", '
                        'non_negative_difference(last("dropped_copies")) AS "dropped copies"', "", '"process"'))
        .alias("$tag_process $col"))
    b.panel(lines(), "InfluxDB backlog", InfluxQL(series("pvtap_stats", 'last("backlog")', "", '"process"'))
            .alias("$tag_process"), unit="short",
            description="Records in each process's local store not yet accepted by InfluxDB (stored every minute; "
                        "what waited during an outage shows once it is delivered).")
    b.panel(lines(), "Ingest queue and open connections", InfluxQL(series(
        "pvtap_stats", 'last("ingest_queue") AS "ingest queue", last("connections_open") AS "open connections"', "",
        '"process"')).alias("$tag_process $col"))
    b.panel(now_stat(), "Delivery failures", InfluxQL(
        'SELECT spread("delivery_failures") FROM "pvtap_stats" WHERE $timeFilter GROUP BY "process"')
        .alias("$tag_process"), width=12, height=5, description="Failed writes to InfluxDB in the time range "
                                                                 "(each retried; `pvtap status` says why).")
    return b.builder.build()


DASHBOARDS: dict[str, Callable[[], dm.Dashboard]] = {
    "pvtap-overview": overview, "pvtap-enphase": enphase, "pvtap-alphaess": alphaess, "pvtap-foxess": foxess,
    "pvtap-health": health,
}
