// The sale dashboard: the list of sales, one sale live over server-sent events, charts
// (uPlot), and the admin actions. Plain JavaScript, no framework.
"use strict";

const TOKEN_KEY = "flashsale.dashboard.token";
const USER_KEY = "flashsale.dashboard.user";
const POINTS = 300; // five minutes of one-second snapshots
const REASONS = {
  SOLD_OUT: "sold out", LIMIT_EXCEEDED: "per-user limit", INSUFFICIENT_STOCK: "not enough left",
  RATE_LIMITED: "rate limited", NOT_ADMITTED: "not admitted (waiting room)",
  ADMISSION_EXPIRED: "admission expired (waiting room)",
  NOT_STARTED: "not started", SALE_ENDED: "ended", RETRY_LATER: "retry later (stores busy)",
  SALE_RECOVERING: "recovering",
};

const state = { token: null, user: null, saleId: null, abort: null, charts: null, series: null };

function show(id, on) { document.getElementById(id).classList.toggle("hidden", !on); }

function loggedIn(token, user) {
  state.token = token;
  state.user = user;
  sessionStorage.setItem(TOKEN_KEY, token);
  sessionStorage.setItem(USER_KEY, JSON.stringify(user));
  FS.text("who", `${user.nickname || user.email} (${user.role})`);
  show("login-card", false);
  show("sales-card", true);
  show("plans-card", user.role === "admin");
  show("logout", true);
  loadSales();
  loadPlans();
  const wanted = Number(new URLSearchParams(location.search).get("sale"));
  if (wanted) watch(wanted);
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(USER_KEY);
  if (state.abort) state.abort.abort();
  location.replace("/dashboard");
}

async function loadSales() {
  const r = await FS.api("GET", "/api/v1/dashboard/sales", state.token);
  if (r.status === 401) return logout();
  const body = document.getElementById("sales");
  body.textContent = "";
  for (const s of r.data || []) {
    const tr = document.createElement("tr");
    tr.className = "sale-row" + (s.flash_sale_id === state.saleId ? " selected" : "");
    tr.dataset.saleId = s.flash_sale_id;
    const left = s.remaining_quantity === null ? "–" : FS.num(s.remaining_quantity);
    for (const cell of [
      s.flash_sale_id, s.product_name, null, `${left} / ${FS.num(s.total_quantity)}`,
      FS.time(s.start_time), FS.time(s.end_time),
    ]) {
      const td = document.createElement("td");
      if (cell === null) {
        const badge = document.createElement("span");
        badge.className = "status " + s.status;
        badge.textContent = s.status.replace("_", " ");
        td.appendChild(badge);
      } else td.textContent = cell;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => watch(s.flash_sale_id));
    body.appendChild(tr);
  }
  if (!(r.data || []).length) {
    body.innerHTML = '<tr><td colspan="6" class="muted">no sales</td></tr>';
  }
}

function makeCharts() {
  const el = (id) => document.getElementById(id);
  const width = () => Math.max(280, el("c-remaining").parentElement.clientWidth - 16);
  const opts = (series) => ({
    width: width(), height: 170, series: [{}, ...series],
    axes: [{}, { size: 56 }], legend: { live: false },
  });
  const empty = (n) => Array.from({ length: n + 1 }, () => []);
  const charts = {
    remaining: new uPlot(opts([{ label: "remaining", stroke: "#2f5bd3" }]), empty(1), el("c-remaining")),
    rates: new uPlot(opts([
      { label: "accepted/s", stroke: "#127a3e" }, { label: "refused/s", stroke: "#b42318" },
    ]), empty(2), el("c-rates")),
    latency: new uPlot(opts([
      { label: "p50", stroke: "#2f5bd3" }, { label: "p99", stroke: "#b54708" },
    ]), empty(2), el("c-latency")),
    consumer: new uPlot(opts([
      { label: "lag", stroke: "#b42318" }, { label: "drain/s", stroke: "#127a3e" },
    ]), empty(2), el("c-consumer")),
  };
  window.addEventListener("resize", () => {
    for (const c of Object.values(charts)) c.setSize({ width: width(), height: 170 });
  });
  return charts;
}

function resetSeries() {
  state.series = { t: [], remaining: [], acc: [], ref: [], p50: [], p99: [], lag: [], drain: [] };
}

function addPoint(s) {
  const x = state.series;
  const refused = Object.values(s.refusals_per_s || {}).reduce((a, b) => a + b, 0);
  x.t.push(s.t / 1000);
  x.remaining.push(s.sale.remaining_quantity);
  x.acc.push(s.accepted_per_s);
  // a merchant's snapshot has no platform figures (refusals, latency, consumers)
  const latency = s.join_latency_ms || {}, consumer = s.consumer || {};
  x.ref.push(s.refusals_per_s ? refused : null);
  x.p50.push(latency.p50 ?? null);
  x.p99.push(latency.p99 ?? null);
  x.lag.push(consumer.lag ?? null);
  x.drain.push(consumer.drain_per_s ?? null);
  if (x.t.length > POINTS) for (const k of Object.keys(x)) x[k].shift();
}

