// monoscope serve: the feature map, "try your own text", the ablation effect and the steering playground.
// Every string from the server is put on the page with textContent, never as HTML.
"use strict";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

async function postJSON(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const doc = await r.json().catch(() => ({ detail: r.statusText }));
  if (!r.ok) throw new Error(typeof doc.detail === "string" ? doc.detail : JSON.stringify(doc.detail));
  return doc;
}

// ------------------------------------------------------------------------------------------ feature map
function initMap(canvas) {
  const tip = document.getElementById("maptip");
  const note = document.getElementById("map-note");
  const base = canvas.dataset.base;
  let pts = [], regions = [], bx = [0, 1, 0, 1];
  let scale = 1, ox = 0, oy = 0, drag = null, moved = false, hover = -1;
  const W = canvas.width, H = canvas.height, pad = 20;
  const sx = (x) => pad + (x - bx[0]) / ((bx[1] - bx[0]) || 1) * (W - 2 * pad);
  const sy = (y) => H - pad - (y - bx[2]) / ((bx[3] - bx[2]) || 1) * (H - 2 * pad);
  const view = (x, y) => [sx(x) * scale + ox, sy(y) * scale + oy];
  function draw() {
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, W, H);
    for (let i = 0; i < pts.length; i++) {
      const p = pts[i], [x, y] = view(p[1], p[2]);
      if (x < -2 || y < -2 || x > W + 2 || y > H + 2) continue;
      const d = p[4] || 0, t = Math.min(Math.max((Math.log10(d + 1e-9) + 6) / 5, 0), 1);
      g.fillStyle = i === hover ? "#000" : `rgba(${Math.round(40 + 215 * t)},${Math.round(90 + 20 * t)},${Math.round(200 - 200 * t)},0.75)`;
      g.fillRect(x - 1.5, y - 1.5, i === hover ? 5 : 3, i === hover ? 5 : 3);
    }
    g.font = "13px system-ui"; g.textAlign = "center";
    for (const r of regions) {
      const [x, y] = view(r.x, r.y);
      g.lineWidth = 3; g.strokeStyle = "rgba(255,255,255,0.9)"; g.strokeText(r.text, x, y);
      g.fillStyle = "#222"; g.fillText(r.text, x, y);
    }
  }
  function nearest(mx, my) {
    let best = -1, bd = 64;
    for (let i = 0; i < pts.length; i++) {
      const [x, y] = view(pts[i][1], pts[i][2]);
      const d = (x - mx) ** 2 + (y - my) ** 2;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }
  function pos(ev) {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * W / r.width, (ev.clientY - r.top) * H / r.height, ev.clientX - r.left, ev.clientY - r.top];
  }
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [mx, my] = pos(ev), f = ev.deltaY < 0 ? 1.25 : 0.8;
    ox = mx - (mx - ox) * f; oy = my - (my - oy) * f; scale *= f; draw();
  }, { passive: false });
  canvas.addEventListener("mousedown", (ev) => { drag = pos(ev); moved = false; });
  window.addEventListener("mouseup", () => { drag = null; });
  canvas.addEventListener("mousemove", (ev) => {
    const [mx, my, cx, cy] = pos(ev);
    if (drag) {
      if (Math.abs(mx - drag[0]) + Math.abs(my - drag[1]) > 2) moved = true;
      ox += mx - drag[0]; oy += my - drag[1]; drag = [mx, my]; draw(); return;
    }
    const i = nearest(mx, my);
    if (i !== hover) { hover = i; draw(); }
    if (i >= 0) {
      tip.hidden = false; tip.textContent = "#" + pts[i][0] + "  " + (pts[i][3] || "—");
      tip.style.left = (cx + 12) + "px"; tip.style.top = (cy + 12) + "px";
    } else tip.hidden = true;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; hover = -1; draw(); });
  canvas.addEventListener("click", (ev) => {
    if (moved) return;
    const [mx, my] = pos(ev), i = nearest(mx, my);
    if (i >= 0) window.location.href = base + pts[i][0];
  });
  fetch(canvas.dataset.src).then((r) => r.json()).then((doc) => {
    pts = doc.points; regions = doc.regions || []; bx = doc.bounds || bx;
    if (note) note.textContent = doc.n ? `${doc.shown} of ${doc.n} features drawn; labels name each region's most common peak tokens.` : "no map in this database (monoscope features without --no-map builds one)";
    canvas.dataset.ready = String(pts.length);
    draw();
  });
}

// ------------------------------------------------------------------------------------------ try your own text
function tokenRow(tokens, acts, scale) {
  const row = el("div", "ctx");
  const toks = el("span", "toks");
  const m = scale > 0 ? scale : Math.max(1e-9, ...acts);
  tokens.forEach((t, i) => {
    const s = el("span", "tok", t);
    const a = acts[i] || 0;
    if (a > 0) s.style.background = `rgba(255,110,0,${Math.min(a / m, 1).toFixed(3)})`;
    s.title = a.toPrecision(4);
    toks.appendChild(s);
  });
  row.appendChild(el("span", "act", Math.max(0, ...acts).toPrecision(3)));
  row.appendChild(toks);
  return row;
}

