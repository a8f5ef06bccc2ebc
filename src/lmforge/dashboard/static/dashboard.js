// The lmforge dashboard page: polls the runs table and the selected run's metrics (drawn with uPlot), and streams
// playground replies from POST /api/chat (the serve's server-sent events, relayed by the dashboard's server).
// The chart element carries data-points (steps drawn) and data-last-step, so tests and scripts can read progress.
"use strict";

const RUNS_EVERY_MS = 4000;
const METRICS_EVERY_MS = 2000;
const $ = (id) => document.getElementById(id);

// ---- formatting --------------------------------------------------------------------------------------------

function energyText(joules, measured) {
  if (joules == null) return "-";
  const text = joules >= 3.6e6 ? `${(joules / 3.6e6).toPrecision(3)} kWh`
    : joules >= 3600 ? `${(joules / 3600).toPrecision(3)} Wh` : `${joules.toPrecision(3)} J`;
  return measured ? text : `${text} (est.)`;
}

const money = (usd) => (usd == null ? "-" : `$${usd.toFixed(4)}`);
const fixed = (x, digits) => (x == null ? "-" : x.toFixed(digits));

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;  // always text: run names and replies are never parsed as HTML
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `${url} answered ${response.status}`);
  return body;
}

// ---- runs table ---------------------------------------------------------------------------------------------

let selected = null;  // the selected run's id

async function refreshRuns() {
  try {
    const body = await getJSON("/api/runs");
    $("ledger").textContent = `ledger: ${body.ledger}`;
    $("runs-note").textContent = body.runs.length ? "" : "No runs yet: `lmforge demo` or `lmforge train` records one.";
    $("runs-note").classList.remove("error");
    const rows = body.runs.map((run) => {
      const tr = el("tr");
      tr.dataset.runId = run.id;
      tr.classList.toggle("selected", run.id === selected);
      const status = el("span", `status status-${run.status}`, run.status);
      const cells = [run.name, run.kind, status, run.steps == null ? "-" : run.steps.toLocaleString(),
        fixed(run.val_bpb, 4), energyText(run.energy_j, run.energy_measured), money(run.cost_usd)];
      cells.forEach((value, i) => {
        const td = el("td", i >= 3 ? "num" : "");
        if (value instanceof Node) td.appendChild(value); else td.textContent = value;
        tr.appendChild(td);
      });
      tr.addEventListener("click", () => select(run));
      return tr;
    });
    $("runs").tBodies[0].replaceChildren(...rows);
    if (selected === null && body.runs.length) select(body.runs[0]);
  } catch (e) {
    $("runs-note").textContent = `Cannot list runs: ${e.message}`;
    $("runs-note").classList.add("error");
  }
}

// ---- chart of the selected run -------------------------------------------------------------------------------

const SERIES = ["loss", "val_loss", "val_bpb"];
let chart = null;
let data = null;     // {steps: [...], loss: [...], val_loss: [...], val_bpb: [...]}
let lastStep = -1;
let generation = 0;  // bumped on every selection, so answers for a run no longer shown are dropped
let pollTimer = null;

function select(run) {
  selected = run.id;
  for (const tr of $("runs").tBodies[0].rows) tr.classList.toggle("selected", Number(tr.dataset.runId) === run.id);
  $("chart-title").textContent = `${run.name} (${run.kind})`;
  generation += 1;
  data = {steps: [], loss: [], val_loss: [], val_bpb: []};
  lastStep = -1;
  if (chart) chart.destroy();
  chart = new uPlot(chartOptions(), [[], [], [], []], $("chart"));
  showProgress();
  clearTimeout(pollTimer);
  pollMetrics(generation);
}

function chartOptions() {
  const line = (label, scale, stroke, points) =>
    ({label, scale, stroke, width: 1.5, spanGaps: true, points: {show: points, size: 5}});
  return {
    width: Math.max(300, $("chart-panel").clientWidth - 30), height: 320,
    scales: {x: {time: false}},
    series: [{label: "step"}, line("loss", "nats", "#1f77b4", false), line("val loss", "nats", "#ff7f0e", true),
      line("val bpb", "bpb", "#2ca02c", true)],
    axes: [{label: "step"}, {scale: "nats", label: "loss (nats/token)"},
      {scale: "bpb", side: 1, label: "val bits/byte", grid: {show: false}}],
  };
}

async function pollMetrics(mine) {
  let again = METRICS_EVERY_MS;
  try {
    const body = await getJSON(`/api/runs/${selected}/metrics?since=${lastStep}&names=${SERIES.join(",")}`);
    if (mine !== generation) return;
    if (body.steps.length) {
      data.steps.push(...body.steps);
      for (const name of SERIES) data[name].push(...body.series[name]);
      lastStep = body.last_step;
      chart.setData([data.steps, data.loss, data.val_loss, data.val_bpb]);
      showProgress();
    }
    $("chart-note").classList.remove("error");
    if (body.more) again = 0;  // a long run's history arrives page by page
  } catch (e) {
    if (mine !== generation) return;
    $("chart-note").textContent = `Cannot read metrics: ${e.message}`;
    $("chart-note").classList.add("error");
  }
  pollTimer = setTimeout(() => pollMetrics(mine), again);
}

