// The Sana playground: a page over the public API only (GET /health, GET /info,
// POST /v1/images/generations, POST /v1/images/edits), so everything it does a client can do.
// Generations stream (server-sent events read from fetch) with previews and per-step progress;
// previews are applied at most once per animation frame and decoded by the browser off the
// main thread (blob URLs), so the page stays responsive while a run streams.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "sana.playground.apiKey";
const PREVIEWS = 2;

const ui = {
  server: $("server"), form: $("form"), prompt: $("prompt"), negative: $("negative"), size: $("size"),
  steps: $("steps"), guidance: $("guidance"), n: $("n"), seed: $("seed"), randomSeed: $("random-seed"),
  keyBox: $("key-box"), key: $("api-key"), run: $("run"), cancel: $("cancel"), status: $("status"),
  current: $("current"), gallery: $("gallery"), resultsTitle: $("results-title"),
  modeGenerate: $("mode-generate"), modeEdit: $("mode-edit"), editFields: $("edit-fields"),
  image: $("image"), maskBox: $("mask-box"), maskHelp: $("mask-help"), canvas: $("edit-canvas"),
  brush: $("brush"), brushValue: $("brush-value"), clearMask: $("clear-mask"),
  strength: $("strength"), strengthValue: $("strength-value"), strengthAuto: $("strength-auto"),
};

const state = {
  info: null,
  keyRequired: false,
  key: readKey(),
  mode: "generate",
  controller: null,
  edit: { file: null, bitmap: null, paint: null, painted: false, drawing: false, last: null, frame: 0 },
};

function readKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  } catch (_) { /* storage disabled: the key lives for this page only */ }
}

function authHeaders() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

function setStatus(text, error) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", !!error);
}

// The server's message from an error response: the OpenAI envelope, plus Retry-After.
async function errorMessage(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  const retry = res.headers.get("Retry-After");
  if (retry && !/retry/i.test(message)) message += ` (retry after ${retry} s)`;
  return `Error ${res.status}: ${message}`;
}

// ---------------------------------------------------------------- server info and API key

async function connect() {
  try {
    const health = await fetch("/health");
    if (health.ok) state.keyRequired = !!(await health.json()).api_key_required;
  } catch (err) {
    ui.server.textContent = "Cannot reach the server: " + err.message;
    return;
  }
  if (state.keyRequired && !state.key) {
    askForKey("This server wants an API key.");
    return;
  }
  let res;
  try {
    res = await fetch("/info", { headers: authHeaders() });
  } catch (err) {
    ui.server.textContent = "Cannot reach the server: " + err.message;
    return;
  }
  if (res.status === 401) {
    askForKey("The server refused this API key; enter a valid one.");
    return;
  }
  if (!res.ok) {
    ui.server.textContent = await errorMessage(res);
    return;
  }
  state.info = await res.json();
  ui.keyBox.hidden = !state.keyRequired;
  applyInfo(state.info);
  setStatus("");
}

function askForKey(why) {
  state.info = null;
  ui.keyBox.hidden = false;
  ui.server.textContent = why;
  ui.run.disabled = true;
  setStatus(why, true);
  ui.key.focus();
}

function saveKey() {
  const key = ui.key.value.trim();
  if (key === state.key && state.info) return;
  state.key = key;
  storeKey(key);
  connect();
}

// Sizes the model takes: the default, common aspect ratios at the default's area, and squares at
// half and twice its side, each rounded to the size multiple and kept inside the limits.
function sizeChoices(info) {
  const l = info.limits;
  const [dw, dh] = info.defaults.size.split("x").map(Number);
  const area = dw * dh;
  const round = (v) => Math.max(l.size_multiple, Math.round(v / l.size_multiple) * l.size_multiple);
  const fits = ([w, h]) => w >= l.min_width && w <= l.max_width && h >= l.min_height && h <= l.max_height;
  const out = [[dw, dh]];
  for (const [a, b] of [[1, 1], [4, 3], [3, 4], [3, 2], [2, 3], [16, 9], [9, 16]]) {
    out.push([round(Math.sqrt(area * a / b)), round(Math.sqrt(area * b / a))]);
  }
  const side = Math.sqrt(area);
  out.push([round(side / 2), round(side / 2)], [round(side * 2), round(side * 2)]);
  const seen = new Set();
  return out.filter((s) => fits(s) && !seen.has(s.join("x")) && seen.add(s.join("x")));
}

