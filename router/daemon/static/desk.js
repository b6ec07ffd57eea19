// The agent desktop. Everything shown comes from the daemon over /v1/desk/ws: a snapshot on
// every (re)connect, then the agent's own offers and events; commands are the agent contract's
// `op` messages. Nothing about the agent's work is kept in the page between connections.
// Replies go to POST /v1/contacts/{id}/messages with the agent's own token and an idempotency
// key; their states come from GET of the same path on every (re)connect and live over the socket.
import { Connection, clear, clock, duration, el, serverNow, syncClock } from "./common.js";

const $ = (id) => document.getElementById(id);
const CHANNEL = { phone: "Call", email: "Mail", chat: "Chat", social: "Community" };
const STATE_LABEL = {
  offline: "Offline", available: "Available", away: "Away", wrap_up: "Wrap-up",
  not_responding: "Not responding",
};

const desk = {
  conn: null,
  agent: { id: null, name: "", state: "offline", reason: null },
  awayReasons: {},
  dispositions: {},
  offers: new Map(),      // offer_id -> offer (the MQTT offer shape)
  contacts: new Map(),    // contact_id -> held contact (assigned / wrap_up)
  transcripts: new Map(), // contact_id -> messages
  replies: new Set(),     // the contact sources the daemon can answer (hello)
  outbound: new Map(),    // contact_id -> Map(key -> the daemon's status record of a reply)
  pending: new Map(),     // key -> reply not yet taken by the daemon {contact_id, text, problem}
  revs: new Map(),        // contact_id -> revision of its replies (re-renders the thread)
  cards: new Map(),       // key -> {root, parts}
  notice: "",
};

// ---- sign-in -------------------------------------------------------------------------------

function signIn(agentId, token) {
  sessionStorage.setItem("stellwerk.desk", JSON.stringify({ agentId, token }));
  desk.agent.id = agentId;
  $("signin").hidden = true;
  desk.conn = new Connection("/v1/desk/ws", token, {
    onMessage: handle,
    onStatus: (s) => { $("status").textContent = s; $("status").dataset.state = s; },
    onFinal: (msg) => signOut(msg.detail || msg.error),
  });
}

function signOut(error) {
  sessionStorage.removeItem("stellwerk.desk");
  if (desk.conn) desk.conn.close();
  desk.conn = null;
  desk.offers.clear(); desk.contacts.clear(); desk.transcripts.clear();
  desk.outbound.clear(); desk.pending.clear(); desk.revs.clear();
  for (const card of desk.cards.values()) card.root.remove();
  desk.cards.clear();
  desk.agent = { id: null, name: "", state: "offline", reason: null };
  $("signin").hidden = false;
  $("signin-error").textContent = error || "";
  render();
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("agent-id").value.trim(), $("token").value);
});

// ---- messages from the daemon ----------------------------------------------------------------

function handle(msg) {
  switch (msg.type) {
    case "hello":
      syncClock(msg.server_time);
      if (msg.agent_id !== desk.agent.id) {
        signOut(`This token belongs to another agent, not ${desk.agent.id}.`);
        return;
      }
      desk.agent.name = msg.name;
      desk.awayReasons = msg.away_reasons || {};
      desk.dispositions = msg.dispositions || {};
      desk.replies = new Set(msg.replies || []);
      break;
    case "snapshot":
      syncClock(msg.server_time);
      desk.agent.state = msg.state;
      desk.agent.reason = msg.reason;
      desk.offers = new Map(msg.offers.map((o) => [o.offer_id, o]));
      desk.contacts = new Map(msg.contacts.map((c) => [c.contact_id, c]));
      for (const id of desk.contacts.keys()) loadReplies(id);
      // Connected again: what the daemon did not take yet goes again, under the same key.
      for (const key of desk.pending.keys()) postReply(key);
      break;
    case "outbound":
      if (msg.action === "message") noteReply(msg);
      break;
    case "offer":
      desk.offers.set(msg.offer_id, msg);
      break;
    case "cancel":
      if (desk.offers.delete(msg.offer_id)) note(`Offer withdrawn (${msg.reason.replaceAll("_", " ")}).`);
      break;
    case "refused":
      note(`Refused: ${msg.reason.replaceAll("_", " ")}${msg.detail ? ` (${msg.detail})` : ""}`);
      break;
    case "error":
      note(msg.detail || msg.error);
      break;
    case "agent.state":
      desk.agent.state = msg.state;
      desk.agent.reason = msg.reason;
      break;
    case "contact.assigned": {
      for (const [id, offer] of desk.offers) {
        if (offer.contact_id !== msg.contact_id) continue;
        desk.offers.delete(id);
        desk.contacts.set(msg.contact_id, {
          ...offer, state: "assigned", assigned_at: msg.at, channel: offer.contact.channel,
        });
        loadReplies(msg.contact_id);
      }
      break;
    }
    case "contact.completed": {
      const held = desk.contacts.get(msg.contact_id);
      if (!held) break;
      if (msg.wrap_up > 0) {
        desk.contacts.set(msg.contact_id, {
          ...held, state: "wrap_up", wrap_until: msg.at + msg.wrap_up, wrap_up: msg.wrap_up,
          disposition: msg.disposition,
          ended: msg.outcome && msg.outcome.startsWith("ended:") ? msg.outcome.slice(6) : null,
        });
      } else {
        desk.contacts.delete(msg.contact_id);
      }
      if (msg.outcome === "released_by_supervisor") note("A supervisor released one of your contacts.");
      break;
    }
    case "contact.wrap_up_done":
      desk.contacts.delete(msg.contact_id);
      break;
    case "contact.abandoned":
    case "contact.answered_by_crowd":
      for (const [id, offer] of desk.offers) if (offer.contact_id === msg.contact_id) desk.offers.delete(id);
      desk.contacts.delete(msg.contact_id);
      break;
    case "transcript":
      desk.transcripts.set(msg.contact_id, msg.messages);
      break;
    default:
      return; // contact.offered, contact.updated (its transcript follows), ack ...
  }
  render();
}

