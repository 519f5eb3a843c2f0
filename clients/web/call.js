// streamer call page: the customer's side. Publishes the camera over WHIP (RFC 9725) at
// /whip/{stream}, or, where WebRTC cannot connect, as JPEG frames over the WebSocket
// ("publish", docs/protocol-extensions.md). No build step.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const STREAM = params.get("stream") || "call";
const FORCE_WEBSOCKET = params.get("transport") === "websocket";
const WS_FPS = 5; // JPEG frames a second on the fallback
const CONNECT_TIMEOUT_MS = 15000;

const call = {
  token: sessionStorage.getItem("streamer-token") || "",
  media: null, // the camera's MediaStream
  transport: null, // "whip" | "websocket"
  pc: null,
  location: null, // the WHIP session's URL
  ws: null,
  timer: null,
  ended: false,
};

function setState(text, cls) {
  const pill = $("state");
  pill.textContent = text;
  pill.className = `pill ${cls}`;
  pill.dataset.state = cls;
}

function banner(text, cls = "") {
  const b = $("banner");
  b.textContent = text;
  b.className = `banner ${cls}`;
  b.hidden = !text;
}

function authHeaders() {
  return call.token ? { Authorization: `Bearer ${call.token}` } : {};
}

class Unauthorized extends Error {}
class Refused extends Error {} // a clear refusal: another transport would be refused too

// ---------------------------------------------------------------- WHIP

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // send what was gathered so far
  });
}

function connected(pc, timeoutMs) {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (pc.connectionState === "connected") resolve();
      else if (pc.connectionState === "failed" || pc.connectionState === "closed") reject(new Error(`WebRTC ${pc.connectionState}`));
    };
    pc.addEventListener("connectionstatechange", check);
    setTimeout(() => reject(new Error("WebRTC did not connect in time")), timeoutMs);
    check();
  });
}

async function publishWhip() {
  const pc = new RTCPeerConnection();
  call.pc = pc;
  for (const track of call.media.getVideoTracks()) pc.addTransceiver(track, { direction: "sendonly" });
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 3000); // no trickle: the offer carries the candidates
  const response = await fetch(`/whip/${encodeURIComponent(STREAM)}`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...authHeaders() },
    body: pc.localDescription.sdp,
  });
  const body = await response.text();
  if (response.status === 401) throw new Unauthorized(body);
  if ([400, 403, 409, 503].includes(response.status)) throw new Refused(body.trim());
  if (response.status !== 201) throw new Error(`WHIP answered ${response.status}: ${body.trim()}`);
  call.location = new URL(response.headers.get("Location"), location.href).href;
  await pc.setRemoteDescription({ type: "answer", sdp: body });
  pc.addEventListener("connectionstatechange", () => {
    if (call.ended || call.transport !== "whip") return;
    const s = pc.connectionState;
    if (s === "connected") setState("live", "live");
    else if (s === "disconnected") setState("reconnecting…", "connecting");
    else if (s === "failed" || s === "closed") { setState("call lost", "down"); hangUp(false); }
  });
  await connected(pc, CONNECT_TIMEOUT_MS);
}

async function endWhip(tellServer) {
  const { pc, location: url } = call;
  call.pc = null;
  call.location = null;
  if (url && tellServer) {
    try { await fetch(url, { method: "DELETE", headers: authHeaders(), keepalive: true }); } catch { /* gone anyway */ }
  }
  if (pc) pc.close();
}

// ---------------------------------------------------------------- WebSocket fallback

function publishWebSocket() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    call.ws = ws;
    let open = false;
    ws.addEventListener("open", () => {
      ws.send(JSON.stringify({ type: "hello", client: "streamer-call", ...(call.token ? { token: call.token } : {}) }));
    });
    ws.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return; // previews: none asked for
      const msg = JSON.parse(event.data);
      if (msg.type === "welcome") ws.send(JSON.stringify({ type: "publish", stream: STREAM, fps: WS_FPS }));
      else if (msg.type === "publishing" && msg.state === "open") { open = true; sendFrames(ws, msg.max_side); resolve(); }
      else if (msg.type === "publishing" && msg.state === "closed") { setState(`ended (${msg.reason})`, "down"); hangUp(false); }
      else if (msg.type === "error" && msg.code === "unauthorized") reject(new Unauthorized(msg.message));
      else if (msg.type === "error" && !open) reject(new Refused(msg.message));
      else if (msg.type === "error") banner(msg.message, "error");
    });
    ws.addEventListener("close", () => {
      if (!open) reject(new Error("the WebSocket closed"));
      else if (!call.ended) { setState("call lost", "down"); hangUp(false); }
    });
  });
}