function applyInfo(info) {
  ui.server.textContent = `${info.served_model_name} · ${info.device} · ${info.dtype} · v${info.version}`;
  ui.size.replaceChildren();
  if (state.mode === "edit") ui.size.append(new Option("auto (image size)", "auto"));
  for (const [w, h] of sizeChoices(info)) {
    const label = `${w} × ${h}` + (`${w}x${h}` === info.defaults.size ? " (default)" : "");
    ui.size.append(new Option(label, `${w}x${h}`));
  }
  ui.size.selectedIndex = 0;
  ui.steps.placeholder = String(info.defaults.num_inference_steps);
  ui.steps.max = String(info.limits.max_steps);
  ui.guidance.placeholder = String(info.defaults.guidance_scale);
  ui.n.max = String(info.limits.max_n);
  ui.modeEdit.hidden = !info.limits.max_upload_bytes;
  ui.run.disabled = !!state.controller;
}

// ---------------------------------------------------------------- modes and the edit canvas

function setMode(mode) {
  state.mode = mode;
  ui.modeGenerate.setAttribute("aria-pressed", String(mode === "generate"));
  ui.modeEdit.setAttribute("aria-pressed", String(mode === "edit"));
  ui.editFields.hidden = mode !== "edit";
  ui.run.textContent = mode === "edit" ? "Edit" : "Generate";
  if (state.info) applyInfo(state.info);
}

async function loadImage() {
  const file = ui.image.files[0];
  const e = state.edit;
  e.file = null;
  if (!file) return;
  const limit = state.info && state.info.limits.max_upload_bytes;
  if (limit && file.size > limit) {
    setStatus(`The image is ${(file.size / 1048576).toFixed(1)} MiB; this server takes at most ${(limit / 1048576).toFixed(0)} MiB.`, true);
    return;
  }
  try {
    e.bitmap = await createImageBitmap(file);
  } catch (_) {
    setStatus("This file is not an image the browser can read (PNG, JPEG or WebP).", true);
    return;
  }
  e.file = file;
  ui.canvas.width = e.bitmap.width;
  ui.canvas.height = e.bitmap.height;
  ui.canvas.classList.toggle("pixel", e.bitmap.width < 256);
  e.paint = document.createElement("canvas");
  e.paint.width = e.bitmap.width;
  e.paint.height = e.bitmap.height;
  e.painted = false;
  ui.maskBox.hidden = false;
  ui.maskHelp.hidden = false;
  drawEditCanvas();
  setStatus("");
}

function drawEditCanvas() {
  const e = state.edit;
  e.frame = 0;
  if (!e.bitmap) return;
  const ctx = ui.canvas.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(e.bitmap, 0, 0);
  ctx.globalAlpha = 0.55;
  ctx.drawImage(e.paint, 0, 0);
  ctx.globalAlpha = 1;
}

function canvasPoint(event) {
  const rect = ui.canvas.getBoundingClientRect();
  const scale = ui.canvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
}

function paintTo(event) {
  const e = state.edit;
  const p = canvasPoint(event);
  const ctx = e.paint.getContext("2d");
  ctx.strokeStyle = ctx.fillStyle = "#ff2bd6";
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.lineWidth = Number(ui.brush.value) * p.scale;
  ctx.beginPath();
  const from = e.last || p;
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(p.x + 0.01, p.y);
  ctx.stroke();
  e.last = p;
  e.painted = true;
  if (!e.frame) e.frame = requestAnimationFrame(drawEditCanvas);
}

// The mask the edits endpoint takes: the image's size, opaque where kept, transparent where painted.
function maskBlob() {
  const e = state.edit;
  const mask = document.createElement("canvas");
  mask.width = e.paint.width;
  mask.height = e.paint.height;
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.width, mask.height);
  ctx.globalCompositeOperation = "destination-out";
  ctx.drawImage(e.paint, 0, 0);
  return new Promise((resolve) => mask.toBlob(resolve, "image/png"));
}

// ---------------------------------------------------------------- requests

function numberField(input) {
  const v = input.value.trim();
  return v === "" ? undefined : Number(v);
}

const MAX_SEED = 18446744073709551615n;

// Seeds are u64: kept as decimal strings, since JavaScript numbers are exact only to 2^53.
function seedField() {
  const v = ui.seed.value.trim();
  if (ui.randomSeed.checked || v === "") return undefined;
  if (!/^\d+$/.test(v) || BigInt(v) > MAX_SEED) {
    throw new Error(`The seed must be a whole number from 0 to ${MAX_SEED}.`);
  }
  return BigInt(v).toString();
}

