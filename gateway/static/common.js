// Shared by the dashboard and the sale page: the API envelope, login, time formatting.
"use strict";

const FS = {
  async api(method, path, token, body, headers) {
    const h = Object.assign({}, headers || {});
    if (token) h.Authorization = "Bearer " + token;
    if (body !== undefined) h["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method, headers: h, body: body === undefined ? undefined : JSON.stringify(body),
    });
    let env = null;
    try { env = await resp.json(); } catch (e) { env = null; }
    return { status: resp.status, env: env, data: env ? env.data : null };
  },

  async login(email, password) {
    const r = await FS.api("POST", "/api/v1/auth/login", null, { login: email, password });
    if (r.status !== 200) throw new Error((r.env && r.env.message) || "login failed");
    return r.data;
  },

  time(iso) {
    return iso ? new Date(iso).toLocaleString([], { dateStyle: "short", timeStyle: "medium" }) : "–";
  },

  money(cents) {
    return (cents / 100).toLocaleString([], { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  },

  num(v, digits) {
    if (v === null || v === undefined) return "–";
    return Number(v).toLocaleString([], { maximumFractionDigits: digits === undefined ? 0 : digits });
  },

  text(id, value) {
    const el = document.getElementById(id);
    if (el) el.textContent = value;
  },

  // Server-sent events over fetch (so the token goes in a header, not in the URL).
  // Calls onEvent(name, data) per event; resolves when the stream ends.
  async readEvents(url, token, onEvent, signal) {
    const resp = await fetch(url, { headers: { Authorization: "Bearer " + token }, signal });
    if (!resp.ok) {
      let msg = "HTTP " + resp.status;
      try { msg = (await resp.json()).message; } catch (e) { /* not JSON */ }
      const err = new Error(msg);
      err.status = resp.status;
      throw err;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(name, JSON.parse(data));
      }
    }
  },
};
