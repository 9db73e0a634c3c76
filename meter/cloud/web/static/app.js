// The dashboard: the fleet table and the readings charts, over /api/v1.
//
// Everything the API returns is data: the DOM is built with textContent and
// attributes, never from HTML text.  Readings are stamped in their device's
// local time without a zone; the charts show those clock times as they are
// (uPlot formats them in UTC, where a stamp read as UTC keeps its digits).
"use strict";

(function () {
  const PAGE_SIZE = 25;
  // How often the fleet is asked for again (#refresh=SECONDS changes it):
  // the charts reload only when a shown device's last reading changed.
  const REFRESH_MS = 15000;
  // Lines one chart can tell apart (Okabe-Ito, readable for most kinds of
  // colour blindness).
  const COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
  const MAX_SHOWN = COLOURS.length;
  const DAY = 86400;
  const RANGE_DAYS = { day: 1, week: 7, month: 30 };
  const FIRST_CHART_MARK = "meter:first-chart";
  // The time axis in 24-hour clock times and day-month dates (uPlot's
  // table: tick spacing, then the formats of a tick and of a tick that
  // starts a new year, month, day, hour, minute, second).
  const TIME_TICKS = [
    [DAY * 365, "{YYYY}", null, null, null, null, null, null, 1],
    [DAY * 28, "{MMM}", "\n{YYYY}", null, null, null, null, null, 1],
    [DAY, "{D} {MMM}", "\n{YYYY}", null, null, null, null, null, 1],
    [3600, "{HH}:{mm}", "\n{D} {MMM} {YYYY}", null, "\n{D} {MMM}", null, null, null, 1],
    [60, "{HH}:{mm}", "\n{D} {MMM} {YYYY}", null, "\n{D} {MMM}", null, null, null, 1],
    [1, "{HH}:{mm}:{ss}", "\n{D} {MMM} {YYYY}", null, "\n{D} {MMM}", null, null, null, 1],
  ];

  const state = {
    devices: [],          // the last /api/v1/devices answer
    byId: new Map(),
    sortKey: "device_id",
    sortDir: 1,
    search: "",
    staleOnly: false,
    page: 0,
    selected: [],         // device ids, in the order they were picked
    range: "day",
    customFrom: "",
    customTo: "",
    shownLast: new Map(), // device id -> last_reading the charts were drawn with
    seriesRequest: 0,     // the latest chart load; older answers are dropped
    charts: null,
    refreshMs: REFRESH_MS,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (key === "text") node.textContent = value;
        else if (key === "className") node.className = value;
        else node.setAttribute(key, value);
      }
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // ---- times: naive ISO stamps <-> seconds, the digits kept as they are

  function stampSeconds(text) {
    return Date.parse(text.length === 10 ? text + "T00:00Z" : text + "Z") / 1000;
  }

  function secondsStamp(seconds) {
    return new Date(seconds * 1000).toISOString().slice(0, 16);
  }

  function showStamp(text) {
    return text ? text.replace("T", " ").slice(0, 16) : "–";
  }

  // ---- the API

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const why = body && (body.error || body.message) ? String(body.error || body.message) : response.statusText;
      throw new Error(`${url.split("?")[0]}: ${response.status} ${why}`);
    }
    return body;
  }

  // The devices of /api/v1/devices: a list, or an object holding it.
  function deviceList(body) {
    return Array.isArray(body) ? body : body.devices || [];
  }

  // One device's series (docs/api.md) as columns [seconds, temperature,
  // humidity]: the mean of each bucket, which is the reading itself when
  // the range holds no more readings than the points asked for.  The
  // server's "t" is the stamp read as UTC, as the charts take it.
  function seriesColumns(body) {
    return [body.t, body.temperature_c.mean, body.humidity_pct.mean];
  }

  // ---- the fleet table

  function compareAddresses(a, b) {
    const pa = a.split(".").map(Number), pb = b.split(".").map(Number);
    if (pa.length === 4 && pb.length === 4 && !pa.some(isNaN) && !pb.some(isNaN)) {
      for (let i = 0; i < 4; i++) if (pa[i] !== pb[i]) return pa[i] - pb[i];
      return 0;
    }
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function compare(a, b) {
    const key = state.sortKey;
    let order;
    if (key === "device_ip") order = compareAddresses(a.device_ip, b.device_ip);
    else if (key === "last_reading") order = (a.last_reading || "").localeCompare(b.last_reading || "");
    else order = a[key] - b[key];
    return order * state.sortDir || a.device_id - b.device_id;
  }

  function visibleDevices() {
    const needle = state.search.trim().toLowerCase();
    return state.devices.filter((d) =>
      (!state.staleOnly || d.stale) &&
      (!needle || String(d.device_id) === needle || String(d.device_id).startsWith(needle) ||
        d.device_ip.toLowerCase().includes(needle))
    ).sort(compare);
  }

  function renderTable() {
    const rows = visibleDevices();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * PAGE_SIZE;
    const body = document.createElement("tbody");
    for (const device of rows.slice(start, start + PAGE_SIZE)) {
      const picked = state.selected.includes(device.device_id);
      const box = el("input", { type: "checkbox", "aria-label": `Plot device ${device.device_id}` });
      box.checked = picked;
      box.dataset.device = String(device.device_id);
      const colour = picked ? COLOURS[state.selected.indexOf(device.device_id) % COLOURS.length] : null;
      const swatch = el("span", { className: "swatch" });
      if (colour) swatch.style.backgroundColor = colour;
      const last = el("td", { className: "last" }, [el("span", { text: showStamp(device.last_reading) })]);
      if (device.stale) last.append(" ", el("span", { className: "badge", text: "stale" }));
      const row = el("tr", { className: device.stale ? "stale" : "" }, [
        el("td", { className: "pick" }, [box, swatch]),
        el("td", { className: "num", text: String(device.device_id) }),
        el("td", { className: "addr", text: device.device_ip }),
        last,
        el("td", { className: "num", text: device.readings.toLocaleString("en") }),
      ]);
      row.dataset.device = String(device.device_id);
      if (device.stale) row.dataset.stale = "true";
      if (picked) row.classList.add("picked");
      body.append(row);
    }
    if (!rows.length) {
      body.append(el("tr", {}, [el("td", { colspan: "5", className: "empty", text:
        state.devices.length ? "No device matches." : "No device has sent a reading yet." })]));
    }
    $("devices").tBodies[0].replaceWith(body);
    $("page-text").textContent = `Page ${state.page + 1} of ${pages}`;
    $("page-prev").disabled = state.page === 0;
    $("page-next").disabled = state.page >= pages - 1;
    const stale = state.devices.filter((d) => d.stale).length;
    $("fleet-summary").textContent =
      `${state.devices.length.toLocaleString("en")} devices` + (stale ? `, ${stale.toLocaleString("en")} stale` : "") +
      (rows.length !== state.devices.length ? ` · ${rows.length.toLocaleString("en")} shown` : "");
    for (const th of document.querySelectorAll("#devices thead th[aria-sort]")) {
      const key = th.querySelector("button").dataset.sort;
      th.setAttribute("aria-sort", key === state.sortKey ? (state.sortDir > 0 ? "ascending" : "descending") : "none");
    }
  }

  // ---- the charts

  function chartWidth(node) {
    return Math.max(260, Math.floor(node.getBoundingClientRect().width));
  }

  function chartHeight() {
    return window.innerWidth < 700 ? 220 : 280;
  }

  function makeChart(node, unit, label, sync) {
    const fmt = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ${unit}`);
    const options = {
      width: chartWidth(node),
      height: chartHeight(),
      // The stamps are the devices' clock times: shown with their digits
      // unchanged, whatever the browser's zone.
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      cursor: { sync: { key: sync.key }, drag: { x: true, y: false } },
      scales: { x: { time: true } },
      legend: { live: true },
      series: [{ label: "Time", value: (u, ts) => (ts === null ? "–" : showStamp(secondsStamp(ts))) }],
      axes: [
        { stroke: "#444", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, values: TIME_TICKS },
        {
          label: label, stroke: "#444", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, size: 76, gap: 6,
          values: (u, values) => values.map((v) => `${v} ${unit}`),
        },
      ],
      hooks: {
        draw: [(u) => {
          if (u.data[0].length && !performance.getEntriesByName(FIRST_CHART_MARK).length) {
            performance.mark(FIRST_CHART_MARK);
          }
        }],
        setScale: [(u, key) => {
          if (key === "x" && !sync.busy) {
            sync.busy = true;
            for (const other of sync.charts) {
              if (other !== u) other.setScale("x", { min: u.scales.x.min, max: u.scales.x.max });
            }
            sync.busy = false;
          }
        }],
      },
    };
    const chart = new uPlot(options, [[]], node);
    chart.meterFormat = fmt;
    return chart;
  }

  function setUpCharts() {
    const sync = { key: "meter", charts: [], busy: false };
    const temperature = makeChart($("chart-temperature"), "°C", "Temperature (°C)", sync);
    const humidity = makeChart($("chart-humidity"), "%RH", "Humidity (%RH)", sync);
    sync.charts.push(temperature, humidity);
    state.charts = { temperature, humidity };
    // The tests and the benchmark read the charts' own state.
    window.meterCharts = state.charts;
    window.meterColours = COLOURS;
    let pending = 0;
    const resize = () => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => {
        temperature.setSize({ width: chartWidth($("chart-temperature")), height: chartHeight() });
        humidity.setSize({ width: chartWidth($("chart-humidity")), height: chartHeight() });
      });
    };
    window.addEventListener("resize", resize);
  }

  // The range asked for: [from, to) in seconds, and its words.
  function currentRange() {
    if (state.range === "custom" && state.customFrom && state.customTo) {
      const from = stampSeconds(state.customFrom), to = stampSeconds(state.customTo);
      return { from, to, text: `${showStamp(state.customFrom)} to ${showStamp(state.customTo)}` };
    }
    // The last day that has readings of a shown device, and the days
    // before it: a fleet that reports once a day has nothing for today yet.
    let last = 0;
    for (const id of state.selected) {
      const device = state.byId.get(id);
      if (device && device.last_reading) last = Math.max(last, stampSeconds(device.last_reading));
    }
    if (!last) last = Math.floor(Date.now() / 1000);
    const days = RANGE_DAYS[state.range] || 1;
    const to = Math.floor(last / DAY) * DAY + DAY;
    const from = to - days * DAY;
    const first = secondsStamp(from).slice(0, 10), lastDay = secondsStamp(to - DAY).slice(0, 10);
    return { from, to, text: days === 1 ? `${first}` : `${first} to ${lastDay}` };
  }

  function seriesUrl(id, range, points) {
    const query = new URLSearchParams({
      device: String(id), from: secondsStamp(range.from), to: secondsStamp(range.to), points: String(points),
    });
    return `/api/v1/series?${query}`;
  }

  async function loadCharts() {
    const request = ++state.seriesRequest;
    const ids = state.selected.filter((id) => state.byId.has(id));
    const range = currentRange();
    $("range-text").textContent = range.text;
    const empty = $("chart-empty");
    if (!ids.length) {
      drawCharts([], [], range);
      empty.hidden = false;
      empty.textContent = state.devices.length ? "Tick a device in the table to plot it." : "";
      loaded(null);
      return;
    }
    // About one point per pixel: the server keeps the minimum, mean and
    // maximum of each bucket beyond that.
    const points = Math.min(2000, chartWidth($("chart-temperature")));
    let answers;
    try {
      answers = await Promise.all(ids.map((id) => getJSON(seriesUrl(id, range, points))));
    } catch (e) {
      if (request === state.seriesRequest) {
        setStatus(`Could not load the readings: ${e.message}`, true);
        loaded(e.message);
      }
      return;
    }
    if (request !== state.seriesRequest) return; // a newer load is under way
    for (const id of ids) state.shownLast.set(id, state.byId.get(id).last_reading);
    const tables = answers.map(seriesColumns);
    const total = tables.reduce((n, t) => n + t[0].length, 0);
    empty.hidden = total > 0;
    empty.textContent = total ? "" : "No readings in this range.";
    drawCharts(ids, tables, range);
    loaded(null);
  }

  // Each finished load of the charts, counted and announced: the browser
  // test and the benchmark wait for it rather than polling.
  function loaded(error) {
    window.meterLoads = (window.meterLoads || 0) + 1;
    window.meterLastError = error;
    document.dispatchEvent(new CustomEvent("meter:charts", { detail: { error } }));
  }

  function drawCharts(ids, tables, range) {
    for (const [kind, column] of [["temperature", 1], ["humidity", 2]]) {
      const chart = state.charts[kind];
      while (chart.series.length > 1) chart.delSeries(chart.series.length - 1);
      const perDevice = tables.map((t) => [t[0], t[column]]);
      const data = perDevice.length ? uPlot.join(perDevice) : [[]];
      ids.forEach((id, i) => {
        const device = state.byId.get(id);
        chart.addSeries({
          label: `#${id} ${device ? device.device_ip : ""}`.trim(),
          stroke: COLOURS[i % COLOURS.length],
          width: 2,
          spanGaps: true,
          points: { show: tables[i][0].length < 50 },
          value: (u, v) => chart.meterFormat(v),
        }, i + 1);
      });
      chart.setData(data, false);
      chart.setScale("x", { min: range.from, max: range.to });
    }
  }

  function resetZoom() {
    const range = currentRange();
    state.charts.temperature.setScale("x", { min: range.from, max: range.to });
  }

  // ---- the fleet, now and every REFRESH_MS

  async function refresh() {
    let devices;
    try {
      devices = deviceList(await getJSON("/api/v1/devices"));
    } catch (e) {
      setStatus(`Could not load the fleet: ${e.message}. Trying again in ${state.refreshMs / 1000} s.`, true);
      loaded(e.message);
      return;
    }
    state.devices = devices;
    state.byId = new Map(devices.map((d) => [d.device_id, d]));
    if (!state.selected.length && devices.length) {
      const fresh = devices.find((d) => !d.stale) || devices[0];
      state.selected = [fresh.device_id];
    }
    renderTable();
    const changed = state.selected.some((id) => state.byId.has(id) &&
      state.shownLast.get(id) !== state.byId.get(id).last_reading);
    if (changed || !state.charts.temperature.data[0].length) await loadCharts();
    const now = new Date();
    setStatus(`Updated ${now.toLocaleTimeString("en-GB")} · refreshes every ${state.refreshMs / 1000} s`);
  }

  function schedule() {
    setTimeout(async () => {
      await refresh();
      schedule();
    }, state.refreshMs);
  }

  // ---- the address bar keeps the choice: #devices=1,4&range=week

  function readHash() {
    const query = new URLSearchParams(location.hash.slice(1));
    const ids = (query.get("devices") || "").split(",").map(Number).filter((n) => Number.isInteger(n) && n > 0);
    state.selected = ids.slice(0, MAX_SHOWN);
    const range = query.get("range");
    if (range in RANGE_DAYS || range === "custom") state.range = range;
    state.customFrom = query.get("from") || "";
    state.customTo = query.get("to") || "";
    const every = Number(query.get("refresh"));
    if (Number.isFinite(every) && every >= 1 && every <= 3600) state.refreshMs = every * 1000;
  }

  function writeHash() {
    const query = new URLSearchParams();
    if (state.selected.length) query.set("devices", state.selected.join(","));
    query.set("range", state.range);
    if (state.range === "custom") {
      query.set("from", state.customFrom);
      query.set("to", state.customTo);
    }
    if (state.refreshMs !== REFRESH_MS) query.set("refresh", String(state.refreshMs / 1000));
    history.replaceState(null, "", `#${query}`);
  }

  function showRangeButtons() {
    for (const button of document.querySelectorAll("[data-range]")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === state.range));
    }
    $("custom").hidden = state.range !== "custom";
  }

  function wire() {
    $("search").addEventListener("input", (event) => {
      state.search = event.target.value;
      state.page = 0;
      renderTable();
    });
    $("stale-only").addEventListener("change", (event) => {
      state.staleOnly = event.target.checked;
      state.page = 0;
      renderTable();
    });
    $("page-prev").addEventListener("click", () => { state.page -= 1; renderTable(); });
    $("page-next").addEventListener("click", () => { state.page += 1; renderTable(); });
    for (const button of document.querySelectorAll("#devices thead button[data-sort]")) {
      button.addEventListener("click", () => {
        const key = button.dataset.sort;
        state.sortDir = key === state.sortKey ? -state.sortDir : 1;
        state.sortKey = key;
        renderTable();
      });
    }
    $("devices").addEventListener("change", (event) => {
      const box = event.target;
      if (!box.dataset || !box.dataset.device) return;
      const id = Number(box.dataset.device);
      if (box.checked) {
        if (state.selected.length >= MAX_SHOWN) {
          box.checked = false;
          setStatus(`At most ${MAX_SHOWN} devices on one chart: untick one first.`, true);
          return;
        }
        state.selected.push(id);
      } else {
        state.selected = state.selected.filter((n) => n !== id);
      }
      writeHash();
      renderTable();
      loadCharts();
    });
    for (const button of document.querySelectorAll("[data-range]")) {
      button.addEventListener("click", () => {
        state.range = button.dataset.range;
        showRangeButtons();
        if (state.range === "custom") {
          const range = currentRange();
          if (!state.customFrom) $("custom-from").value = secondsStamp(range.from);
          if (!state.customTo) $("custom-to").value = secondsStamp(range.to);
          return;
        }
        writeHash();
        loadCharts();
      });
    }
    $("custom").addEventListener("submit", (event) => {
      event.preventDefault();
      const from = $("custom-from").value, to = $("custom-to").value;
      if (!from || !to || stampSeconds(to) <= stampSeconds(from)) {
        setStatus("The custom range needs a start before its end.", true);
        return;
      }
      state.customFrom = from;
      state.customTo = to;
      writeHash();
      loadCharts();
    });
    $("reset-zoom").addEventListener("click", resetZoom);
  }

  async function start() {
    if (typeof uPlot === "undefined") {
      setStatus("The chart library did not load (/static/vendor/uPlot.iife.min.js): the build installs it " +
        "with `make` (npm ci).", true);
      return;
    }
    readHash();
    showRangeButtons();
    if (state.range === "custom") {
      $("custom-from").value = state.customFrom;
      $("custom-to").value = state.customTo;
    }
    setUpCharts();
    wire();
    await refresh();
    writeHash();
    schedule();
  }

  start();
})();