function commonParams() {
  const p = { prompt: ui.prompt.value.trim(), n: numberField(ui.n) || 1, size: ui.size.value };
  const negative = ui.negative.value.trim();
  if (negative) p.negative_prompt = negative;
  const steps = numberField(ui.steps);
  if (steps !== undefined) p.num_inference_steps = steps;
  const guidance = numberField(ui.guidance);
  if (guidance !== undefined) p.guidance_scale = guidance;
  const seed = seedField();
  if (seed !== undefined) p.seed = seed;
  return p;
}

// JSON of a request whose `seed` (a decimal string) is written as an exact number.
function requestJson(fields) {
  const { seed, ...rest } = fields;
  const text = JSON.stringify(rest);
  return seed === undefined ? text : text.slice(0, -1) + `,"seed":${seed}}`;
}

function shellQuote(s) {
  return "'" + String(s).replace(/'/g, "'\\''") + "'";
}

// The request as sent: method, URL, headers (the key as $SANA_API_KEY) and body.
async function buildRequest() {
  const params = commonParams();  // throws on a bad seed
  const stream = { stream: true, partial_images: Math.min(PREVIEWS, state.info.limits.max_partial_images), progress: true };
  const origin = location.origin;
  const auth = state.key ? ` \\\n  -H "Authorization: Bearer $SANA_API_KEY"` : "";
  if (state.mode === "generate") {
    const body = requestJson({ ...params, ...stream });
    return {
      url: "/v1/images/generations",
      init: { method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body },
      params,
      curl: `curl -N ${origin}/v1/images/generations${auth} \\\n  -H "Content-Type: application/json" \\\n  -d ${shellQuote(body)}`,
    };
  }
  const e = state.edit;
  if (!e.file) throw new Error("Choose an image to edit first.");
  const form = new FormData();
  const fields = [];
  const add = (name, value) => { form.append(name, String(value)); fields.push(`-F ${shellQuote(`${name}=${value}`)}`); };
  form.append("image", e.file, e.file.name);
  fields.push(`-F ${shellQuote(`image=@${e.file.name}`)}`);
  let mask = null;
  if (e.painted) {
    mask = await maskBlob();
    form.append("mask", mask, "mask.png");
    fields.push("-F 'mask=@mask.png'");
  }
  for (const [k, v] of Object.entries(params)) add(k, v);
  if (!ui.strengthAuto.checked) { params.strength = Number(ui.strength.value); add("strength", params.strength); }
  for (const [k, v] of Object.entries(stream)) add(k, v);
  return {
    url: "/v1/images/edits",
    init: { method: "POST", headers: authHeaders(), body: form },
    params: { ...params, image: e.file.name, mask: mask ? "painted" : "none" },
    mask,
    curl: `curl -N ${origin}/v1/images/edits${auth} \\\n  ` + fields.join(" \\\n  "),
  };
}

// Server-sent events from a fetch response: calls onEvent(type, data, raw) for each event.
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(type, JSON.parse(data.join("\n")), data.join("\n"));
    }
  }
}

function b64Blob(b64, format) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type: "image/" + (format || "png") });
}

// ---------------------------------------------------------------- slots (running) and cards (done)

function makeSlot(index, size) {
  const slot = document.createElement("figure");
  slot.className = "slot";
  slot.dataset.index = String(index);
  const img = document.createElement("img");
  img.alt = "";  // no preview yet: an empty frame, not a broken-image icon
  slot.setAttribute("aria-label", `Image ${index + 1}`);
  setAspect(img, size);
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.setAttribute("aria-label", `Progress of image ${index + 1}`);
  const caption = document.createElement("figcaption");
  caption.className = "muted";
  caption.textContent = "Queued…";
  slot.append(img, bar, caption);
  ui.current.append(slot);
  return { slot, img, bar, caption, pending: null, url: null, frame: 0, previews: 0 };
}

function setAspect(img, size) {
  const [w, h] = String(size).split("x").map(Number);
  if (w && h) {
    img.style.setProperty("--ar", `${w} / ${h}`);
    img.classList.toggle("pixel", w < 256);
  }
}

