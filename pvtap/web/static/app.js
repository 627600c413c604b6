// pvtap web view: polls /api/live for devices, current values and health; draws the charts with
// uPlot from /api/chart and /api/energy. Everything comes from this server (no CDN).
// window.pvtap holds the state (the browser tests read the charts' data from it).
"use strict";
(function () {
  const QUANTITY = {
    pv_w: ["PV", "W"], battery_w: ["Battery", "W"], grid_w: ["Grid", "W"], house_w: ["House", "W"],
    soc_pct: ["SoC", "%"], temperature_c: ["Temperature", "°C"],
  };
  const POWER = ["pv_w", "battery_w", "grid_w", "house_w"];
  const COLOURS = { pv_w: "#e6a100", battery_w: "#1f77b4", grid_w: "#d62728", house_w: "#9467bd",
                    soc_pct: "#2ca02c" };
  const DASHES = [[], [6, 3], [2, 3], [10, 3, 2, 3]];  // one per device, in the order the server sends them
  const SUMMED = ["pv_w", "house_w"];  // the power drawn summed over the devices too
  const tz = -new Date().getTimezoneOffset();  // minutes east of UTC
  const state = { live: null, charts: {}, chartSeries: {}, chartData: null, energy: null,
                  liveUpdates: 0, chartUpdates: 0, errors: [] };
  window.pvtap = state;

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
    return node;
  }
  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status} ${await response.text()}`);
    return response.json();
  }
  function span(seconds) {
    if (seconds < 60) return `${Math.floor(seconds)} s`;
    if (seconds < 7200) return `${Math.floor(seconds / 60)} min`;
    if (seconds < 172800) return `${Math.floor(seconds / 3600)} h`;
    return `${Math.floor(seconds / 86400)} days`;
  }
  function number(value, unit) {
    if (value === null || value === undefined) return "–";
    if (unit === "W" && Math.abs(value) >= 1000) return `${(value / 1000).toFixed(2)} kW`;
    const digits = unit === "W" ? 0 : 1;
    return `${value.toFixed(digits)} ${unit}`;
  }
  function when(seconds) { return new Date(seconds * 1000).toLocaleString(); }

  // -- devices, now, health ------------------------------------------------------------------

  function renderDevices(live) {
    const body = $("devices").querySelector("tbody");
    body.replaceChildren(...live.devices.map((d) => {
      const since = d.silent_for_s;
      const contact = el("span", { class: `state ${d.silent ? "silent" : "ok"}` },
        d.silent ? `silent for ${span(since)}` : `${span(since)} ago`);
      return el("tr", { "data-serial": d.serial, "data-vendor": d.vendor, "data-state": d.silent ? "silent" : "ok" },
        el("td", {}, d.vendor), el("td", { class: "serial" }, d.serial), el("td", {}, d.model || "–"),
        el("td", {}, d.firmware || "–"),
        el("td", { class: "contact", title: when(d.last_contact_ns / 1e9) }, contact),
        el("td", { class: "num records-today" }, d.records_today.toLocaleString()),
        el("td", {}, d.path), el("td", {}, d.cloud));
    }));
    $("no-devices").hidden = live.devices.length > 0;
    $("devices").hidden = live.devices.length === 0;
    $("data-dir").textContent = live.data_dir;
  }

  function renderNow(live) {
    $("now").replaceChildren(...live.devices.filter((d) => Object.keys(d.now).length).map((d) => {
      const values = el("div", { class: "values" });
      let parts = null;
      for (const [quantity, v] of Object.entries(d.now)) {
        values.append(el("span", {}, QUANTITY[quantity][0]),
          el("span", { class: "value", "data-quantity": quantity, "data-value": v.value, "data-time-ns": v.time_ns,
                       title: `at ${when(v.time_ns / 1e9)}` }, number(v.value, v.unit)));
        if (v.parts && v.parts.length > 1) {
          parts = parts || el("table", { class: "parts" });
          parts.append(el("tr", {}, el("td", { colspan: 2, class: "muted" }, `${QUANTITY[quantity][0]} per microinverter`)));
          for (const p of v.parts) {
            parts.append(el("tr", {}, el("td", {}, p.part),
              el("td", { class: "num", "data-part": p.part, "data-quantity": quantity, "data-value": p.value },
                 number(p.value, v.unit))));
          }
        }
      }
      return el("div", { class: "card now", "data-serial": d.serial },
        el("h4", {}, `${d.vendor} ${d.serial}`), values, parts || "");
    }));
  }

  function renderHealth(live) {
    $("influx").textContent = (live.influx ? `InfluxDB: ${live.influx}`
      : "InfluxDB: not configured (influx.url is empty): records stay in the local stores")
      + ` · MQTT: ${live.mqtt || "not configured (mqtt.url is empty)"}`;
    $("health").replaceChildren(...live.health.map((h) => {
      const rows = el("table", { class: "health-rows" });
      for (const [label, value] of h.rows) {
        const loud = /^[A-Z]{3,}/.test(value) || label === label.toUpperCase();
        rows.append(el("tr", { "data-label": label }, el("td", {}, label), el("td", { class: loud ? "loud" : "" }, value)));
      }
      return el("div", { class: "card health", "data-store": h.store }, el("h4", {}, h.title), rows);
    }));
  }

  async function refreshLive() {
    let wait = 5;
    try {
      const live = await getJSON(`/api/live?tz=${tz}`);
      state.live = live;
      wait = live.refresh_s;
      renderDevices(live);
      renderNow(live);
      renderHealth(live);
      $("pseudonyms").textContent = live.pseudonymized ? "serials are pseudonyms (privacy.pseudonymize_serials)" : "";
      $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
      state.liveUpdates += 1;
    } catch (error) {
      state.errors.push(String(error));
      $("status").textContent = `cannot reach pvtap web (${error.message}); retrying`;
    }
    setTimeout(refreshLive, wait * 1000);
  }

  // -- charts ------------------------------------------------------------------------------

  function range() {
    const seconds = Number($("range").value);
    const until = Date.now() / 1000;
    return { since: until - seconds, until, seconds };
  }

  function timeTicks(u, splits) {
    // one short label per tick: the time of day, the day, or the month, as the span asks
    const span = u.scales.x.max - u.scales.x.min;
    const format = span <= 3600 ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
      : span <= 2 * 86400 ? { hour: "2-digit", minute: "2-digit" }
      : span <= 90 * 86400 ? { month: "short", day: "numeric" } : { year: "numeric", month: "short" };
    return splits.map((s) => new Date(s * 1000).toLocaleString(undefined, format));
  }
  function dayTicks(u, splits) {
    return splits.map((s) => new Date(s * 1000).toLocaleString(undefined, { month: "short", day: "numeric" }));
  }

  function drawChart(name, data, series, unit, extra) {
    const node = $(`chart-${name}`);
    const width = Math.max(300, node.clientWidth - 10);
    const layout = series.map((s) => s.label).join("|");
    const old = state.charts[name];
    if (old && old._layout === layout) {
      old.setData(data);
      return;
    }
    if (old) old.destroy();
    node.replaceChildren();
    if (!series.length) {
      node.append(el("p", { class: "muted" }, "no data in this range"));
      state.charts[name] = null;
      return;
    }
    const opts = Object.assign({
      width, height: 260,
      scales: { x: { time: true } },
      axes: [{ values: timeTicks, space: 100 }, { label: unit, size: 70 }],
      series: [{}, ...series.map((s) => Object.assign({ spanGaps: true, width: 1.5, points: { size: 4 } }, s))],
    }, extra || {});
    const chart = new uPlot(opts, data, node);
    chart._layout = layout;
    state.charts[name] = chart;
  }

  function drawPowerAndSoc(data, query) {
    state.chartData = data;
    const powerSeries = [], powerData = [data.times], socSeries = [], socData = [data.times];
    const devices = [...new Set(data.series.map((s) => s.device))];
    data.series.forEach((s) => {
      const label = `${s.device} ${QUANTITY[s.quantity][0]}`;
      const meta = { label, stroke: COLOURS[s.quantity], dash: DASHES[devices.indexOf(s.device) % DASHES.length],
                     device: s.device, vendor: s.vendor, quantity: s.quantity };
      if (s.quantity === "soc_pct") { socSeries.push(meta); socData.push(s.values); }
      else { powerSeries.push(meta); powerData.push(s.values); }
    });
    data.totals.filter((t) => SUMMED.includes(t.quantity)).forEach((t) => {
      powerSeries.push({ label: `${QUANTITY[t.quantity][0]} of all ${t.devices} devices`, stroke: COLOURS[t.quantity],
                         width: 3, device: "", quantity: t.quantity, total: true });
      powerData.push(t.values);
    });
    state.chartSeries = { power: powerSeries, soc: socSeries };
    drawChart("power", powerData, powerSeries, "W");
    drawChart("soc", socData, socSeries, "%", { scales: { x: { time: true }, y: { range: [0, 100] } } });
    const bucket = data.bucket_s ? `averaged over ${span(data.bucket_s)}` : "every stored point";
    $("chart-note").textContent = `${when(data.since)} – ${when(data.until)}, ${bucket}`;
    $("export-csv").href = `/export?format=csv&${query}`;
    $("export-lp").href = `/export?format=lp&${query}`;
  }

  function drawEnergy(energy) {
    state.energy = energy;
    const bars = uPlot.paths.bars;
    const series = [
      { label: "PV kWh", fill: "#e6a10099", stroke: "#e6a100", paths: bars({ size: [0.4, 40], align: -1 }),
        points: { show: false } },
      { label: "House kWh", fill: "#d6272899", stroke: "#d62728", paths: bars({ size: [0.4, 40], align: 1 }),
        points: { show: false } },
    ];
    const hasEnergy = energy.pv_kwh.some((v) => v !== null) || energy.house_kwh.some((v) => v !== null);
    // whole bars at both ends (from the data: uPlot widens a single point's range by itself)
    const pad = (u) => [u.data[0][0] - 43200, u.data[0][u.data[0].length - 1] + 43200];
    drawChart("energy", [energy.days, energy.pv_kwh, energy.house_kwh], hasEnergy ? series : [], "kWh",
              { scales: { x: { time: true, range: pad } },
                axes: [{ values: dayTicks, splits: (u) => u.data[0] }, { label: "kWh", size: 70 }] });
  }

  async function refreshCharts() {
    // each chart is drawn as its data arrives: energy per day may wait for the hourly cache (at start)
    const r = range();
    const query = `since=${r.since.toFixed(3)}&until=${r.until.toFixed(3)}`;
    const failed = (error) => {
      state.errors.push(String(error));
      $("chart-note").textContent = `charts unavailable: ${error.message}`;
    };
    const energy = getJSON(`/api/energy?${query}&tz=${tz}`).then(drawEnergy).catch(failed);
    await getJSON(`/api/chart?${query}`).then((data) => drawPowerAndSoc(data, query)).catch(failed);
    await energy;
    state.chartUpdates += 1;
  }

  function scheduleCharts() {
    // short ranges follow the live values; a month or a year changes slowly
    const every = range().seconds <= 2 * 86400 ? (state.live ? state.live.refresh_s : 5) : 60;
    setTimeout(async () => { await refreshCharts(); scheduleCharts(); }, every * 1000);
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("range").addEventListener("change", refreshCharts);
    await refreshLive();
    await refreshCharts();
    scheduleCharts();
    state.ready = true;
  });
})();