function drawCharts() {
  const x = state.series, c = state.charts;
  c.remaining.setData([x.t, x.remaining]);
  c.rates.setData([x.t, x.acc, x.ref]);
  c.latency.setData([x.t, x.p50, x.p99]);
  c.consumer.setData([x.t, x.lag, x.drain]);
}

function render(s) {
  const sale = s.sale;
  FS.text("live-title", `#${sale.flash_sale_id} ${sale.product_name}`);
  FS.text("live-sub", `${sale.status.replace("_", " ")} · ${FS.money(sale.flash_price)} · `
    + `${FS.time(sale.start_time)} → ${FS.time(sale.end_time)}`);
  document.getElementById("live").dataset.status = sale.status;
  FS.text("v-remaining", FS.num(sale.remaining_quantity));
  FS.text("v-total", `of ${FS.num(sale.total_quantity)}`);
  FS.text("v-accepted", FS.num(s.accepted_units));
  FS.text("v-accepted-rate", FS.num(s.accepted_per_s, 1));
  const latency = s.join_latency_ms || {}, consumer = s.consumer || {};
  FS.text("v-p50", FS.num(latency.p50, 2));
  FS.text("v-p99", FS.num(latency.p99, 2));
  FS.text("v-lag", FS.num(consumer.lag));
  FS.text("v-drain", FS.num(consumer.drain_per_s, 1));
  FS.text("v-dead", FS.num(s.dead_letters));
  FS.text("v-expiry", FS.num(s.expiry_returns));
  FS.text("v-drift", s.reconcile_drift === null ? "not run" : FS.num(s.reconcile_drift));
  FS.text("v-money-drift",
    s.reconcile_money_drift === null ? "not run" : FS.num(s.reconcile_money_drift));
  for (const k of ["queued", "pending_payment", "paid", "cancelled"]) {
    FS.text("o-" + k, FS.num(s.orders[k] || 0));
  }
  const wr = s.waiting_room; // null until the waiting room gives the sale a queue
  show("waiting-room", !!wr);
  if (wr) {
    FS.text("v-queue", FS.num(wr.queue_length));
    FS.text("v-admit", FS.num(wr.admitted_per_s, 1)); // admins only: "–" for a merchant
  }
  const list = document.getElementById("refusals");
  const codes = Object.keys(s.refusals_total || {});
  list.textContent = "";
  if (!codes.length) list.innerHTML = '<li class="muted">none yet</li>';
  for (const code of codes) {
    const li = document.createElement("li");
    li.dataset.reason = code;
    li.textContent = `${REASONS[code] || code}: ${FS.num(s.refusals_total[code])}`
      + ` · ${FS.num((s.refusals_per_s || {})[code] || 0, 1)}/s`;
    list.appendChild(li);
  }
}

function live(on) {
  const el = document.getElementById("live-state");
  el.classList.remove("hidden");
  el.classList.toggle("on", on);
  el.classList.toggle("off", !on);
  el.textContent = on ? "live" : "reconnecting";
}