// Shows the newest preview of a slot, once per frame; older ones that arrive meanwhile are dropped.
function showPreview(s, blob) {
  s.pending = blob;
  if (s.frame) return;
  s.frame = requestAnimationFrame(() => {
    s.frame = 0;
    const url = URL.createObjectURL(s.pending);
    s.pending = null;
    const old = s.url;
    s.url = url;
    s.img.src = url;
    s.img.alt = `Image ${Number(s.slot.dataset.index) + 1}: preview ${s.previews}`;
    s.img.dataset.preview = String(s.previews);
    if (old) URL.revokeObjectURL(old);
  });
}

// Cards of one run keep the run's image order; newer runs come first.
function addCard(blob, event, request, seconds, after) {
  const card = document.createElement("article");
  card.className = "card";
  const url = URL.createObjectURL(blob);
  const img = document.createElement("img");
  img.src = url;
  img.alt = request.params.prompt;
  img.className = "result";
  img.dataset.seed = String(event.seed);
  setAspect(img, event.size);
  const dl = document.createElement("dl");
  const rows = [
    ["Prompt", request.params.prompt],
    ["Negative", request.params.negative_prompt],
    ["Mode", request.url.endsWith("edits") ? `edit (${request.params.image}, mask ${request.params.mask})` : "generate"],
    ["Strength", request.params.strength],
    ["Size", event.size],
    ["Steps", request.params.num_inference_steps ?? `${state.info.defaults.num_inference_steps} (default)`],
    ["Guidance", request.params.guidance_scale ?? `${state.info.defaults.guidance_scale} (default)`],
    ["Seed", event.seed + (request.params.seed === undefined ? " (random)" : "")],
    ["Time", `${seconds.toFixed(1)} s`],
  ];
  for (const [k, v] of rows) {
    if (v === undefined || v === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dl.append(dt, dd);
  }
  const actions = document.createElement("div");
  actions.className = "row";
  const download = document.createElement("a");
  download.href = url;
  download.download = `sana-${event.seed}.${event.output_format || "png"}`;
  download.textContent = "Download";
  download.className = "button";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.textContent = "Copy as curl";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse seed";
  reuse.addEventListener("click", () => {
    ui.randomSeed.checked = false;
    ui.seed.disabled = false;
    ui.seed.value = String(event.seed);
    ui.seed.focus();
  });
  const curlBox = document.createElement("textarea");
  curlBox.readOnly = true;
  curlBox.hidden = true;
  curlBox.rows = 5;
  curlBox.value = request.curl;
  curlBox.setAttribute("aria-label", "The request as a curl command");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(request.curl);
      copy.textContent = "Copied";
      setTimeout(() => { copy.textContent = "Copy as curl"; }, 1500);
    } catch (_) {
      curlBox.hidden = false;
      curlBox.select();
      setStatus("The clipboard is not available here: the command is selected below the image, copy it with Ctrl+C.");
    }
  });
  actions.append(download, copy, reuse);
  if (request.mask) {
    const mask = document.createElement("a");
    mask.href = URL.createObjectURL(request.mask);
    mask.download = "mask.png";
    mask.textContent = "Mask";
    mask.className = "button";
    actions.append(mask);
  }
  card.append(img, dl, actions, curlBox);
  if (after && after.isConnected) after.after(card); else ui.gallery.prepend(card);
  ui.resultsTitle.hidden = false;
  return card;
}

// ---------------------------------------------------------------- a run

