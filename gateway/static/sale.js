// The shopper's sale page: the sale's state once a second, the join button, the order's
// state after joining and the link to pay. Plain JavaScript, no framework.
"use strict";

const SALE_ID = Number(location.pathname.split("/").pop());
const TOKEN_KEY = "flashsale.shop.token";
const ORDER_KEY = `flashsale.shop.order.${SALE_ID}`;
const STATE_TEXT = {
  queued: "queued — being confirmed", pending_payment: "pending payment", paid: "paid",
  cancelled: "cancelled", shipped: "shipped", delivered: "delivered", completed: "completed",
  oversold: "not confirmed (no unit was left)",
};
const page = { sale: null, skew: 0, token: sessionStorage.getItem(TOKEN_KEY), order: null };

// Where the sale's state comes from. Today: a cheap public GET once a second (the worker
// answers from its in-memory copy). When the waiting room's stream lands, replace the body
// with an EventSource on /api/v1/flash-sales/{id}/events calling onState per event.
function watchSale(saleId, onState) {
  const poll = async () => {
    try {
      const r = await FS.api("GET", `/api/v1/flash-sales/${saleId}`);
      if (r.status === 200) onState(r.data, r.env);
      else if (r.status === 404) FS.text("message", "this sale does not exist");
    } catch (err) { /* offline for a moment: the next poll tries again */ }
  };
  poll();
  return setInterval(poll, 1000);
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
  FS.text("limit", `limit ${s.per_user_limit} per shopper`);
  FS.text("remaining", FS.num(s.remaining_quantity));
  FS.text("total", FS.num(s.total_quantity));
  const now = Date.now();
  const start = Date.parse(s.start_time), end = Date.parse(s.end_time);
  const upcoming = now < start;
  FS.text("countdown-label", upcoming ? "starts in" : "ends in");
  FS.text("countdown", countdown(upcoming ? start - now : end - now));
  const soldOut = s.status === "sold_out" || (!upcoming && s.remaining_quantity <= 0);
  const ended = s.status === "ended" || now >= end;
  const banner = document.getElementById("banner");
  banner.className = "banner" + (ended ? " ended" : soldOut ? " soldout" : " hidden");
  banner.textContent = ended ? "This sale has ended" : soldOut ? "Sold out" : "";
  document.body.dataset.status = ended ? "ended" : soldOut ? "sold_out" : s.status;
  const join = document.getElementById("join");
  join.disabled = !page.token || upcoming || soldOut || ended || !!page.order;
  join.textContent = !page.token ? "Log in to join" : upcoming ? "Not started yet"
    : page.order ? "Joined" : soldOut ? "Sold out" : "Join";
}

async function join() {
  FS.text("message", "");
  const key = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)).slice(0, 64);
  document.getElementById("join").disabled = true;
  const r = await FS.api("POST", `/api/v1/flash-sales/${SALE_ID}/join`, page.token,
    { quantity: 1 }, { "Idempotency-Key": key });
  if (r.status === 202) {
    setOrder(r.data.order_id, r.data.status, r.data.payment_deadline);
  } else if (r.status === 401) {
    logout();
  } else {
    FS.text("message", (r.env && r.env.message) || `refused (${r.status})`);
  }
  renderSale();
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
document.getElementById("pay").addEventListener("click", pay);

watchSale(SALE_ID, (sale) => { page.sale = sale; renderSale(); });
setInterval(renderSale, 250); // the countdown
setInterval(followOrder, 1000);
if (page.token) loggedIn(page.token, null);