async function watch(saleId) {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  state.saleId = saleId;
  history.replaceState(null, "", "/dashboard?sale=" + saleId);
  for (const tr of document.querySelectorAll("tr.sale-row")) {
    tr.classList.toggle("selected", Number(tr.dataset.saleId) === saleId);
  }
  show("live", true);
  show("admin-actions", state.user.role === "admin");
  for (const el of document.querySelectorAll(".platform")) {
    el.classList.toggle("hidden", state.user.role !== "admin");
  }
  if (!state.charts) state.charts = makeCharts();
  resetSeries();
  drawCharts();
  let figures = false;
  setTimeout(() => {
    if (!figures && !abort.signal.aborted) {
      FS.text("live-sub", "no live figures yet: a sale that is no longer loaded in Redis "
        + "(settled long ago) has none");
    }
  }, 4000);
  while (!abort.signal.aborted) {
    try {
      await FS.readEvents(`/api/v1/dashboard/sales/${saleId}/events`, state.token, (name, data) => {
        live(true);
        if (name === "history") {
          figures = figures || data.length > 0;
          resetSeries();
          for (const s of data) addPoint(s);
          if (data.length) render(data[data.length - 1]);
        } else if (name === "snapshot") {
          figures = true;
          addPoint(data);
          render(data);
        }
        drawCharts();
      }, abort.signal);
    } catch (err) {
      if (abort.signal.aborted) return;
      if (err.status === 401) return logout();
      if (err.status === 403 || err.status === 404) {
        FS.text("live-sub", err.message);
        return;
      }
    }
    live(false);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// The contingency plans (admins): state, a switch per mode behind a confirmation, the log.
async function loadPlans() {
  if (!state.user || state.user.role !== "admin") return;
  const r = await FS.api("GET", "/api/v1/admin/plans", state.token);
  if (r.status !== 200) return FS.text("plan-result", (r.env && r.env.message) || r.status);
  const body = document.getElementById("plans");
  body.textContent = "";
  for (const p of r.data.plans) {
    const tr = document.createElement("tr");
    tr.dataset.plan = p.name;
    const when = p.at ? new Date(p.at * 1000).toLocaleString() : "–";
    const mode = p.mode + (p.auto ? " (by its trigger)" : "");
    for (const cell of [p.name, mode, p.by ? `${when} by ${p.by}` : "–", p.reason || ""]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    tr.children[0].title = p.does;
    tr.children[1].className = "plan-mode " + p.mode;
    const actions = document.createElement("td");
    // queue-sale moves one sale: from the sale's actions (mode) or the CLI (--sale)
    const modes = p.name === "queue-sale" ? [] : p.arms_itself ? ["on", "armed", "off"] : ["on", "off"];
    for (const mode of modes.filter((m) => m !== p.mode || p.auto)) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "plan-btn" + (mode === "on" ? " danger" : " secondary");
      b.dataset.mode = mode;
      b.textContent = mode === "armed" ? "arm" : mode;
      b.addEventListener("click", () => confirmPlan(p, mode));
      actions.appendChild(b);
    }
    tr.appendChild(actions);
    body.appendChild(tr);
  }
  const log = document.getElementById("plan-log");
  log.textContent = "";
  for (const e of r.data.log.slice(0, 10)) {
    const li = document.createElement("li");
    li.textContent = `${new Date(e.at * 1000).toLocaleString()} ${e.plan}: ${e.from} → ${e.to}`
      + ` by ${e.by}` + (e.reason ? ` (${e.reason})` : "");
    log.appendChild(li);
  }
}

function confirmPlan(plan, mode) {
  confirmThen(`Switch ${plan.name} ${mode} on every worker? ${plan.does}`, async () => {
    const r = await FS.api("PUT", `/api/v1/admin/plans/${plan.name}`, state.token,
      { mode, confirm: plan.name, reason: "from the dashboard" });
    FS.text("plan-result", r.status < 300 ? `${plan.name}: ${r.data.mode}`
      : `refused: ${(r.env && r.env.message) || r.status}`);
    loadPlans();
    return r;
  });
}

function confirmThen(text, action) {
  const dialog = document.getElementById("confirm");
  FS.text("confirm-text", text);
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    const r = await action();
    FS.text("action-result", r.status < 300 ? `done: ${r.env.message}`
      : `refused: ${(r.env && r.env.message) || r.status}`);
    loadSales();
  };
  dialog.showModal();
}

function setUpActions() {
  const admin = (method, tail, body) => FS.api(
    method, `/api/v1/admin/flash-sales/${state.saleId}${tail}`, state.token, body);
  document.getElementById("topup-btn").addEventListener("click", () => {
    const qty = Number(document.getElementById("topup-qty").value);
    if (!(qty >= 1)) return FS.text("action-result", "give a quantity of at least 1");
    confirmThen(`Add ${qty} units to sale #${state.saleId}?`,
      () => admin("PATCH", "", { add_quantity: qty }));
  });
  document.getElementById("end-btn").addEventListener("click", () => {
    const value = document.getElementById("end-at").value;
    if (!value) return FS.text("action-result", "pick the new end time");
    const end = new Date(value);
    confirmThen(`Move the end of sale #${state.saleId} to ${end.toLocaleString()}?`,
      () => admin("PATCH", "", { end_at: end.toISOString() }));
  });
  document.getElementById("close-btn").addEventListener("click", () => {
    confirmThen(`Close sale #${state.saleId} now? Unsold units go back to the SKU.`,
      () => admin("POST", "/close"));
  });
}

document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  FS.text("login-error", "");
  try {
    const data = await FS.login(
      document.getElementById("login-email").value,
      document.getElementById("login-password").value);
    if (data.user.role !== "admin" && data.user.role !== "merchant") {
      FS.text("login-error", "the dashboard is for admins and merchants");
      return;
    }
    loggedIn(data.token, data.user);
  } catch (err) {
    FS.text("login-error", err.message);
  }
});
document.getElementById("logout").addEventListener("click", logout);
setUpActions();
setInterval(() => { if (state.token) { loadSales(); loadPlans(); } }, 5000);
{
  const token = sessionStorage.getItem(TOKEN_KEY);
  const user = sessionStorage.getItem(USER_KEY);
  if (token && user) loggedIn(token, JSON.parse(user));
}
