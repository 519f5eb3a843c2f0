// The dashboard's monitoring views: the server's rules (list, add, delete) and the alert
// timeline with thumbnails, paged back through stored history. Talks to /api with the same
// token as the WebSocket (sessionStorage "streamer-token", set by app.js).

const $ = (id) => document.getElementById(id);
const PAGE = 20;
let cursor = null; // the id the next older page starts before
let newest = null; // the newest alert id shown

function headers() {
  const token = sessionStorage.getItem("streamer-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const err = body && body.error ? `${body.error.field}: ${body.error.message}` : `HTTP ${response.status}`;
    throw new Error(err);
  }
  return body;
}

function say(text, bad = false) {
  const out = $("rule-status");
  out.textContent = text;
  out.className = bad ? "error" : "muted";
}

function condition(rule) {
  const a = rule.alert_if;
  if (!a) return "never alerts";
  if (a.yes) return "alert if yes";
  if (a.regex) return `alert if /${a.regex}/`;
  return `alert if “${a.contains}”`;
}

async function loadRules() {
  let body;
  try {
    body = await api("/api/rules");
  } catch (err) {
    say(`rules: ${err.message}`, true);
    return;
  }
  const list = $("rules");
  list.replaceChildren();
  for (const rule of body.rules) {
    const li = document.createElement("li");
    const skipped = Object.entries(rule.skipped || {}).map(([k, v]) => `${v} ${k}`).join(", ");
    li.textContent =
      `${rule.name} · ${rule.stream} · every ${rule.every_s} s · “${rule.question}” · ${condition(rule)}` +
      ` · ${rule.rounds} rounds, ${rule.alerts} alerts${skipped ? `, skipped ${skipped}` : ""}`;
    if (!rule.read_only) {
      const del = document.createElement("button");
      del.type = "button";
      del.textContent = "Delete";
      del.addEventListener("click", async () => {
        try {
          await api(`/api/rules/${encodeURIComponent(rule.name)}`, { method: "DELETE" });
          say(`deleted ${rule.name}`);
        } catch (err) {
          say(err.message, true);
        }
        loadRules();
      });
      li.append(" ", del);
    } else {
      li.append(" (config file)");
    }
    list.append(li);
  }
}

async function addRule(event) {
  event.preventDefault();
  const kind = $("rule-alert-kind").value;
  const value = $("rule-alert").value;
  const rule = {
    name: $("rule-name").value,
    stream: $("rule-stream").value,
    question: $("rule-question").value,
    every_s: Number($("rule-every").value),
    cooldown_s: Number($("rule-cooldown").value || 0),
  };
  if (kind === "yes") rule.alert_if = { yes: true };
  else if (value) rule.alert_if = { [kind]: value };
  try {
    await api("/api/rules", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule) });
    say(`added ${rule.name}`);
    $("rule-form").reset();
  } catch (err) {
    say(err.message, true);
  }
  loadRules();
}

async function thumbnail(path) {
  const img = document.createElement("img");
  img.alt = "the newest frame the alert used";
  img.className = "thumb";
  try {
    const response = await fetch(path, { headers: headers() });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
  } catch {
    // the timeline still shows the text
  }
  return img;
}

async function alertItem(e) {
  const li = document.createElement("li");
  li.dataset.id = e.id;
  const when = new Date(e.time * 1000).toLocaleString();
  const text = document.createElement("span");
  text.textContent = `${when} · ${e.stream} · ${e.rule}: ${e.text}`;
  if (e.thumbnail) li.append(await thumbnail(e.thumbnail));
  li.append(text);
  return li;
}

async function loadAlerts(older) {
  const query = new URLSearchParams({ kind: "alert", limit: String(PAGE) });
  if (older && cursor) query.set("before", cursor);
  let page;
  try {
    page = await api(`/api/events?${query}`);
  } catch (err) {
    $("timeline-status").textContent = `alerts: ${err.message}`;
    return;
  }
  const list = $("timeline");
  if (!older) {
    // Newer alerts since the last look go on top.
    const fresh = [];
    for (const e of page.events) {
      if (e.id === newest) break;
      fresh.push(e);
    }
    if (newest === null) cursor = page.next;
    for (const e of fresh.reverse()) list.prepend(await alertItem(e));
    if (page.events.length) newest = page.events[0].id;
  } else {
    for (const e of page.events) list.append(await alertItem(e));
    cursor = page.next;
  }
  $("timeline-older").disabled = cursor === null;
  $("timeline-status").textContent = list.children.length ? "" : "No alerts stored yet.";
}

$("rule-form").addEventListener("submit", addRule);
$("timeline-older").addEventListener("click", () => loadAlerts(true));
loadRules();
loadAlerts(false);
setInterval(() => {
  loadAlerts(false);
  loadRules();
}, 5000);