function initTry(form) {
  const out = document.getElementById("tryout");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.replaceChildren(el("p", "dim", "running the model…"));
    try {
      const doc = await postJSON(form.dataset.api, { text: form.text.value, feature: Number(form.dataset.feature), top: 10 });
      const parts = [el("h3", null, "this feature")];
      parts.push(tokenRow(doc.tokens, doc.feature.acts, Number(form.dataset.scale)));
      parts.push(el("h3", null, "top features of the text (activation ÷ max)"));
      const tab = el("table", "tryhits");
      for (const h of doc.hits) {
        const tr = el("tr");
        const td = el("td"); const a = el("a", "feat", "#" + h.feature); a.href = form.dataset.base + h.feature; td.appendChild(a);
        tr.append(td, el("td", null, h.rel === null ? "—" : h.rel.toFixed(2)), el("td", "label", h.label));
        tab.appendChild(tr);
      }
      parts.push(tab);
      for (const n of doc.notes || []) parts.push(el("p", "note", n));
      out.replaceChildren(...parts);
    } catch (e) { out.replaceChildren(el("p", "error", e.message)); }
  });
}

// ------------------------------------------------------------------------------------------ ablation effect
// Each token shaded by how much ablating the feature changes the loss of predicting it: blue where the
// feature helped (the loss rises without it), red where it hurt; the values on hover.
function initAblate(form) {
  const out = document.getElementById("ablateout");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.replaceChildren(el("p", "dim", "running the model twice…"));
    const [kind, index] = form.ctx.value.split(":");
    try {
      const doc = await postJSON(form.dataset.api, { kind, index: Number(index) });
      const d = doc.delta.filter((v) => v !== null);
      const m = Math.max(1e-9, ...d.map(Math.abs));
      const row = el("div", "ctx ablation"), toks = el("span", "toks");
      doc.tokens.forEach((t, i) => {
        const s = el("span", "tok", t), v = doc.delta[i];
        if (v !== null && v !== 0) {
          const a = Math.min(Math.abs(v) / m, 1).toFixed(3);
          s.style.background = v > 0 ? `rgba(40,110,255,${a})` : `rgba(230,40,40,${a})`;
        }
        s.title = `loss change ${v === null ? "—" : (v >= 0 ? "+" : "") + v.toPrecision(3)} nats · activation ${doc.acts[i].toPrecision(3)}`;
        s.dataset.delta = v === null ? "" : String(v);
        toks.appendChild(s);
      });
      row.append(el("span", "act", "max |Δ| " + m.toPrecision(3)), toks);
      const sum = d.reduce((a, b) => a + b, 0);
      out.replaceChildren(row, el("p", "dim", `mean loss change ${(sum / Math.max(d.length, 1)).toFixed(4)} nats per token; ` +
        `blue: the feature helped predict the token (loss rises when it is ablated), red: it hurt.`));
      form.dataset.done = "1";
    } catch (e) { out.replaceChildren(el("p", "error", e.message)); }
  });
}

// ------------------------------------------------------------------------------------------ steering
function initSteer(form) {
  const status = document.getElementById("steerstatus");
  const outs = { default: document.getElementById("out-default"), steered: document.getElementById("out-steered") };
  document.getElementById("addedit").addEventListener("click", () => {
    const first = form.querySelector(".edit");
    const copy = first.cloneNode(true);
    copy.querySelector("[name=feature]").value = "";
    document.getElementById("edits").appendChild(copy);
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const edits = [...form.querySelectorAll(".edit")].filter((d) => d.querySelector("[name=feature]").value !== "").map((d) => ({
      feature: Number(d.querySelector("[name=feature]").value),
      strength: Number(d.querySelector("[name=strength]").value),
      mode: d.querySelector("[name=mode]").value,
    }));
    const body = { edits, prompt: form.prompt.value, temperature: Number(form.temperature.value),
      seed: Number(form.seed.value), max_new_tokens: Number(form.max_new_tokens.value) };
    outs.default.textContent = ""; outs.steered.textContent = "";
    status.textContent = "generating…"; status.className = "dim";
    try {
      const r = await fetch(form.dataset.api, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      if (!r.ok) {
        const doc = await r.json().catch(() => ({ detail: r.statusText }));
        throw new Error(typeof doc.detail === "string" ? doc.detail : doc.detail.map((d) => d.loc.slice(1).join(".") + ": " + d.msg).join("; "));
      }
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const ev = JSON.parse(buf.slice(0, nl)); buf = buf.slice(nl + 1);
          if (ev.run) outs[ev.run].textContent += ev.text;
          if (ev.error) throw new Error(ev.error);
          if (ev.done) { status.textContent = "done"; form.dataset.done = "1"; }
        }
      }
    } catch (e) { status.textContent = e.message; status.className = "error"; }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const map = document.getElementById("featuremap"); if (map) initMap(map);
  const tf = document.getElementById("tryform"); if (tf) initTry(tf);
  const sf = document.getElementById("steerform"); if (sf) initSteer(sf);
  const af = document.getElementById("ablateform"); if (af) initAblate(af);
});