function sendFrames(ws, maxSide) {
  const video = $("self-view");
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d");
  call.timer = setInterval(() => {
    if (ws.readyState !== WebSocket.OPEN || !video.videoWidth) return;
    if (ws.bufferedAmount > 1_000_000) return; // a slow link: skip frames rather than queue them
    const scale = Math.min(1, maxSide / Math.max(video.videoWidth, video.videoHeight));
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    ctx.drawImage(video, 0, 0, canvas.width, canvas.height);
    canvas.toBlob((blob) => { if (blob && ws.readyState === WebSocket.OPEN) ws.send(blob); }, "image/jpeg", 0.8);
  }, 1000 / WS_FPS);
  setState("live", "live");
}

function endWebSocket(tellServer) {
  clearInterval(call.timer);
  call.timer = null;
  const ws = call.ws;
  call.ws = null;
  if (ws && ws.readyState === WebSocket.OPEN) {
    if (tellServer) ws.send(JSON.stringify({ type: "unpublish" }));
    ws.close(1000);
  }
}

// ---------------------------------------------------------------- the call

async function start() {
  call.ended = false;
  banner("");
  $("token-form").hidden = true;
  setState("publishing…", "connecting");
  try {
    if (!FORCE_WEBSOCKET) {
      try {
        call.transport = "whip";
        $("transport").textContent = "WebRTC (WHIP)";
        await publishWhip();
      } catch (err) {
        if (err instanceof Unauthorized || err instanceof Refused) throw err;
        await endWhip(true);
        banner(`WebRTC failed (${err.message}); sending JPEG frames over the WebSocket instead.`);
        call.transport = null;
      }
    }
    if (!call.transport || FORCE_WEBSOCKET) {
      call.transport = "websocket";
      $("transport").textContent = "WebSocket (JPEG)";
      await publishWebSocket();
    }
    setState("live", "live");
    $("hangup").disabled = false;
  } catch (err) {
    await teardown(true);
    if (err instanceof Unauthorized) {
      sessionStorage.removeItem("streamer-token");
      call.token = "";
      setState("needs a token", "down");
      $("token-form").hidden = false;
      $("token-input").focus();
    } else {
      setState("not connected", "down");
      banner(`Could not publish: ${err.message}`, "error");
    }
  }
}

async function teardown(tellServer) {
  if (call.transport === "whip" || call.pc) await endWhip(tellServer);
  if (call.transport === "websocket" || call.ws) endWebSocket(tellServer);
  call.transport = null;
}

async function hangUp(tellServer = true) {
  if (call.ended) return;
  call.ended = true;
  $("hangup").disabled = true;
  await teardown(tellServer);
  if (call.media) for (const track of call.media.getTracks()) track.stop();
  $("self-view").srcObject = null;
  if ($("state").dataset.state === "live" || tellServer) setState("ended", "down");
}

async function main() {
  $("stream-name").textContent = `· ${STREAM}`;
  $("hangup").addEventListener("click", () => hangUp(true));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    call.token = $("token-input").value.trim();
    sessionStorage.setItem("streamer-token", call.token);
    start();
  });
  window.addEventListener("pagehide", () => { if (!call.ended) hangUp(true); });
  try {
    setState("asking for the camera…", "connecting");
    call.media = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 }, height: { ideal: 720 } }, audio: false });
  } catch (err) {
    setState("no camera", "down");
    banner(`The camera is not available: ${err.message}`, "error");
    return;
  }
  $("self-view").srcObject = call.media;
  const track = call.media.getVideoTracks()[0];
  const settings = track ? track.getSettings() : {};
  $("info").textContent = `${settings.width || "?"}×${settings.height || "?"} · ${track ? track.label : ""}`;
  await start();
}

main();
