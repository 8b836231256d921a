// The pagedllm dashboard: reads /dashboard/stream (server-sent events, read with fetch so that
// the API key travels in the Authorization header) and draws everything on canvases itself.
// No library, no network but this server. docs/dashboard.md describes the messages.
"use strict";

(() => {
  const KEY_ITEM = "pagedllm-api-key";
  const WINDOW_S = 300;  // the charts' time span
  const FINISHED_FADE_MS = 5000;  // a finished request's row stays this long,
  const FADE_MS = 3000;  // fading over this long
  const RETRY_MS = 2000;
  const STATE_COLORS = {
    free: "#e8eaed", cached: "#9ecae1", used: "#34a853", hit: "#fb8c00", shared: "#d93025",
  };
  const STATE_LABELS = {
    free: "free", cached: "free, holds a cached prefix", used: "in use by one request",
    hit: "one request, taken from the prefix cache", shared: "shared by several requests",
  };
  const CHARTS = [
    {title: "tokens / s", series: [["output_tps", "output", "#1a73e8"],
                                    ["prompt_tps", "prompt", "#fb8c00"]]},
    {title: "requests", integer: true, series: [["running", "running", "#188038"],
                                  ["waiting", "waiting", "#b06000"],
                                  ["swapped", "swapped", "#8430ce"]]},
    {title: "KV cache usage", percent: true, series: [["kv_usage", "usage", "#d93025"]]},
    {title: "prefix-cache hit rate", percent: true, series: [["hit_rate", "hits", "#0097a7"]]},
    {title: "time to first token (s), last 60 s", series: [["ttft_p50", "p50", "#1a73e8"],
      ["ttft_p90", "p90", "#fb8c00"], ["ttft_p99", "p99", "#d93025"]]},
    {title: "inter-token latency (ms), last 60 s", scale: 1000, series: [
      ["itl_p50", "p50", "#1a73e8"], ["itl_p90", "p90", "#fb8c00"], ["itl_p99", "p99", "#d93025"]]},
  ];

  const $ = (id) => document.getElementById(id);
  const view = {
    message: null, stateNames: [], states: new Uint8Array(0), hashes: new Uint8Array(0),
    owners: new Map(), requests: new Map(), finished: new Map(), history: [],
    counts: {}, layout: {cell: 1, cols: 1}, hover: null, pinned: null, highlight: null,
    updates: 0,
  };

  // ---- the API key: ?key= once (then kept in sessionStorage, off the address bar), or typed --
  function apiKey() {
    const params = new URLSearchParams(location.search);
    if (params.has("key")) {
      sessionStorage.setItem(KEY_ITEM, params.get("key"));
      params.delete("key");
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    }
    return sessionStorage.getItem(KEY_ITEM);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("key-input").value);
    $("key-form").hidden = true;
    connect();
  });

  function setStatus(text, kind) {
    $("status").textContent = text;
    $("status").className = kind || "";
  }

  // ---- the stream ----------------------------------------------------------------------------
  const streamUrl = location.pathname.replace(/\/+$/, "") + "/stream";

  async function connect() {
    const headers = {Accept: "text/event-stream"};
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    let response;
    try {
      response = await fetch(streamUrl, {headers, cache: "no-store"});
    } catch (error) {
      setStatus("server unreachable, retrying", "bad");
      setTimeout(connect, RETRY_MS);
      return;
    }
    if (response.status === 401) {
      setStatus(key ? "wrong API key" : "this server needs its API key", "bad");
      $("key-form").hidden = false;
      return;
    }
    if (!response.ok) {
      setStatus("stream answered " + response.status + ", retrying", "bad");
      setTimeout(connect, RETRY_MS);
      return;
    }
    setStatus("live", "ok");
    await readEvents(response.body.pipeThrough(new TextDecoderStream()).getReader());
    setStatus("disconnected, retrying", "bad");
    setTimeout(connect, RETRY_MS);
  }

  async function readEvents(reader) {
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        return;
      }
      if (chunk.done) return;
      buffer += chunk.value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  function handleEvent(text) {
    let type = "message";
    const data = [];
    for (const line of text.split("\n")) {
      if (line.startsWith("event:")) type = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (type === "history") view.history = payload;
    else if (type === "update") applyUpdate(payload);
    else if (type === "engine_error") setStatus("engine: " + payload.message, "bad");
  }

  // ---- one update ------------------------------------------------------------------------------
  function decodeBase64(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  function expandRuns(runs) {
    const ids = [];
    for (let i = 0; i < runs.length; i += 2) {
      for (let j = 0; j < runs[i + 1]; j++) ids.push(runs[i] + j);
    }
    return ids;
  }

  function applyUpdate(message) {
    view.message = message;
    view.stateNames = message.states;
    view.states = decodeBase64(message.blocks);
    view.hashes = decodeBase64(message.hashes);
    view.owners = new Map();
    const seen = new Map();
    for (const request of message.requests) {
      request.blockIds = expandRuns(request.blocks);
      for (const block of request.blockIds) {
        if (!view.owners.has(block)) view.owners.set(block, []);
        view.owners.get(block).push(request.id);
      }
      seen.set(request.id, request);
    }
    noteFinished(seen);
    view.requests = seen;
    view.counts = countStates();
    view.history.push(message.sample);
    const oldest = message.sample.t - WINDOW_S;
    while (view.history.length && view.history[0].t < oldest) view.history.shift();
    view.updates += 1;
    render();
  }

  function countStates() {
    const counts = {};
    for (const name of view.stateNames) counts[name] = 0;
    for (const state of view.states) counts[view.stateNames[state]] += 1;
    counts.in_use = view.states.length - counts.free - counts.cached;
    return counts;
  }

  function noteFinished(seen) {
    const now = Date.now();
    for (const [id, request] of view.requests) {
      if (!seen.has(id) && !view.finished.has(id)) view.finished.set(id, {request, at: now});
    }
    for (const [id, entry] of view.finished) {
      if (seen.has(id) || now - entry.at > FINISHED_FADE_MS) view.finished.delete(id);
    }
  }

  function render() {
    const m = view.message;
    $("running").textContent = m.running;
    $("waiting").textContent = m.waiting;
    $("swapped").textContent = m.swapped;
    $("kv-usage").textContent = (100 * m.kv.usage).toFixed(1) + "%";
    $("step").textContent = m.step;
    const c = view.counts;
    $("block-summary").textContent = `${m.num_blocks} blocks of ${m.block_size} tokens: ` +
      `${c.in_use} in use (${c.shared} shared, ${c.hit} prefix hits), ${c.cached} cached, ` +
      `${c.free} free`;
    const canvas = $("blockmap");
    canvas.dataset.step = m.step;
    canvas.dataset.inUse = c.in_use;
    drawBlockMap();
    renderRequests();
    CHARTS.forEach(drawChart);
    if (view.pinned !== null) showDetail(view.pinned);
  }

  // ---- the block map -----------------------------------------------------------------------
  function buildLegend() {
    for (const [name, color] of Object.entries(STATE_COLORS)) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = color;
      item.append(swatch, STATE_LABELS[name]);
      $("legend").append(item);
    }
  }

  function layoutFor(count, width) {
    const maxHeight = Math.max(160, Math.min(520, window.innerHeight * 0.5));
    let cell = Math.max(2, Math.min(28, Math.floor(Math.sqrt(width * maxHeight / count))));
    while (cell > 2 && Math.ceil(count / Math.floor(width / cell)) * cell > maxHeight) cell -= 1;
    const cols = Math.max(1, Math.floor(width / cell));
    return {cell, cols, rows: Math.ceil(count / cols)};
  }

  function drawBlockMap() {
    const canvas = $("blockmap");
    const width = canvas.clientWidth || 600;
    const layout = layoutFor(Math.max(1, view.states.length), width);
    view.layout = layout;
    const ratio = window.devicePixelRatio || 1;
    const height = layout.rows * layout.cell;
    canvas.style.height = height + "px";
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const gap = layout.cell >= 6 ? 1 : 0;
    const size = layout.cell - gap;
    view.stateNames.forEach((name, code) => {  // one fill colour at a time
      ctx.fillStyle = STATE_COLORS[name] || "#000";
      for (let b = 0; b < view.states.length; b++) {
        if (view.states[b] !== code) continue;
        ctx.fillRect((b % layout.cols) * layout.cell, Math.floor(b / layout.cols) * layout.cell,
                     size, size);
      }
    });
    outlineBlocks(ctx, highlightedBlocks(), layout, size);
  }

  function highlightedBlocks() {
    const requestId = view.highlight || ownerOf(view.pinned) || ownerOf(view.hover);
    if (requestId && view.requests.has(requestId)) return view.requests.get(requestId).blockIds;
    return view.pinned !== null ? [view.pinned] : [];
  }

  function ownerOf(block) {
    const owners = block === null ? null : view.owners.get(block);
    return owners && owners.length === 1 ? owners[0] : null;
  }

  function outlineBlocks(ctx, blocks, layout, size) {
    if (!blocks.length) return;
    ctx.strokeStyle = "#202124";
    ctx.lineWidth = layout.cell >= 6 ? 1.5 : 1;
    for (const b of blocks) {
      ctx.strokeRect((b % layout.cols) * layout.cell + 0.5,
                     Math.floor(b / layout.cols) * layout.cell + 0.5, size - 1, size - 1);
    }
  }

  function blockAt(event) {
    const rect = $("blockmap").getBoundingClientRect();
    const {cell, cols} = view.layout;
    const col = Math.floor((event.clientX - rect.left) / cell);
    const row = Math.floor((event.clientY - rect.top) / cell);
    const block = row * cols + col;
    return col < cols && block >= 0 && block < view.states.length ? block : null;
  }

  function hashHex(block) {
    const bytes = view.hashes.subarray(block * 4, block * 4 + 4);
    if (bytes.every((b) => b === 0)) return "none";
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function describe(block) {
    const owners = view.owners.get(block) || [];
    const state = view.stateNames[view.states[block]];
    const shown = owners.slice(0, 6).join("\n         ");
    const more = owners.length > 6 ? `\n         and ${owners.length - 6} more` : "";
    return `block  ${block}: ${STATE_LABELS[state] || state}\n` +
      `hash   ${hashHex(block)}\nowners ${owners.length ? shown + more : "none"}`;
  }

  function showDetail(block) {
    $("block-detail").textContent = block < view.states.length ? describe(block) : "";
  }

  function setupBlockMap() {
    const canvas = $("blockmap");
    const tooltip = $("tooltip");
    canvas.addEventListener("mousemove", (event) => {
      const block = blockAt(event);
      view.hover = block;
      if (block === null) {
        tooltip.hidden = true;
        return;
      }
      tooltip.textContent = describe(block);
      tooltip.hidden = false;
      const wrap = $("blockmap-wrap").getBoundingClientRect();
      tooltip.style.left = Math.min(event.clientX - wrap.left + 12, wrap.width - 220) + "px";
      tooltip.style.top = (event.clientY - wrap.top + 12) + "px";
      if (view.message) drawBlockMap();
    });
    canvas.addEventListener("mouseleave", () => {
      view.hover = null;
      tooltip.hidden = true;
      if (view.message) drawBlockMap();
    });
    canvas.addEventListener("click", (event) => {
      const block = blockAt(event);
      view.pinned = block === view.pinned ? null : block;
      if (view.pinned !== null) showDetail(view.pinned);
      if (view.message) drawBlockMap();
    });
  }

  // ---- the requests --------------------------------------------------------------------------
  function formatAge(seconds) {
    return seconds < 60 ? seconds.toFixed(1) + " s" : Math.floor(seconds / 60) + " min " +
      Math.round(seconds % 60) + " s";
  }

  function requestRow(request, finishedAt) {
    const finished = finishedAt !== null;
    const row = document.createElement("tr");
    row.dataset.requestId = request.id;
    if (finished) {  // fades from the moment it ended, whatever the rows drawn in between
      row.className = "finished";
      row.style.opacity = String(1 - 0.8 * Math.min(1, (Date.now() - finishedAt) / FADE_MS));
    }
    const computed = Math.min(request.computed, request.prompt);
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * computed / Math.max(1, request.prompt)).toFixed(1) + "%";
    bar.append(fill);
    const state = finished ? "finished" : request.state;
    const cells = [request.id, state, null, String(request.output), formatAge(request.age),
                   String(request.blockIds.length)];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      if (i === 0) cell.className = "id";
      if (i === 1) cell.className = "state-" + state;
      if (i === 2) {
        cell.append(bar, `${computed} / ${request.prompt}`);
        if (request.cached) cell.title = `${request.cached} prompt tokens from the prefix cache`;
      } else {
        cell.textContent = text;
      }
      if (i === 0) cell.title = request.id;
      row.append(cell);
    });
    row.addEventListener("mouseenter", () => { view.highlight = request.id; drawBlockMap(); });
    row.addEventListener("mouseleave", () => { view.highlight = null; drawBlockMap(); });
    return row;
  }

  function renderRequests() {
    const body = document.querySelector("#requests tbody");
    const rows = [...view.requests.values()].map((r) => requestRow(r, null));
    for (const {request, at} of view.finished.values()) rows.push(requestRow(request, at));
    body.replaceChildren(...rows);
    const m = view.message;
    const listed = m.requests.length < m.num_requests ? ` (first ${m.requests.length} listed)` : "";
    $("request-summary").textContent = `${m.running} running, ${m.waiting} waiting, ` +
      `${m.swapped} swapped${listed}`;
  }

  // ---- the charts ------------------------------------------------------------------------------
  function setupCharts() {
    for (const chart of CHARTS) {
      chart.canvas = document.createElement("canvas");
      chart.canvas.setAttribute("aria-label", chart.title);
      $("charts").append(chart.canvas);
    }
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  function formatValue(value, chart) {
    if (value === null || value === undefined) return "-";
    if (chart.percent) return (100 * value).toFixed(1) + "%";
    if (chart.integer) return String(Math.round(value));
    const v = value * (chart.scale || 1);
    return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function drawChart(chart) {
    const canvas = chart.canvas;
    const width = canvas.clientWidth || 300;
    const height = canvas.clientHeight || 128;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const points = view.history;
    const scale = chart.percent ? 1 : (chart.scale || 1);
    let top = chart.percent ? 1 : 0;
    for (const p of points) {
      for (const [key] of chart.series) {
        if (p[key] !== null && p[key] !== undefined) top = Math.max(top, p[key] * scale);
      }
    }
    top = chart.percent ? 1 : niceMax(top);
    if (chart.integer) top = Math.max(2, Math.ceil(top / 2) * 2);  // whole-number grid lines
    const plot = {left: 44, right: width - 6, top: 20, bottom: height - 16};
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#5f6368";
    ctx.strokeStyle = "#e0e0e0";
    ctx.lineWidth = 1;
    for (const f of [0, 0.5, 1]) {  // grid lines and their labels
      const y = Math.round(plot.bottom - f * (plot.bottom - plot.top)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(plot.left, y);
      ctx.lineTo(plot.right, y);
      ctx.stroke();
      const label = chart.percent ? Math.round(100 * f) + "%" : formatValue(f * top / scale, chart);
      ctx.textAlign = "right";
      ctx.fillText(label, plot.left - 4, y + 4);
    }
    ctx.textAlign = "left";
    ctx.fillText(`-${WINDOW_S / 60} min`, plot.left, height - 3);
    ctx.textAlign = "right";
    ctx.fillText("now", plot.right, height - 3);
    const now = points.length ? points[points.length - 1].t : 0;
    const x = (t) => plot.right - (now - t) / WINDOW_S * (plot.right - plot.left);
    const y = (v) => plot.bottom - Math.min(1, v * scale / top) * (plot.bottom - plot.top);
    let legendX = plot.left;
    ctx.textAlign = "left";
    ctx.fillStyle = "#202124";
    ctx.font = "600 11px system-ui, sans-serif";
    ctx.fillText(chart.title, 0, 11);
    legendX = Math.max(legendX, ctx.measureText(chart.title).width + 12);
    ctx.font = "11px system-ui, sans-serif";
    for (const [key, label, color] of chart.series) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let drawing = false;
      for (const p of points) {
        const v = p[key];
        if (v === null || v === undefined) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(p.t), y(v)); else ctx.moveTo(x(p.t), y(v));
        drawing = true;
      }
      ctx.stroke();
      const known = points.filter((p) => p[key] !== null && p[key] !== undefined);
      const last = known.length ? known[known.length - 1][key] : null;  // the latest it said
      const text = `${label} ${formatValue(last, chart)}`;
      ctx.fillStyle = color;
      ctx.fillText(text, legendX, 11);
      legendX += ctx.measureText(text).width + 10;
    }
  }

  // ---- for tests and for a curious console: what the page shows now ------------------------------
  window.pagedllmDashboard = {
    get updates() { return view.updates; },
    get step() { return view.message ? view.message.step : null; },
    get counts() { return {...view.counts}; },
    get running() { return view.message ? view.message.running : null; },
    statesOf(requestId) {
      const request = view.requests.get(requestId);
      return request ? request.blockIds.map((b) => view.stateNames[view.states[b]]) : null;
    },
    blocksOf(requestId) {
      const request = view.requests.get(requestId);
      return request ? request.blockIds : null;
    },
    cellCenter(block) {  // in CSS pixels from the block map's top left corner
      const {cell, cols} = view.layout;
      return [(block % cols) * cell + cell / 2, Math.floor(block / cols) * cell + cell / 2];
    },
    ownersOf(block) { return view.owners.get(block) || []; },
    requestIds() { return [...view.requests.keys()]; },
  };

  buildLegend();
  setupBlockMap();
  setupCharts();
  window.addEventListener("resize", () => { if (view.message) render(); });
  connect();
})();
