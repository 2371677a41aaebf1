// The shopper's sale page: the sale's state as it changes, the join button (or, for a queued
// sale, the waiting room: enter, place in the queue, admission), the order's state after
// joining and the link to pay. Plain JavaScript, no framework.
"use strict";

const SALE_ID = Number(location.pathname.split("/").pop());
const TOKEN_KEY = "flashsale.shop.token";
const ORDER_KEY = `flashsale.shop.order.${SALE_ID}`;
const TICKET_KEY = `flashsale.shop.ticket.${SALE_ID}`;
const DEVICE_KEY = "flashsale.shop.device";
const STATE_TEXT = {
  queued: "queued — being confirmed", pending_payment: "pending payment", paid: "paid",
  cancelled: "cancelled", shipped: "shipped", delivered: "delivered", completed: "completed",
  oversold: "not confirmed (no unit was left)",
};
const QUEUE_TEXT = {
  lottery: "You are in. Places are drawn at random when the sale starts: arriving early or late "
    + "before then makes no difference.",
  waiting: "You are in the queue. Keep this page open: the join button appears when it is your turn.",
  admitted: "It is your turn: join before your admission runs out.",
  expired: "Your admission has expired: the unit went to the next in line.",
  sold_out: "Sold out: the queue is closed. It admits again if units come back.",
  ended: "This sale has ended.",
};
const page = {
  sale: null, token: sessionStorage.getItem(TOKEN_KEY), order: null,
  ticket: sessionStorage.getItem(TICKET_KEY), queue: null, entering: false, stop: null,
  asking: false,
};

// Where the sale's state comes from: the server-sent events of /api/v1/flash-sales/{id}/events
// (`sale` events for everyone; with a ticket, `queue` events: the shopper's place), each sent
// when it changes. If the stream cannot be had (no EventSource, refused, or three failures in a
// row without an event), polls take over: the sale once a second, the ticket's place with a
// backoff. Returns a function that stops watching.
function watchSale(saleId, ticket, onSale, onQueue) {
  const qs = ticket ? `?ticket=${encodeURIComponent(ticket)}` : "";
  const timers = new Set();
  let es = null, stopped = false, failures = 0, polling = false;
  const later = (fn, ms) => {
    const t = setTimeout(() => { timers.delete(t); if (!stopped) fn(); }, ms);
    timers.add(t);
  };
  const sale = (data) => {
    onSale(data);
    if (data.status === "ended" && es) { es.close(); es = null; } // nothing more will move
  };
  const pollSale = async (backoff) => {
    let next = 1000;
    try {
      const r = await FS.api("GET", `/api/v1/flash-sales/${saleId}`);
      if (r.status === 200) sale(r.data);
      else if (r.status === 404) return FS.text("message", "this sale does not exist");
      else next = backoff;
    } catch (err) { next = backoff; } // offline for a moment: try again, less often
    if (!page.sale || page.sale.status !== "ended") later(() => pollSale(Math.min(next * 2, 10000)), next);
  };
  const pollQueue = async (backoff) => {
    let next;
    try {
      const r = await FS.api("GET", `/api/v1/flash-sales/${saleId}/queue${qs}`, page.token);
      if (r.status === 200) {
        onQueue(r.data);
        const q = r.data;
        if (q.state === "ended") return;
        // near the front (or admitted): every second; far back: less often
        next = q.state === "waiting" ? Math.min(5000, 1000 + 20 * (q.ahead || 0)) : 1000;
      } else if (r.status === 403) {
        return onQueue(null); // the ticket is not valid (any more): enter again
      } else next = backoff;
    } catch (err) { next = backoff; }
    later(() => pollQueue(Math.min(Math.max(next, 1000) * 2, 15000)), next);
  };
  const fallBack = () => {
    if (es) { es.close(); es = null; }
    if (polling || stopped) return;
    polling = true;
    document.body.dataset.feed = "poll";
    pollSale(1000);
    if (ticket) pollQueue(1000);
  };
  if (window.EventSource) {
    es = new EventSource(`/api/v1/flash-sales/${saleId}/events${qs}`);
    document.body.dataset.feed = "stream";
    es.addEventListener("sale", (ev) => { failures = 0; sale(JSON.parse(ev.data)); });
    es.addEventListener("queue", (ev) => { failures = 0; onQueue(JSON.parse(ev.data)); });
    es.onerror = () => {
      // CLOSED: refused (e.g. 403 for a ticket that is not valid); otherwise it reconnects
      if (!es) return;
      failures += 1;
      if (es.readyState === EventSource.CLOSED || failures >= 3) fallBack();
    };
  } else {
    fallBack();
  }
  return () => {
    stopped = true;
    if (es) es.close();
    for (const t of timers) clearTimeout(t);
  };
}

