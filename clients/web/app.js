// streamer dashboard: speaks only the wire protocol (docs/PROTOCOL.md), no build step.

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};

const state = {
  ws: null,
  connected: false,
  authFailed: false,
  attempt: 0,
  reconnectTimer: null,
  token: sessionStorage.getItem("streamer-token") || "",
  streams: new Map(),
  selected: localStorage.getItem("streamer-stream") || null,
  counter: 0,
  asks: new Map(), // id -> {entry, answerEl, metaEl, text}
  currentAsk: null,
  watches: new Map(), // id -> {question, every_s, alert, stream, rounds, el}
  preview: { header: null, url: null, arrivals: [] },
};

// ---------------------------------------------------------------- connection

function wsUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

function setConnection(text, cls) {
  const pill = $("connection");
  pill.textContent = text;
  pill.className = `pill ${cls}`;
}

function banner(text, cls = "") {
  const b = $("banner");
  b.textContent = text;
  b.className = `banner ${cls}`;
  b.hidden = !text;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  setConnection(state.attempt ? "reconnecting…" : "connecting…", "connecting");
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "blob";
  state.ws = ws;
  ws.addEventListener("open", () => {
    // Always greet: with a token when we have one. A server without tokens welcomes anyway.
    send({ type: "hello", client: "streamer-dashboard", ...(state.token ? { token: state.token } : {}) });
  });
  ws.addEventListener("message", (event) => onMessage(event.data));
  ws.addEventListener("close", (event) => onClose(event));
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(message));
    return true;
  }
  return false;
}

function onClose(event) {
  const wasConnected = state.connected;
  state.connected = false;
  state.ws = null;
  setConnection("disconnected", "disconnected");
  failOpenAsks("the connection to the server was lost");
  if (state.authFailed) return; // wait for a token
  state.attempt += 1;
  const delay = Math.min(10, 0.5 * 2 ** Math.min(state.attempt - 1, 5)) * (0.8 + Math.random() * 0.4);
  const why = wasConnected ? "Lost the connection to the server" : "Cannot reach the server";
  banner(`${why} (code ${event.code}). Reconnecting in ${delay.toFixed(1)} s (attempt ${state.attempt})…`);
  state.reconnectTimer = setTimeout(connect, delay * 1000);
}

function onWelcome(msg) {
  const first = !state.connected;
  state.connected = true;
  state.authFailed = false;
  $("token-form").hidden = true;
  if (first && state.attempt > 0) banner("Reconnected.");
  else if (first) banner("");
  state.attempt = 0;
  setConnection("connected", "connected");
  const note = msg.model && msg.model.note;
  $("model-note").hidden = !note;
  $("model-note").textContent = note ? `⚠ ${note}` : "";
  state.streams = new Map(msg.streams.map((s) => [s.id, s]));
  if (!state.selected || !state.streams.has(state.selected)) state.selected = msg.streams[0] ? msg.streams[0].id : null;
  renderStreams();
  if (first) {
    selectStream(state.selected);
    for (const [id, w] of state.watches) sendWatch(id, w); // standing questions survive reconnects
  }
}

// ---------------------------------------------------------------- messages

function onMessage(data) {
  if (typeof data !== "string") return onPreviewImage(data);
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    return;
  }
  switch (msg.type) {
    case "welcome": return onWelcome(msg);
    case "stream_status": return onStreamStatus(msg);
    case "preview": state.preview.header = msg; return;
    case "accepted": return onAccepted(msg);
    case "token": return onToken(msg);
    case "answer": return msg.watch ? onWatchAnswer(msg) : onAnswer(msg);
    case "alert": return onAlert(msg);
    case "error": return onError(msg);
    default: return;
  }
}

function onError(msg) {
  if (msg.code === "unauthorized") {
    const hadToken = Boolean(state.token);
    state.authFailed = true;
    sessionStorage.removeItem("streamer-token");
    state.token = "";
    banner(hadToken ? "The token was refused." : "This server needs an access token.");
    $("token-form").hidden = false;
    $("token-input").focus();
    return;
  }
  if (msg.id && state.asks.has(msg.id)) return finishAsk(msg.id, null, msg);
  if (msg.id && state.watches.has(msg.id)) {
    const w = state.watches.get(msg.id);
    if (msg.watch) {
      w.statusEl.textContent = `round failed: ${msg.code}: ${msg.message}`;
    } else if (msg.code !== "shutting_down") {
      // The watch has ended on the server (cancelled, unknown stream…).
      w.el.remove();
      state.watches.delete(msg.id);
    }
    return;
  }
  banner(`${msg.code}: ${msg.message}`);
}