let noticeTimer = null;
function note(text) {
  desk.notice = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { desk.notice = ""; render(); }, 8000);
  render();
}

// ---- commands ----------------------------------------------------------------------------

const send = (command) => desk.conn && desk.conn.send(command);

function goAvailable() {
  send(desk.agent.state === "offline" ? { op: "login" } : { op: "state", state: "available" });
}

function goAway(reason) {
  const body = { state: "away", reason };
  send(desk.agent.state === "offline" ? { op: "login", ...body } : { op: "state", ...body });
}

// ---- replies ------------------------------------------------------------------------------

const bump = (contactId) => desk.revs.set(contactId, (desk.revs.get(contactId) || 0) + 1);

function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `desk-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function authHeaders() {
  return { Authorization: `Bearer ${desk.conn ? desk.conn.token : ""}` };
}

// The daemon's record of a reply; a record older than the one shown does not replace it.
function noteReply(record) {
  let known = desk.outbound.get(record.contact_id);
  if (!known) desk.outbound.set(record.contact_id, (known = new Map()));
  const shown = known.get(record.key);
  if (shown && (shown.updated_at || 0) > (record.updated_at || 0)) return;
  known.set(record.key, record);
  bump(record.contact_id);
}

async function loadReplies(contactId) {
  if (!desk.replies.has(contactId.split(":")[0])) return;
  try {
    const resp = await fetch(`/v1/contacts/${encodeURIComponent(contactId)}/messages`, { headers: authHeaders() });
    if (!resp.ok) return;
    const body = await resp.json();
    for (const record of body.messages) if (record.action === "message") noteReply(record);
    render();
  } catch { /* offline: the next snapshot loads them again */ }
}

function sendReply(contactId, text) {
  const key = randomKey();
  desk.pending.set(key, { contact_id: contactId, text, problem: null, tries: 0 });
  bump(contactId);
  postReply(key);
  render();
}

// The daemon says 202 once the reply is in its outbox. No answer (network, 5xx, 429): the
// reply stays here and goes again, with the same key, so the daemon queues it once.
async function postReply(key) {
  const item = desk.pending.get(key);
  if (!item || item.inFlight) return;
  item.inFlight = true;
  let resp = null, body = null;
  try {
    resp = await fetch(`/v1/contacts/${encodeURIComponent(item.contact_id)}/messages`, {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json", "Idempotency-Key": key },
      body: JSON.stringify({ text: item.text }),
    });
    body = await resp.json().catch(() => ({}));
  } catch { resp = null; }
  item.inFlight = false;
  if (resp && resp.status === 202) {
    desk.pending.delete(key);
    if (body.status) noteReply(body.status);
  } else if (resp && resp.status !== 429 && resp.status < 500) {
    // Refused (outside the messaging window, no longer assigned ...): the text goes back into
    // the box with the daemon's sentence, nothing is lost.
    desk.pending.delete(key);
    refuseReply(item.contact_id, item.text, body.detail || body.error || `HTTP ${resp.status}`);
  } else {
    item.problem = resp ? (body.detail || body.error || `HTTP ${resp.status}`) : "no connection to Stellwerk";
    item.tries += 1;
    setTimeout(() => postReply(key), Math.min(10, 0.5 * 2 ** item.tries) * 1000);
  }
  bump(item.contact_id);
  render();
}

function refuseReply(contactId, text, detail) {
  for (const card of desk.cards.values()) {
    if (!card.reply || card.contactId !== contactId) continue;
    if (!card.reply.text.value.trim()) card.reply.text.value = text;
    card.reply.error.textContent = detail;
  }
}

// The badge (the outbox state) and, for retrying and failed, the error to show under the text.
function replyState(record) {
  if (!record) return { state: "queued", detail: null };
  const detail = ["retrying", "failed"].includes(record.state) && record.error
    ? `${record.state === "failed" ? "Not sent" : "Trying again"}: ${record.error}` : null;
  return { state: record.state, detail };
}

// ---- rendering -------------------------------------------------------------------------------

function render() {
  const signedIn = desk.conn !== null;
  $("who").textContent = signedIn ? `${desk.agent.name || desk.agent.id} (${desk.agent.id})` : "";
  renderPresence(signedIn);
  renderBanner(signedIn);
  renderCards();
  $("idle").hidden = !signedIn || desk.offers.size > 0 || desk.contacts.size > 0;
}

function renderPresence(signedIn) {
  const box = clear($("presence"));
  if (!signedIn) return;
  const state = desk.agent.state;
  const reason = desk.agent.reason && state === "away"
    ? ` · ${desk.awayReasons[desk.agent.reason] || desk.agent.reason}` : "";
  box.append(el("span", { class: `badge state-${state}`, id: "agent-state", text: STATE_LABEL[state] + reason }));
  box.append(el("button", { id: "go-available", onclick: goAvailable, disabled: state === "available" }, "Go available"));
  const select = el("select", { id: "away-reason", "aria-label": "away reason" },
    Object.entries(desk.awayReasons).map(([code, label]) => el("option", { value: code, text: label })));
  box.append(select);
  box.append(el("button", { id: "go-away", onclick: () => goAway(select.value || null) }, "Go away"));
  box.append(el("button", {
    id: "logout",
    onclick: () => { send({ op: "logout" }); setTimeout(() => signOut(""), 300); },
  }, "Log out"));
}

function renderBanner(signedIn) {
  const banner = clear($("banner"));
  const parts = [];
  if (signedIn && desk.agent.state === "not_responding") {
    parts.push(el("p", { class: "warn", id: "not-responding" },
      el("strong", { text: "Not responding: " }),
      "you missed several offers in a row, so no more work is offered to you. ",
      "Press ", el("strong", { text: "Go available" }), " when you are back to get offers again."));
  }
  if (signedIn && desk.agent.state === "offline") {
    parts.push(el("p", {}, "You are logged out of routing. Press ", el("strong", { text: "Go available" }),
      " to receive work."));
  }
  if (desk.notice) parts.push(el("p", { class: "notice", id: "notice", text: desk.notice }));
  banner.append(...parts);
  banner.hidden = parts.length === 0;
}

function renderCards() {
  const wanted = new Map();
  for (const offer of desk.offers.values()) wanted.set(`offer:${offer.offer_id}`, offer);
  for (const held of desk.contacts.values()) wanted.set(`contact:${held.contact_id}:${held.state}`, held);
  for (const [key, card] of desk.cards) {
    if (!wanted.has(key)) { card.root.remove(); desk.cards.delete(key); }
  }
  for (const [key, item] of wanted) {
    let card = desk.cards.get(key);
    if (!card) {
      card = key.startsWith("offer:") ? offerCard(item) : contactCard(item);
      desk.cards.set(key, card);
      (key.startsWith("offer:") ? $("offers") : $("work")).append(card.root);
    }
    const messages = desk.transcripts.get(item.contact_id);
    const rev = desk.revs.get(item.contact_id) || 0;
    if (messages !== card.messages || rev !== card.rev) {
      card.messages = messages;
      card.rev = rev;
      clear(card.thread).append(conversation(item, messages));
    }
  }
  tick();
}

function offerCard(offer) {
  const count = el("span", { class: "countdown" });
  const bar = el("div", { class: "bar" });
  const thread = el("div", { class: "thread" });
  const total = Math.max(1, offer.expires_at - serverNow());
  const root = el("article", { class: "card offer", "data-offer": offer.offer_id, "data-contact": offer.contact_id },
    el("header", {},
      el("h2", {}, `${CHANNEL[offer.contact.channel] || offer.contact.channel} offered`),
      el("span", { class: "expires" }, "answer within ", count)),
    el("div", { class: "meter" }, bar),
    reasonLine(offer),
    customerBlock(offer),
    thread,
    el("div", { class: "actions" },
      el("button", { class: "accept", onclick: () => send({ op: "accept", offer_id: offer.offer_id }) }, "Accept"),
      el("button", { class: "reject", onclick: () => send({ op: "reject", offer_id: offer.offer_id, reason: "declined" }) }, "Reject")));
  return {
    root, thread, messages: undefined,
    tick: () => {
      const left = offer.expires_at - serverNow();
      count.textContent = `${Math.max(0, Math.min(Math.ceil(total), Math.ceil(left)))} s`;
      bar.style.width = `${Math.max(0, Math.min(100, (left / total) * 100))}%`;
      root.classList.toggle("urgent", left < 5);
    },
  };
}

function contactCard(held) {
  const thread = el("div", { class: "thread" });
  const timer = el("span", { class: "timer" });
  let actions;
  if (held.state === "wrap_up") {
    actions = el("div", { class: "actions wrap" },
      el("span", {}, "Wrap-up ", el("strong", { class: "wrapup-countdown" }, timer),
        held.disposition ? ` · ${desk.dispositions[held.disposition] || held.disposition}` : "",
        held.ended ? ` · the customer ended it (${held.ended.replaceAll("_", " ")})` : ""),
      el("button", { onclick: () => send({ op: "state", state: "available" }) }, "Ready now"));
  } else {
    const select = el("select", { class: "disposition", "aria-label": "disposition" },
      el("option", { value: "", text: "Disposition…" }),
      Object.entries(desk.dispositions).map(([code, label]) => el("option", { value: code, text: label })));
    const button = el("button", { class: "complete", disabled: Object.keys(desk.dispositions).length > 0 }, "Complete");
    select.addEventListener("change", () => { button.disabled = !select.value; });
    button.addEventListener("click", () => send({
      op: "complete", contact_id: held.contact_id, disposition: select.value || undefined,
    }));
    actions = el("div", { class: "actions" }, select, button);
  }
  const reply = held.state === "assigned" && desk.replies.has(held.contact_id.split(":")[0])
    ? replyBox(held.contact_id) : null;
  const channel = held.channel || held.contact.channel;
  const root = el("article", { class: `card contact ${held.state}`, "data-contact": held.contact_id },
    el("header", {},
      el("h2", {}, `${CHANNEL[channel] || channel}`, held.contact.subject ? ` · ${held.contact.subject}` : ""),
      el("span", { class: "held" }, held.state === "wrap_up" ? "completed" : ["held ", timer])),
    reasonLine(held),
    customerBlock(held),
    thread,
    reply && reply.form,
    actions);
  return {
    root, thread, messages: undefined, reply, contactId: held.contact_id,
    tick: () => {
      // Clamped: a clock a few milliseconds behind the daemon's must not show 31 of 30 s.
      const wrapLeft = Math.min(held.wrap_up ?? Infinity, Math.ceil(held.wrap_until - serverNow()));
      timer.textContent = held.state === "wrap_up"
        ? `${Math.max(0, wrapLeft)} s`
        : duration(serverNow() - held.assigned_at);
    },
  };
}

function replyBox(contactId) {
  const text = el("textarea", { class: "reply-text", rows: 3, "aria-label": "your reply", placeholder: "Write your reply…" });
  const error = el("p", { class: "reply-error error", role: "alert" });
  const form = el("form", { class: "reply" }, text,
    el("div", { class: "reply-actions" }, error, el("button", { type: "submit", class: "send" }, "Send")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = text.value.trim();
    if (!body) return;
    text.value = "";
    error.textContent = "";
    sendReply(contactId, body);
  });
  text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  return { form, text, error };
}

function reasonLine(item) {
  return el("p", { class: "reason" },
    "Routed by rule ", el("strong", { class: "rule", text: item.rule || "?" }),
    " to queue ", el("strong", { class: "queue", text: item.queue }),
    " with priority ", el("strong", { class: "priority", text: String(item.priority ?? 0) }));
}

function customerBlock(item) {
  const c = item.contact;
  const who = c.sender || {};
  const name = who.name || who.email || who.phone || who.handle || "unknown customer";
  const rows = (item.history || []).map((h) => el("tr", {},
    el("td", { text: CHANNEL[h.channel] || h.channel }),
    el("td", { text: clock(h.at) }),
    el("td", { text: h.subject || "" }),
    el("td", { text: h.queue || "" }),
    el("td", { text: h.agent_id || "" }),
    el("td", { text: (h.outcome || "").replaceAll("_", " ") })));
  return el("section", { class: "customer" },
    el("p", { class: "who" }, el("strong", { text: name }),
      item.expert_id ? el("span", { class: "badge expert", title: item.expert_id },
        `Crowd expert · level ${item.expert_level}`) : null),
    el("p", { class: "keys muted", text: [who.email, who.phone, who.handle].filter((k) => k && k !== name).join(" · ") }),
    rows.length
      ? el("div", { class: "scroll" }, el("table", { class: "history" },
        el("caption", { text: "Earlier contacts, all channels" }),
        el("thead", {}, el("tr", {}, ["Channel", "When", "Subject", "Queue", "Agent", "Outcome"].map((h) => el("th", { text: h })))),
        el("tbody", {}, rows)))
      : el("p", { class: "muted", text: "No earlier contacts." }));
}

function conversation(item, messages) {
  const c = item.contact;
  if (c.channel === "phone") {
    const attrs = Object.entries(c.attributes || {});
    return el("dl", { class: "call" },
      el("dt", { text: "Caller" }), el("dd", { text: (c.sender && (c.sender.phone || c.sender.name)) || "withheld" }),
      el("dt", { text: "Dialled" }), el("dd", { text: c.to || "–" }),
      attrs.length ? [el("dt", { text: "IVR" }), el("dd", {}, el("ul", { class: "ivr" },
        attrs.map(([k, v]) => el("li", {}, el("code", { text: k }), " = ", v))))] : null);
  }
  // Until the transcript arrives (or when none is kept), the offer's first message.
  let list = messages && messages.length ? [...messages] : [{ ...c, at: c.occurred_at }];
  // A platform that reports our own posts back (Discourse's webhook for the staff post) would
  // show each reply twice: its staff message with a reply's very text is that reply.
  const replied = new Set(list.filter((m) => m.reply_key).map((m) => (m.text || "").trim()));
  list = list.filter((m) => m.reply_key || !m.staff || !replied.has((m.text || "").trim()));
  const records = desk.outbound.get(item.contact_id) || new Map();
  // Replies the daemon has not taken yet come last, with what keeps them here.
  for (const [key, p] of desk.pending) {
    // The daemon's key ends in the page's (reply:{contact}:{agent}:{page's key}).
    if (p.contact_id !== item.contact_id || list.some((m) => m.reply_key && m.reply_key.endsWith(`:${key}`))) continue;
    list.push({ staff: true, sender: { name: desk.agent.name }, text: p.text, pending: p, reply_key: key });
  }
  return el("ol", { class: "messages" }, list.map((m) => {
    const from = (m.sender && (m.sender.name || m.sender.email || m.sender.handle || m.sender.phone)) || "";
    let badge = null, detail = null;
    if (m.pending) {
      badge = el("span", { class: "reply-state reply-unsent", text: m.pending.problem ? "not sent yet" : "sending…" });
      if (m.pending.problem) detail = `Not with Stellwerk yet (${m.pending.problem}); trying again.`;
    } else if (m.reply_key) {
      const shown = replyState(records.get(m.reply_key));
      badge = el("span", { class: `reply-state reply-${shown.state}`, text: shown.state });
      detail = shown.detail;
    }
    return el("li", { class: `${m.staff ? "staff" : "customer"}${m.reply_key ? " reply" : ""}`, "data-key": m.reply_key },
      el("div", { class: "meta" }, el("strong", { text: from }), m.at ? [" · ", clock(m.at)] : null,
        m.subject ? el("span", { class: "subject", text: ` · ${m.subject}` }) : null, badge ? " " : null, badge),
      m.text ? el("div", { class: "text", text: m.text }) : null,
      detail ? el("div", { class: "reply-detail", text: detail }) : null,
      (m.attachments || []).length ? el("ul", { class: "attachments" },
        m.attachments.map((a) => el("li", {}, el("span", { class: "clip", text: "Attachment" }), " ",
          el("strong", { text: a.filename }), ` (${a.content_type}, ${Math.ceil(a.size / 1024)} KB)`))) : null);
  }));
}

function tick() {
  for (const card of desk.cards.values()) card.tick();
}

setInterval(tick, 250);

const saved = sessionStorage.getItem("stellwerk.desk");
if (saved) {
  try {
    const { agentId, token } = JSON.parse(saved);
    $("agent-id").value = agentId;
    signIn(agentId, token);
  } catch { sessionStorage.removeItem("stellwerk.desk"); }
}
render();
