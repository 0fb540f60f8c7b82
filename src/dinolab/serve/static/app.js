// dinolab serve: the demo page. Plain JavaScript, no libraries, nothing loaded from elsewhere.
// Every task is one POST to the JSON API (/v1/<task>); results render without a page reload.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { slot: 1, inputs: { 1: null, 2: null }, busy: false };  // input: {file} or {gallery}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function task() { return document.querySelector('input[name="task"]:checked').value; }

// Small pictures (a 32-px upload, its 8x8-patch PCA) are enlarged by a whole factor so that their long
// side reaches `side` px, with visible pixels (nearest neighbour: CSS image-rendering: pixelated).
const READABLE_SIDE = 256;

function fitReadable(img) {
  const side = Number(img.dataset.readable);
  img.classList.remove("pixelated");
  img.removeAttribute("width");
  const long = Math.max(img.naturalWidth, img.naturalHeight);
  if (!long || long >= side) return;
  img.width = img.naturalWidth * Math.ceil(side / long);
  img.classList.add("pixelated");
}

function readable(img, side = READABLE_SIDE) {
  if (!img.dataset.readable) img.addEventListener("load", () => fitReadable(img));
  img.dataset.readable = String(side);
  if (img.complete && img.naturalWidth) fitReadable(img);
  return img;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// A failed task leaves no result of an earlier one under its error.
function failed(message) {
  showError(message);
  const out = $("output");
  out.replaceChildren(el("p", { class: "small", text: "No result: see the message above." }));
  delete out.dataset.task;
}

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

// ------------------------------------------------------------------------------------ models

let models = [];

function describeModel() {
  const m = models.find((x) => x.name === $("model").value) || models[0];
  if (!m) return;
  const heads = [m.segmentation_head ? "segmentation head" : null, m.depth_head ? "depth head" : null]
    .filter(Boolean).join(", ");
  $("model-info").textContent = `Serving ${m.name}: ${m.source}. ViT with patch ${m.patch_size}, ` +
    `${m.depth} blocks, ${m.embed_dim}-dim features, images at ${m.short_side} px` +
    (heads ? `; ${heads}.` : "; no trained heads.");
  $("notice").textContent = m.notice || "";
  $("notice").hidden = !m.notice;
  updateAvailability(m);
}

// Tasks the server cannot run for this model (no depth head, no index ...) are disabled, with the
// server's reason beside them (GET /v1/models: models[].tasks).
function updateAvailability(m) {
  const tasks = m.tasks || {};
  for (const radio of document.querySelectorAll('input[name="task"]')) {
    const a = tasks[radio.value] || { available: true, reason: null };
    const label = radio.closest("label");
    radio.disabled = !a.available;
    label.classList.toggle("unavailable", !a.available);
    label.title = a.available ? "" : a.reason;
    label.querySelector(".why").textContent = a.available ? "" : `— ${a.reason}`;
  }
  const head = document.querySelector('#seg-mode option[value="head"]');
  const seg = tasks.segment_head || { available: true };
  head.disabled = !seg.available;
  head.textContent = seg.available ? "trained head" : "trained head (none loaded)";
  if (head.disabled && $("seg-mode").value === "head") $("seg-mode").value = "auto";
  const checked = document.querySelector('input[name="task"]:checked');
  if (checked && checked.disabled) document.querySelector('input[name="task"][value="pca"]').checked = true;
}

async function loadModels() {
  try {
    const info = await getJSON("/v1/models");
    models = info.models;
    const select = $("model");
    select.replaceChildren(...models.map((m) => el("option", { value: m.name, text: m.name })));
    select.value = info.default;
    describeModel();
    state.index = info.index;
    state.limits = info.limits;
    updateTaskNote();
  } catch (e) {
    $("model-info").textContent = `cannot reach the server: ${e.message}`;
  }
}

// ------------------------------------------------------------------------------------ inputs

function setSlot(n) {
  state.slot = n;
  for (const i of [1, 2]) $(`slot${i}`).classList.toggle("active", i === n);
}

function setInput(n, input) {
  state.inputs[n] = input;
  const img = $(`preview${n}`);
  if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
  if (input.file) {
    const url = URL.createObjectURL(input.file);
    img.dataset.blob = url;
    img.src = url;
    $(`name${n}`).textContent = input.file.name;
  } else {
    delete img.dataset.blob;
    img.src = `/v1/gallery/${encodeURIComponent(input.gallery)}?size=256`;
    $(`name${n}`).textContent = input.gallery;
  }
  readable(img, 160);
  img.hidden = false;
  $(`slot${n}`).classList.add("filled");
  showError("");
  if (task() === "match" && n === 1 && !state.inputs[2]) setSlot(2);
}

function wireSlot(n) {
  const slot = $(`slot${n}`);
  const file = $(`file${n}`);
  slot.addEventListener("click", () => setSlot(n));
  slot.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") file.click(); });
  file.addEventListener("change", () => { if (file.files[0]) setInput(n, { file: file.files[0] }); });
  slot.addEventListener("dragover", (e) => { e.preventDefault(); slot.classList.add("drag"); });
  slot.addEventListener("dragleave", () => slot.classList.remove("drag"));
  slot.addEventListener("drop", (e) => {
    e.preventDefault();
    slot.classList.remove("drag");
    const f = e.dataTransfer.files[0];
    if (f) { setSlot(n); setInput(n, { file: f }); }
  });
}

async function loadGallery() {
  try {
    const items = await getJSON("/v1/gallery");
    $("gallery").replaceChildren(...items.map((g) => {
      const b = el("button", { type: "button", class: "thumb", title: g.title, "data-id": g.id });
      b.append(el("img", { src: `${g.url}?size=128`, alt: "", loading: "lazy" }),
        el("span", { class: "caption", text: g.title }));
      b.addEventListener("click", () => setInput(state.slot, { gallery: g.id }));
      return b;
    }));
  } catch (e) {
    $("gallery").textContent = `gallery unavailable: ${e.message}`;
  }
}

// ------------------------------------------------------------------------------------ tasks

function updateTaskNote() {
  const t = task();
  for (const box of document.querySelectorAll(".options")) box.hidden = box.dataset.for !== t;
  $("slot2").hidden = t !== "match";
  if (t !== "match") setSlot(1);
  const m = models.find((x) => x.name === $("model").value) || {};
  const notes = {
    pca: "The first principal component of the patch features separates foreground from background; the next three become RGB.",
    segment: m.segmentation_head ? "Uses the model's trained segmentation head (class names in the legend)."
      : "No trained head: patches are clustered into segments (k-means of the features).",
    depth: m.depth_head ? "Uses the model's depth head (bright = near)." : "This model has no depth head; the server will say how to add one.",
    search: state.index ? `Searches an index of ${state.index.count} images.` : "No index loaded; the server will say how to build one.",
    match: "Mutual nearest neighbours between the patches of two images.",
  };
  $("task-note").textContent = notes[t] || "";
}

function formFor(t) {
  const form = new FormData();
  const add = (n, fileKey, galleryKey) => {
    const input = state.inputs[n];
    if (!input) return false;
    if (input.file) form.append(fileKey, input.file); else form.append(galleryKey, input.gallery);
    return true;
  };
  if (!add(1, "image", "gallery")) throw new Error("Choose an image first (drop one, pick a file, or click a sample photo).");
  if (t === "match" && !add(2, "image2", "gallery2")) throw new Error("Matching needs a second image: fill the second slot.");
  return form;
}

function queryFor(t) {
  const q = new URLSearchParams({ model: $("model").value });
  if (t === "pca") { q.set("foreground", $("pca-foreground").value); q.set("threshold", $("pca-threshold").value); }
  if (t === "segment") { q.set("mode", $("seg-mode").value); q.set("segments", $("seg-k").value); }
  if (t === "search") q.set("k", $("search-k").value);
  if (t === "match") { q.set("foreground", $("match-fg").checked); q.set("max_matches", $("match-max").value); }
  return q;
}

function errorText(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return `the server answered HTTP ${status}`;
}

async function run() {
  if (state.busy) return;
  const t = task();
  showError("");
  let form;
  try { form = formFor(t); } catch (e) { failed(e.message); return; }
  state.busy = true;
  $("run").disabled = true;
  $("busy").hidden = false;
  $("output").setAttribute("aria-busy", "true");
  try {
    const r = await fetch(`/v1/${t}?${queryFor(t)}`, { method: "POST", body: form });
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON: reported below */ }
    if (!r.ok) { failed(errorText(body, r.status)); return; }
    render(t, body);
  } catch (e) {
    failed(`request failed: ${e.message}`);
  } finally {
    state.busy = false;
    $("run").disabled = false;
    $("busy").hidden = true;
    $("output").removeAttribute("aria-busy");
  }
}