// ---------------------------------------------------------------- streams and previews

function renderStreams() {
  const list = $("streams");
  list.replaceChildren();
  for (const s of state.streams.values()) {
    const button = el("button", { type: "button", onclick: () => selectStream(s.id) },
      el("span", { textContent: s.name }),
      el("span", { className: `pill ${s.status}`, textContent: s.status, title: s.error || "" }));
    button.setAttribute("aria-pressed", String(s.id === state.selected));
    button.dataset.stream = s.id;
    list.append(el("li", {}, button));
  }
}

function selectStream(id) {
  if (!id) return;
  if (state.selected && state.selected !== id) send({ type: "subscribe", stream: state.selected, preview_fps: 0 });
  state.selected = id;
  localStorage.setItem("streamer-stream", id);
  $("preview-stream").textContent = `· ${id}`;
  state.preview.arrivals = [];
  send({ type: "subscribe", stream: id, preview_fps: 2, max_width: 640 });
  renderStreams();
}

function onStreamStatus(msg) {
  // Published streams (calls) come and go while connected: learn them, and forget removed ones.
  if (msg.status === "down" && msg.error === "removed") {
    if (state.streams.delete(msg.stream) && state.selected === msg.stream) {
      state.selected = null;
      selectStream(state.streams.keys().next().value);
    }
    return renderStreams();
  }
  if (!state.streams.has(msg.stream)) state.streams.set(msg.stream, { id: msg.stream, name: msg.stream });
  const s = state.streams.get(msg.stream);
  Object.assign(s, { status: msg.status, fps_in: msg.fps_in, fps_sampled: msg.fps_sampled, error: msg.error || null });
  renderStreams();
}

function onPreviewImage(blob) {
  const header = state.preview.header;
  state.preview.header = null;
  if (!header || header.stream !== state.selected) return;
  const img = $("preview");
  const url = URL.createObjectURL(blob);
  img.onload = () => { if (state.preview.url && state.preview.url !== url) URL.revokeObjectURL(state.preview.url); state.preview.url = url; };
  img.src = url;
  img.dataset.seq = String(header.seq);
  img.hidden = false;
  $("preview-empty").hidden = true;
  const now = Date.now() / 1000;
  const arrivals = state.preview.arrivals;
  arrivals.push(now);
  while (arrivals.length > 10) arrivals.shift();
  const fps = arrivals.length > 1 ? (arrivals.length - 1) / (arrivals[arrivals.length - 1] - arrivals[0]) : 0;
  const s = state.streams.get(header.stream) || {};
  $("preview-info").textContent =
    `frame ${header.seq} · ${header.width}×${header.height} · preview ${fps.toFixed(1)} fps · ` +
    `camera ${Number(s.fps_in || 0).toFixed(1)} fps · latency ${Math.max(0, now - header.ts).toFixed(2)} s`;
}

// ---------------------------------------------------------------- asking

function nextId(prefix) {
  state.counter += 1;
  return `${prefix}${Date.now().toString(36)}-${state.counter}`;
}

function ask(question) {
  if (!state.selected) return banner("No stream to ask about.");
  const id = nextId("q");
  const answerEl = el("div", { className: "a pending" });
  const metaEl = el("div", { className: "meta", textContent: "sent…" });
  const entry = el("li", { className: "ask" }, el("div", { className: "q", textContent: question }), answerEl, metaEl);
  entry.dataset.id = id;
  $("history").prepend(entry);
  state.asks.set(id, { entry, answerEl, metaEl, text: "" });
  state.currentAsk = id;
  $("cancel-button").disabled = false;
  if (!send({ type: "ask", id, stream: state.selected, question })) finishAsk(id, null, { code: "disconnected", message: "not connected to the server" });
}

function onAccepted(msg) {
  const a = state.asks.get(msg.id);
  if (a) a.metaEl.textContent = msg.position ? `queued (${msg.position} ahead)` : "answering…";
}

function onToken(msg) {
  const a = state.asks.get(msg.id);
  if (a) {
    a.text += msg.text;
    a.answerEl.textContent = a.text;
    return;
  }
  const w = state.watches.get(msg.id);
  if (w) w.partial = (w.partial || "") + msg.text;
}