function show(id, on) { document.getElementById(id).classList.toggle("hidden", !on); }

function countdown(ms) {
  if (ms <= 0) return "0s";
  const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60, sec = s % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + sec + "s";
}

function renderSale() {
  const s = page.sale;
  if (!s) return;
  document.title = `${s.product.name} · flash sale`;
  FS.text("name", s.product.name);
  FS.text("price", "¥" + FS.money(s.product.flash_price));
  FS.text("orig-price", s.product.original_price ? "¥" + FS.money(s.product.original_price) : "");
  FS.text("limit", `limit ${s.per_user_limit} per shopper`
    + (s.mode === "queued" ? " · waiting room" : ""));
  FS.text("remaining", FS.num(s.remaining_quantity));
  FS.text("total", FS.num(s.total_quantity));
  const now = Date.now();
  const start = Date.parse(s.start_time), end = Date.parse(s.end_time);
  const upcoming = now < start;
  FS.text("countdown-label", upcoming ? "starts in" : "ends in");
  FS.text("countdown", countdown(upcoming ? start - now : end - now));
  const q = page.queue;
  const soldOut = s.status === "sold_out" || (!upcoming && s.remaining_quantity <= 0)
    || (!!q && q.state === "sold_out");
  const ended = s.status === "ended" || now >= end || (!!q && q.state === "ended");
  const banner = document.getElementById("banner");
  banner.className = "banner" + (ended ? " ended" : soldOut ? " soldout" : " hidden");
  banner.textContent = ended ? "This sale has ended" : soldOut ? "Sold out" : "";
  document.body.dataset.status = ended ? "ended" : soldOut ? "sold_out" : s.status;
  document.body.dataset.mode = s.mode;
  if (s.mode === "queued") return renderQueue(s, upcoming, soldOut, ended);
  show("enter", false);
  show("queue", false);
  show("join-window", false);
  show("join", true);
  const join = document.getElementById("join");
  join.disabled = !page.token || upcoming || soldOut || ended || !!page.order;
  join.textContent = !page.token ? "Log in to join" : upcoming ? "Not started yet"
    : page.order ? "Joined" : soldOut ? "Sold out" : "Join";
}

// A queued sale: "Enter the queue" until the shopper has a ticket, then its place; the join
// button only once admitted, with what is left of the admission.
function renderQueue(s, upcoming, soldOut, ended) {
  const q = page.queue;
  const entered = !!page.ticket;
  const enter = document.getElementById("enter");
  show("enter", !entered && !page.order);
  enter.disabled = !page.token || soldOut || ended || page.entering;
  enter.textContent = !page.token ? "Log in to enter the queue"
    : page.entering ? "Entering…" : soldOut ? "Sold out" : "Enter the queue";
  show("queue", entered || !!page.order);
  const people = s.queue ? `${FS.num(s.queue.waiting)} waiting · ${FS.num(s.queue.entrants)} entered` : "";
  FS.text("queue-people", people);
  let state = q ? q.state : entered ? "waiting" : null;
  let left = null;
  if (q && q.state === "admitted") {
    left = Date.parse(q.join_expires_at) - Date.now();
    if (left <= 0 && !page.order) state = "expired"; // the window ran out on this clock
  }
  const stateEl = document.getElementById("queue-state");
  stateEl.dataset.state = state || "";
  document.body.dataset.queue = state || "";
  stateEl.textContent = page.order ? "You joined: your order is below."
    : !q && entered ? "Finding your place…" : QUEUE_TEXT[state] || "";
  const waiting = !!q && q.state === "waiting" && !page.order;
  show("queue-place", waiting);
  if (waiting) {
    FS.text("queue-position", FS.num(q.position));
    FS.text("queue-ahead", FS.num(q.ahead));
    FS.text("queue-wait", q.estimated_wait_s === null ? "–" : countdown(q.estimated_wait_s * 1000));
  }
  const admitted = state === "admitted" && !soldOut && !ended;
  const join = document.getElementById("join");
  show("join", admitted || !!page.order);
  join.disabled = !admitted || !!page.order || upcoming;
  join.textContent = page.order ? "Joined" : "Join";
  show("join-window", admitted && !page.order);
  show("join-hint", entered && !admitted && !page.order && (state === "waiting" || state === "lottery"));
  if (admitted) FS.text("join-left", countdown(left));
}

