// Shared by the desk and the wallboard: one WebSocket to the daemon, authenticated by the first
// message, reconnected with capped, jittered back-off; and a tiny DOM helper (text only, never
// HTML from data).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(r)}` : `${m}:${two(r)}`;
}

export function clock(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  return d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

// The daemon's clock minus ours, so countdowns to engine times are right on a skewed laptop.
let offset = 0;
export function serverNow() { return Date.now() / 1000 + offset; }
export function syncClock(serverTime) {
  if (typeof serverTime === "number") offset = serverTime - Date.now() / 1000;
}

export class Connection {
  constructor(path, token, { onMessage, onStatus, onFinal }) {
    this.path = path;
    this.token = token;
    this.onMessage = onMessage;
    this.onStatus = onStatus || (() => {});
    this.onFinal = onFinal || (() => {});
    this.attempt = 0;
    this.stopped = false;
    this.ws = null;
    this.seq = 0;
    this.open();
  }

  open() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${this.path}`);
    this.ws = ws;
    this.onStatus("connecting");
    ws.addEventListener("open", () => {
      ws.send(JSON.stringify({ op: "auth", token: this.token }));
    });
    ws.addEventListener("message", (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch { return; }
      if (msg.type === "hello") { this.attempt = 0; this.onStatus("live"); }
      if (msg.type === "error" && ["unauthorized", "forbidden", "unknown_agent"].includes(msg.error)) {
        this.stopped = true;
        this.onFinal(msg);
      }
      this.onMessage(msg);
    });
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return;
      // Stopped: signed out, or a refusal that a retry would not change (bad token, role).
      if (this.stopped) { this.onStatus("closed"); return; }
      this.onStatus("reconnecting");
      // Capped, jittered exponential back-off: 0.5 s, 1 s, 2 s ... at most 10 s.
      const base = Math.min(10, 0.5 * 2 ** this.attempt++);
      setTimeout(() => { if (!this.stopped) this.open(); }, (base / 2 + Math.random() * base / 2) * 1000);
    });
  }

  send(command) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return null;
    const ref = `r${++this.seq}`;
    this.ws.send(JSON.stringify({ ...command, ref }));
    return ref;
  }

  close() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
  }
}