function showProgress() {
  const chartEl = $("chart");
  chartEl.dataset.points = data.steps.length;
  chartEl.dataset.lastStep = lastStep < 0 ? "" : lastStep;
  const lastVal = [...data.val_bpb].reverse().find((v) => v != null);
  $("chart-note").textContent = data.steps.length
    ? `${data.steps.length} steps logged, last step ${lastStep}` +
      (lastVal != null ? `, val bpb ${lastVal.toFixed(4)}` : "")
    : "No step metrics logged for this run yet.";
}

window.addEventListener("resize", () => {
  if (chart) chart.setSize({width: Math.max(300, $("chart-panel").clientWidth - 30), height: 320});
});

// ---- chat playground -----------------------------------------------------------------------------------------

let history = [];  // the conversation sent with every message: [{role, content}]

async function refreshServe() {
  try {
    const body = await getJSON("/api/serve");
    $("serve-status").textContent = `${body.model} at ${body.url}`;
    $("serve-status").classList.remove("error");
  } catch (e) {
    $("serve-status").textContent = e.message;
    $("serve-status").classList.add("error");
  }
}

function addTurn(role, text) {
  const turn = el("div", `turn ${role}`);
  const bubble = el("div", "bubble", text);
  const meta = el("div", "meta");
  turn.append(bubble, meta);
  $("conversation").appendChild(turn);
  return {turn, bubble, meta};
}

function numberSetting(id) {
  const value = Number($(id).value);
  return id === "max_tokens" ? Math.round(value) : value;
}

async function send(text) {
  history.push({role: "user", content: text});
  addTurn("user", text);
  const reply = addTurn("assistant", "");
  reply.turn.dataset.state = "streaming";
  $("send").disabled = true;
  const result = {text: "", finish: null, guard: null, usage: null, error: null};
  try {
    const response = await fetch("/api/chat", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages: history, temperature: numberSetting("temperature"),
        top_p: numberSetting("top_p"), max_tokens: numberSetting("max_tokens")}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `the chat answered ${response.status}`);
    }
    await readEvents(response, (event) => {
      if (event.error) { result.error = event.error.message; return; }
      const choice = event.choices && event.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        result.text += choice.delta.content;
        reply.bubble.textContent = result.text;
      }
      if (choice && choice.finish_reason) result.finish = choice.finish_reason;
      if (event.lmforge && event.lmforge.guard) result.guard = event.lmforge.guard;
      if (event.usage) result.usage = event.usage;
    });
  } catch (e) {
    result.error = e.message;
  }
  $("send").disabled = false;
  if (result.error && !result.text) {
    history.pop();  // the message was not answered: it leaves the conversation
    reply.bubble.textContent = result.error;
    reply.bubble.classList.add("error");
    reply.turn.dataset.state = "error";
    return;
  }
  history.push({role: "assistant", content: result.text});
  showMeta(reply, result);
  reply.turn.dataset.state = "done";
  $("conversation").scrollTop = $("conversation").scrollHeight;
}

async function readEvents(response, onEvent) {
  // server-sent events: "data: {json}" blocks separated by blank lines, ending with "data: [DONE]"
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload !== "[DONE]") onEvent(JSON.parse(payload));
      }
    }
  }
}

function showMeta(reply, result) {
  const meta = reply.meta;
  const usage = result.usage;
  if (usage) {
    const joules = usage.lmforge ? usage.lmforge.energy_joules : null;
    const measured = usage.lmforge && usage.lmforge.energy_measured;
    meta.dataset.completionTokens = usage.completion_tokens;
    meta.dataset.joules = joules;
    const tokens = el("div", "usage", `${usage.prompt_tokens} + ${usage.completion_tokens} tokens`);
    tokens.title = "prompt + completion tokens";
    meta.appendChild(tokens);
    meta.appendChild(el("div", "energy", `${joules == null ? "-" : joules.toPrecision(3)} J` +
      (measured ? "" : " (est.)")));
  }
  if (result.finish) meta.appendChild(el("div", "finish", `finish: ${result.finish}`));
  if (result.guard) {
    const verdicts = [["input", result.guard.input], ...result.guard.output.map((v) => ["output", v])];
    for (const [direction, verdict] of verdicts) {
      const categories = [...new Set(verdict.findings.map((f) => f.category))];
      const line = el("div", `verdict verdict-${verdict.action}`,
        `${direction}: ${verdict.action}` + (categories.length ? ` (${categories.join(", ")})` : ""));
      line.dataset.direction = direction;
      line.dataset.action = verdict.action;
      meta.appendChild(line);
    }
  }
  if (result.finish === "content_filter") reply.turn.classList.add("refused");
  if (result.error) meta.appendChild(el("div", "error", result.error));
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || $("send").disabled) return;
  $("prompt").value = "";
  send(text).then(refreshServe);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("clear").addEventListener("click", () => {
  history = [];
  $("conversation").replaceChildren();
});

refreshRuns();
setInterval(refreshRuns, RUNS_EVERY_MS);
refreshServe();