async function join() {
  FS.text("message", "");
  const key = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)).slice(0, 64);
  document.getElementById("join").disabled = true;
  let path = `/api/v1/flash-sales/${SALE_ID}/join`;
  const headers = { "Idempotency-Key": key };
  const q = page.queue;
  if (page.sale && page.sale.mode === "queued" && q && q.join_token) {
    // The admission's own join URL: accepted whether or not the sale sets hidden_join_path
    // (the X-Join-Token header is refused when it does), see gateway/routes/flashsales.py.
    path = q.join_path || path;
    if (!q.join_path) headers["X-Join-Token"] = q.join_token;
  }
  const r = await FS.api("POST", path, page.token, { quantity: 1 }, headers);
  if (r.status === 202) {
    setOrder(r.data.order_id, r.data.status, r.data.payment_deadline);
  } else if (r.status === 401) {
    logout();
  } else {
    if (r.env && r.env.error === "ADMISSION_EXPIRED" && q) q.state = "expired";
    FS.text("message", (r.env && r.env.message) || `refused (${r.status})`);
  }
  renderSale();
}

// The proof of work a queued sale may ask for on enter: a solution whose
// SHA-256("<challenge>:<solution>") starts with `difficulty` zero bits (flashsale/waitingroom/
// signing.py). WebCrypto hashes a batch of candidates at a time; 16 bits is ~65,000 hashes.
async function solve(challenge, difficulty) {
  if (!(window.crypto && crypto.subtle)) throw new Error("this page needs HTTPS to enter the queue");
  const enc = new TextEncoder();
  const zeroBits = (buf) => {
    const b = new Uint8Array(buf);
    let bits = 0;
    for (const byte of b) {
      if (byte === 0) { bits += 8; continue; }
      return bits + Math.clz32(byte) - 24;
    }
    return bits;
  };
  const BATCH = 1024;
  for (let n = 0; ; n += BATCH) {
    const tries = [];
    for (let i = n; i < n + BATCH; i++) {
      tries.push(crypto.subtle.digest("SHA-256", enc.encode(`${challenge}:${i.toString(16)}`)));
    }
    const digests = await Promise.all(tries);
    for (let i = 0; i < BATCH; i++) {
      if (zeroBits(digests[i]) >= difficulty) return (n + i).toString(16);
    }
  }
}

function deviceId() {
  let id = localStorage.getItem(DEVICE_KEY);
  if (!id) {
    id = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
    localStorage.setItem(DEVICE_KEY, id);
  }
  return id;
}

async function enter() {
  FS.text("message", "");
  page.entering = true;
  renderSale();
  try {
    const url = `/api/v1/flash-sales/${SALE_ID}/enter`;
    const headers = { "X-Device-Id": deviceId() };
    let r = await FS.api("POST", url, page.token, {}, headers);
    if (r.status === 403 && r.env && r.env.error === "PROOF_REQUIRED") {
      const c = r.data;
      const began = performance.now();
      const solution = await solve(c.challenge, c.difficulty);
      document.body.dataset.powMs = String(Math.round(performance.now() - began));
      r = await FS.api("POST", url, page.token, { challenge: c.challenge, solution }, headers);
    }
    if (r.status === 200 || r.status === 201) {
      setTicket(r.data.ticket);
      onQueue(r.data);
    } else if (r.status === 401) {
      logout();
    } else if (r.env && r.env.error === "QUEUE_NOT_OPEN" && r.data && r.data.opens_at) {
      FS.text("message", `the queue opens at ${FS.time(r.data.opens_at)}`);
    } else {
      FS.text("message", (r.env && r.env.message) || `refused (${r.status})`);
    }
  } catch (err) {
    FS.text("message", err.message);
  } finally {
    page.entering = false;
    renderSale();
  }
}