const clock = (ts) => new Date(ts * 1000).toLocaleTimeString();
const ms = (v) => (v == null ? "–" : v < 10000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(1)} s`);

function describeFrames(f) {
  return `frames ${f.first_seq}–${f.last_seq} (${f.count}, ${clock(f.first_ts)}–${clock(f.last_ts)})`;
}

function onAnswer(msg) {
  finishAsk(msg.id, msg, null);
}

function finishAsk(id, answer, error) {
  const a = state.asks.get(id);
  if (!a) return;
  state.asks.delete(id);
  a.answerEl.classList.remove("pending");
  if (answer) {
    a.answerEl.textContent = answer.text;
    a.entry.dataset.final = answer.text;
    const t = answer.timings;
    a.metaEl.textContent =
      `${describeFrames(answer.frames)} · queued ${ms(t.queued_ms)} · first token ${ms(t.first_token_ms)} · total ${ms(t.total_ms)}`;
  } else {
    a.metaEl.textContent = `${error.code}: ${error.message}`;
    a.metaEl.classList.add("err");
    a.entry.dataset.error = error.code;
  }
  if (state.currentAsk === id) {
    state.currentAsk = null;
    $("cancel-button").disabled = true;
  }
}

function failOpenAsks(reason) {
  for (const id of [...state.asks.keys()]) finishAsk(id, null, { code: "disconnected", message: reason });
}

function cancelCurrent() {
  if (state.currentAsk) send({ type: "cancel", id: state.currentAsk });
}

// ---------------------------------------------------------------- standing questions

function sendWatch(id, w) {
  const msg = { type: "watch", id, stream: w.stream, question: w.question, every_s: w.every_s };
  if (w.alert) msg.alert_if = { contains: w.alert };
  send(msg);
}

function addWatch(question, everyS, alertText) {
  if (!state.selected) return banner("No stream to watch.");
  const id = nextId("w");
  const statusEl = el("div", { className: "meta", textContent: "waiting for the first round…" });
  const lastEl = el("div", { className: "a" });
  const cancel = el("button", { type: "button", textContent: "Cancel", onclick: () => cancelWatch(id) });
  const item = el("li", {},
    el("div", { className: "q", textContent: `${question} · every ${everyS} s on ${state.selected}` +
      (alertText ? ` · alert on “${alertText}”` : "") }),
    lastEl, statusEl, cancel);
  item.dataset.id = id;
  $("watches").append(item);
  const w = { question, every_s: everyS, alert: alertText, stream: state.selected, rounds: 0, el: item, statusEl, lastEl };
  state.watches.set(id, w);
  sendWatch(id, w);
}

function cancelWatch(id) {
  const w = state.watches.get(id);
  if (!w) return;
  send({ type: "cancel", id });
  w.el.remove();
  state.watches.delete(id);
}

function onWatchAnswer(msg) {
  const w = state.watches.get(msg.id);
  if (!w) return;
  w.rounds += 1;
  w.partial = "";
  w.lastEl.textContent = msg.text;
  w.statusEl.textContent = `round ${w.rounds} · ${describeFrames(msg.frames)} · total ${ms(msg.timings.total_ms)}`;
  w.el.dataset.rounds = String(w.rounds);
}

function onAlert(msg) {
  const w = state.watches.get(msg.id);
  const question = w ? w.question : msg.id;
  const text = `ALERT on ${msg.stream}: “${msg.matched}” — ${question} → ${msg.text}`;
  banner(text, "alert");
  $("alerts").prepend(el("li", { textContent: `${clock(msg.frames.last_ts)} ${text}` }));
  if ($("watch-sound").checked) beep();
  if ($("watch-notify").checked && "Notification" in window && Notification.permission === "granted") {
    new Notification("streamer alert", { body: text });
  }
}

function beep() {
  try {
    const ctx = new AudioContext();
    const osc = ctx.createOscillator();
    osc.frequency.value = 880;
    osc.connect(ctx.destination);
    osc.start();
    osc.stop(ctx.currentTime + 0.2);
  } catch {
    // no audio device: the visible alert is enough
  }
}

// ---------------------------------------------------------------- wiring

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("question").value.trim();
  if (!q) return;
  ask(q);
  $("question").value = "";
});

$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask-form").requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") cancelCurrent();
});

$("cancel-button").addEventListener("click", cancelCurrent);

$("watch-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("watch-question").value.trim();
  const every = Math.max(1, Number($("watch-every").value) || 5);
  if (!q) return;
  addWatch(q, every, $("watch-alert").value.trim());
  $("watch-question").value = "";
});

$("watch-notify").addEventListener("change", (event) => {
  if (event.target.checked && "Notification" in window && Notification.permission === "default") {
    Notification.requestPermission();
  }
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token-input").value;
  sessionStorage.setItem("streamer-token", state.token);
  state.authFailed = false;
  $("token-input").value = "";
  connect();
});

connect();