async function run() {
  if (state.controller) return;
  if (!state.info) {
    setStatus(state.keyRequired ? "Enter the API key first." : "Not connected to the server yet.", true);
    return;
  }
  if (!ui.prompt.value.trim()) {
    setStatus("Write a prompt first.", true);
    ui.prompt.focus();
    return;
  }
  let request;
  try {
    request = await buildRequest();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  const controller = new AbortController();
  state.controller = controller;
  ui.run.disabled = true;
  ui.cancel.disabled = false;
  ui.current.replaceChildren();
  const n = request.params.n;
  const size = request.params.size === "auto" ? "" : request.params.size;
  const slots = Array.from({ length: n }, (_, i) => makeSlot(i, size));
  const started = performance.now();
  const prefix = request.url.endsWith("edits") ? "image_edit" : "image_generation";
  let done = 0;
  let lastCard = null;
  const seeds = [];
  setStatus(n > 1 ? `Running ${n} images…` : "Running…");
  try {
    const res = await fetch(request.url, { ...request.init, signal: controller.signal });
    if (!res.ok) {
      if (res.status === 401) askForKey("The server refused the API key; enter a valid one.");
      throw new Error(await errorMessage(res));
    }
    let failure = null;
    await readEvents(res, (type, data, raw) => {
      if (type === `${prefix}.progress`) {
        for (const s of slots) {
          if (s.done) continue;
          s.bar.value = data.step / data.steps;
          s.caption.textContent = `Step ${data.step} of ${data.steps}`;
        }
      } else if (type === `${prefix}.partial_image`) {
        const s = slots[data.image_index];
        if (!s) return;
        s.previews += 1;
        setAspect(s.img, data.size);
        showPreview(s, b64Blob(data.b64_json, data.output_format));
      } else if (type === `${prefix}.completed`) {
        // The seed exactly as sent (a u64 may exceed what a JavaScript number holds).
        const exact = /"seed":\s*(\d+)/.exec(raw);
        data.seed = exact ? exact[1] : String(data.seed);
        const s = slots[data.image_index];
        if (s) {
          s.done = true;
          if (s.frame) cancelAnimationFrame(s.frame);
          if (s.url) URL.revokeObjectURL(s.url);
          s.slot.remove();
        }
        done += 1;
        seeds[data.image_index] = data.seed;
        lastCard = addCard(b64Blob(data.b64_json, data.output_format), data, request,
          (performance.now() - started) / 1000, lastCard);
      } else if (type === "error") {
        failure = data.error ? data.error.message : "the generation failed";
      }
    });
    if (failure) throw new Error("Error: " + failure);
    if (done < n) throw new Error(`The stream ended after ${done} of ${n} images.`);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const seedText = seeds.length === 1 ? `seed ${seeds[0]}` : `seeds ${seeds.join(", ")}`;
    setStatus(`Done in ${seconds} s · ${seedText}${request.params.seed === undefined ? " (random)" : ""}`);
    if (ui.randomSeed.checked) ui.seed.value = String(seeds[0]);
    ui.current.replaceChildren();
  } catch (err) {
    for (const s of slots) {
      if (s.frame) cancelAnimationFrame(s.frame);
      s.caption.textContent = controller.signal.aborted ? "Cancelled" : "Failed";
      s.bar.value = s.bar.value || 0;
    }
    if (controller.signal.aborted) setStatus(`Cancelled after ${done} of ${n} images.`);
    else setStatus(err.message, true);
  } finally {
    state.controller = null;
    ui.run.disabled = !state.info;
    ui.cancel.disabled = true;
  }
}

// ---------------------------------------------------------------- wiring

ui.form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
ui.form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(); }
});
ui.cancel.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
ui.randomSeed.addEventListener("change", () => { ui.seed.disabled = ui.randomSeed.checked; });
ui.key.value = state.key;
ui.key.addEventListener("change", saveKey);
ui.key.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.ctrlKey && !event.metaKey) { event.preventDefault(); saveKey(); }
});
ui.modeGenerate.addEventListener("click", () => setMode("generate"));
ui.modeEdit.addEventListener("click", () => setMode("edit"));
ui.image.addEventListener("change", loadImage);
ui.brush.addEventListener("input", () => { ui.brushValue.textContent = ui.brush.value; });
ui.clearMask.addEventListener("click", () => {
  const e = state.edit;
  if (!e.paint) return;
  e.paint.getContext("2d").clearRect(0, 0, e.paint.width, e.paint.height);
  e.painted = false;
  drawEditCanvas();
});
const syncStrength = () => {
  ui.strength.disabled = ui.strengthAuto.checked;
  ui.strengthValue.textContent = ui.strengthAuto.checked ? "auto" : Number(ui.strength.value).toFixed(2);
};
ui.strength.addEventListener("input", syncStrength);
ui.strengthAuto.addEventListener("change", syncStrength);
syncStrength();
ui.canvas.addEventListener("pointerdown", (event) => {
  if (!state.edit.paint) return;
  ui.canvas.setPointerCapture(event.pointerId);
  state.edit.drawing = true;
  state.edit.last = null;
  paintTo(event);
});
ui.canvas.addEventListener("pointermove", (event) => { if (state.edit.drawing) paintTo(event); });
const stopPainting = () => { state.edit.drawing = false; state.edit.last = null; };
ui.canvas.addEventListener("pointerup", stopPainting);
ui.canvas.addEventListener("pointercancel", stopPainting);

connect();