function setTicket(ticket) {
  if (ticket === page.ticket) return;
  page.ticket = ticket;
  page.queue = null;
  if (ticket) sessionStorage.setItem(TICKET_KEY, ticket);
  else sessionStorage.removeItem(TICKET_KEY);
  follow(); // the stream again, now with (or without) the ticket
}

function onQueue(q) {
  if (q === null) return setTicket(null); // refused: the ticket is not for this sale (any more)
  page.queue = q;
  renderSale();
  // A sale with a hidden join path hands the admission to the ticket's own account only: the
  // stream (which sends no bearer) says "admitted", the poll with the bearer brings the path.
  if (q.state === "admitted" && !q.join_token && page.token && !page.asking) askAdmission();
}

async function askAdmission() {
  page.asking = true;
  try {
    const qs = `?ticket=${encodeURIComponent(page.ticket)}`;
    const r = await FS.api("GET", `/api/v1/flash-sales/${SALE_ID}/queue${qs}`, page.token);
    if (r.status === 200 && r.data.join_token) { page.queue = r.data; renderSale(); }
  } catch (err) { /* offline for a moment: the next queue event asks again */ }
  finally { page.asking = false; }
}

function follow() {
  if (page.stop) page.stop();
  page.stop = watchSale(SALE_ID, page.ticket, (sale) => { page.sale = sale; renderSale(); }, onQueue);
}

function setOrder(orderId, status, deadline) {
  page.order = orderId;
  sessionStorage.setItem(ORDER_KEY, orderId);
  show("order", true);
  FS.text("order-id", orderId);
  renderOrder({ status, payment_deadline: deadline });
}

function renderOrder(o) {
  const el = document.getElementById("order-state");
  el.textContent = STATE_TEXT[o.status] || o.status;
  el.dataset.status = o.status;
  FS.text("pay-deadline", FS.time(o.payment_deadline));
  show("pay-row", o.status === "pending_payment");
}

async function followOrder() {
  if (!page.order || !page.token) return;
  const r = await FS.api("GET", `/api/v1/orders/${page.order}`, page.token);
  if (r.status === 200) renderOrder(r.data);
}

async function pay() {
  const r = await FS.api("POST", `/api/v1/orders/${page.order}/pay`, page.token,
    { payment_method: "alipay" });
  if (r.status >= 300) return FS.text("message", (r.env && r.env.message) || "payment failed");
  const link = document.getElementById("pay-link");
  link.href = r.data.payment_url;
  show("pay-link", true);
  show("pay", false);
}

function loggedIn(token, user) {
  page.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  show("login-card", false);
  show("shop-logout", true);
  if (user) FS.text("who", `logged in as ${user.email}`);
  const order = sessionStorage.getItem(ORDER_KEY);
  if (order) setOrder(order, "queued", null);
  renderSale();
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ORDER_KEY);
  sessionStorage.removeItem(TICKET_KEY); // a ticket is the account's
  location.reload();
}

document.getElementById("shop-login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  FS.text("login-error", "");
  try {
    const data = await FS.login(document.getElementById("shop-email").value,
      document.getElementById("shop-password").value);
    loggedIn(data.token, data.user);
  } catch (err) { FS.text("login-error", err.message); }
});
document.getElementById("shop-logout").addEventListener("click", (ev) => {
  ev.preventDefault();
  logout();
});
document.getElementById("join").addEventListener("click", join);
document.getElementById("enter").addEventListener("click", enter);
document.getElementById("pay").addEventListener("click", pay);

follow();
setInterval(renderSale, 250); // the countdown
setInterval(followOrder, 1000);
if (page.token) loggedIn(page.token, null);