// ------------------------------------------------------------------------------------ rendering

function figure(src, caption, cls = "result-img") {
  const f = el("figure");
  f.append(readable(el("img", { src, alt: caption, class: cls })), el("figcaption", { text: caption }));
  return f;
}

const png = (b64) => `data:image/png;base64,${b64}`;

function inputFigure() {
  return figure($("preview1").src, "input", "input-img");
}

function legend(entries) {
  const list = el("ul", { class: "legend" });
  for (const e of entries) {
    const sw = el("span", { class: "swatch" });
    sw.style.backgroundColor = e.color;
    list.append(el("li", {}, sw, `${e.name} — ${(100 * e.fraction).toFixed(1)}%`));
  }
  return list;
}

function meta(body, extra = "") {
  return el("p", { class: "small", text: `${body.model} · grid ${(body.grid || []).join("×")} · ${body.timing_ms} ms${extra}` });
}

function render(t, body) {
  const out = $("output");
  const row = el("div", { class: "row" });
  const parts = [row];
  if (t === "pca") {
    row.append(inputFigure(), figure(png(body.png), "PCA colours"), figure(png(body.mask_png), "foreground (PC1)"));
    parts.push(meta(body, ` · foreground ${(100 * body.foreground_fraction).toFixed(0)}% of patches`));
  } else if (t === "segment") {
    row.append(figure(png(body.png), `segmentation (${body.mode})`), figure(png(body.mask_png), "labels"));
    parts.push(legend(body.legend), meta(body, body.head ? ` · head ${body.head}` : ""));
  } else if (t === "depth") {
    row.append(inputFigure(), figure(png(body.png), "depth (bright = near)"));
    parts.push(meta(body, ` · ${body.min_depth.toFixed(2)}–${body.max_depth.toFixed(2)} m, mean ${body.mean_depth.toFixed(2)} m`));
  } else if (t === "search") {
    row.append(inputFigure());
    const grid = el("ol", { class: "neighbours" });
    for (const n of body.neighbours) {
      const li = el("li");
      if (n.thumbnail) li.append(readable(el("img", { src: n.thumbnail, alt: n.id, class: "result-img" }), 128));
      li.append(el("span", { class: "small", text: `${n.rank}. ${n.id} (${n.score.toFixed(3)})` }));
      grid.append(li);
    }
    parts.push(grid, meta(body, ` · index of ${body.index_size} (${body.index_model || "model unknown"})`));
    if (body.warning) parts.push(el("p", { class: "notice", text: body.warning }));
  } else if (t === "match") {
    row.append(figure(png(body.png), `${body.n_matches} mutual nearest neighbours (best ${body.matches.length} drawn)`));
    parts.push(el("p", { class: "small", text: `${body.model} · grids ${body.grid1.join("×")} and ${body.grid2.join("×")} · ${body.timing_ms} ms` }));
  }
  out.replaceChildren(...parts);
  out.dataset.task = t;
}

// ------------------------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  wireSlot(1);
  wireSlot(2);
  for (const r of document.querySelectorAll('input[name="task"]')) r.addEventListener("change", updateTaskNote);
  $("model").addEventListener("change", () => { describeModel(); updateTaskNote(); });
  $("seg-k").addEventListener("input", () => { $("seg-k-out").textContent = $("seg-k").value; });
  $("run").addEventListener("click", run);
  loadModels();
  loadGallery();
});
