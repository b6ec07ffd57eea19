// The supervisor wallboard: the daemon pushes a "board" over /v1/wall/ws whenever something
// changed (and every second); this page only draws it. Releasing a stuck contact is a command.
import { Connection, clear, duration, el, syncClock } from "./common.js";

const $ = (id) => document.getElementById(id);
let conn = null;

function signIn(token) {
  sessionStorage.setItem("stellwerk.wall", token);
  $("signin").hidden = true;
  conn = new Connection("/v1/wall/ws", token, {
    onMessage: handle,
    onStatus: (s) => { $("status").textContent = s; $("status").dataset.state = s; },
    onFinal: (msg) => {
      sessionStorage.removeItem("stellwerk.wall");
      $("signin").hidden = false;
      $("board").hidden = true;
      $("signin-error").textContent = msg.detail || msg.error;
    },
  });
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token").value);
});

function handle(msg) {
  if (msg.type === "hello") syncClock(msg.server_time);
  else if (msg.type === "board") draw(msg);
  else if (msg.type === "refused" || msg.type === "error") notice(`Refused: ${msg.reason || msg.error} ${msg.detail || ""}`);
  else if (msg.type === "ack" && msg.op === "release") notice(`Released ${msg.contact_id}.`);
}

function notice(text) {
  const p = $("wall-notice");
  p.textContent = text;
  p.hidden = false;
}

const pct = (x) => (x === null || x === undefined ? "–" : `${Math.round(x * 100)} %`);

function level(q) {
  // Red: below target; amber: within 5 points of it; nothing closed yet: neutral.
  if (q.service_level === null) return "";
  const target = q.sla_percent / 100;
  if (q.service_level < target) return "breach";
  if (q.service_level < target + 0.05) return "warn";
  return "ok";
}

function draw(board) {
  $("board").hidden = false;
  $("day").textContent = `Today ${board.day} (${board.timezone})`;
  const body = clear(document.querySelector("#queues tbody"));
  for (const q of board.queues) {
    const waitClass = q.waiting && q.oldest_wait > q.sla_seconds ? "breach" : q.waiting ? "warn" : "";
    body.append(el("tr", { "data-queue": q.name, class: q.stuck ? "has-stuck" : "" },
      el("th", { class: "name", title: q.description }, q.name),
      el("td", { class: `waiting ${waitClass}`, text: String(q.waiting) }),
      el("td", { class: `oldest ${waitClass}`, text: q.waiting ? duration(q.oldest_wait) : "–" }),
      el("td", { class: `sl ${level(q)}` }, pct(q.service_level), el("small", { text: ` / ${q.sla_percent} % in ${q.sla_seconds} s` })),
      el("td", { class: "offered", text: String(q.offered) }),
      el("td", { class: "answered", text: String(q.answered) }),
      el("td", { class: `abandoned ${q.abandoned ? "warn" : ""}`, text: String(q.abandoned) }),
      el("td", { class: `ready ${q.waiting && !q.agents_ready ? "breach" : ""}`, text: String(q.agents_ready) }),
      el("td", { class: "busy", text: String(q.agents_busy) }),
      el("td", { class: "away", text: String(q.agents_away) }),
      el("td", { class: `not-responding ${q.agents_not_responding ? "breach" : ""}`, text: String(q.agents_not_responding) })));
  }
  const c = board.crowd;
  clear(document.querySelector("#crowd dl")).append(
    el("dt", { text: "Questions in crowd window" }), el("dd", { id: "crowd-window", text: String(c.in_crowd_window) }),
    el("dt", { text: "Answered today: crowd / agents" }), el("dd", { id: "crowd-answers", text: `${c.answered_by_crowd} / ${c.answered_by_agents}` }),
    el("dt", { text: "Experts active: 24 h / 7 days" }), el("dd", { id: "experts-active", text: `${c.experts_active_day} / ${c.experts_active_week} of ${c.experts}` }),
    el("dt", { text: "Experts' contacts waiting" }), el("dd", { id: "experts-waiting", class: c.experts_waiting ? "warn" : "", text: String(c.experts_waiting) }));
  const stuck = clear(document.querySelector("#stuck .body"));
  if (!board.stuck.length) {
    stuck.append(el("p", { class: "muted", text: "Nobody holds a contact much longer than usual." }));
  } else {
    stuck.append(el("table", { class: "stuck" },
      el("thead", {}, el("tr", {}, ["Agent", "Queue", "Held", "Usual", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, board.stuck.map((s) => el("tr", { class: "breach", "data-contact": s.contact_id },
        el("td", { text: `${s.agent_name || s.agent_id} (${s.agent_id})` }),
        el("td", { text: `${s.queue} · ${s.channel}` }),
        el("td", { text: duration(s.held) }),
        el("td", { text: duration(s.usual) }),
        el("td", {}, el("button", {
          class: "release",
          onclick: () => {
            if (confirm(`Release ${s.contact_id} from ${s.agent_id}? It is completed as released_by_supervisor.`)) {
              conn.send({ op: "release", contact_id: s.contact_id });
            }
          },
        }, "Release")))))));
  }
}

const saved = sessionStorage.getItem("stellwerk.wall");
if (saved) signIn(saved);
