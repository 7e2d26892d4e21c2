// ER-Classifier console: plain JavaScript served by the API itself (no build step, no third-party
// code, nothing fetched from elsewhere). Every request goes to this origin; the admin token lives in
// sessionStorage and travels only in the Authorization header.

const TOKEN_KEY = "erc-admin-token";
const TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];

const $ = (id) => document.getElementById(id);
const state = {
  models: [],
  model: null, // the selected model's summary (GET /v1/models)
  map: null, // its embedding map (GET /v1/models/{name}/embedding-map)
  input: null, // {blob, type, source}: what :predict and :attack get
  points: { clean: null, adversarial: null }, // embeddings to mark on the map
  predictSeq: 0,
  pollTimer: null,
};

// -- HTTP ----------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  if (!response.ok) {
    let code = "error";
    let message = `${response.status} ${response.statusText}`;
    if (type.includes("application/json")) {
      const body = await response.json();
      if (body && body.error) ({ code, message } = body.error);
    }
    throw new ApiError(response.status, code, message, response.headers.get("retry-after"));
  }
  return type.includes("application/json") ? response.json() : response.text();
}

function say(message, isError = false) {
  const el = $("status");
  el.textContent = message;
  el.classList.toggle("error", isError);
}

function describe(err) {
  if (err instanceof ApiError) return `${err.message} (${err.status} ${err.code})`;
  return String(err && err.message ? err.message : err);
}

function adminHeaders(extra = {}) {
  return { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`, ...extra };
}

const modelPath = (suffix) => `/v1/models/${encodeURIComponent(state.model.name)}${suffix}`;

// -- attacks: the audit form's list, from the registry (GET /v1/attacks) ------------------------------
async function loadAttacks() {
  const catalog = await api("/v1/attacks");
  const norm = "linf"; // the console's audits use the API's default norm
  const option = (value, text) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    return o;
  };
  const options = [option("default", `Default: ${catalog.default[norm].label}`)];
  for (const p of catalog.presets.filter((p) => p.norms.includes(norm))) {
    options.push(option(p.name, `${p.label}: ${p.description}`));
  }
  for (const a of catalog.attacks.filter((a) => a.norms.includes(norm))) {
    options.push(option(a.name, `${a.label}: ${a.description}`));
  }
  $("preset").replaceChildren(...options);
}

// -- models ------------------------------------------------------------------------------------------
function fillModelSelect() {
  $("model").replaceChildren(
    ...state.models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name;
      return option;
    }),
  );
}

async function loadModels() {
  const body = await api("/v1/models");
  state.models = body.models.filter((m) => m.ready);
  fillModelSelect();
  if (!state.models.length) {
    say("No model is ready on this server.", true);
    return;
  }
  const preferred = state.models.find((m) => m.name === body.default_model) || state.models[0];
  $("model").value = preferred.name;
  await selectModel(preferred.name);
}

// Models are loaded, unloaded and replaced on a running deployment (the repository API): the list
// follows within MODEL_POLL_MS, and a replaced or unloaded selection says so.
const MODEL_POLL_MS = 5000;
const modelKey = (models) => models.map((m) => `${m.name}@${m.version}`).join(",");

async function refreshModels() {
  try {
    const body = await api("/v1/models");
    const ready = body.models.filter((m) => m.ready);
    if (modelKey(ready) === modelKey(state.models)) return;
    const before = state.model;
    state.models = ready;
    fillModelSelect();
    if (!ready.length) {
      say("No model is ready on this server.", true);
      return;
    }
    const same = before && ready.find((m) => m.name === before.name);
    if (same) {
      $("model").value = same.name;
      if (same.version !== before.version) {
        say(`Model ${same.name} now serves version ${same.version} (was ${before.version}).`);
        await selectModel(same.name);
      } else {
        state.model = same;
      }
      return;
    }
    const next = ready.find((m) => m.name === body.default_model) || ready[0];
    if (before) say(`Model ${before.name} was unloaded; showing ${next.name}.`, true);
    $("model").value = next.name;
    await selectModel(next.name);
  } catch (err) {
    // A missed refresh is retried at the next one; predictions keep their own error messages.
  } finally {
    setTimeout(refreshModels, MODEL_POLL_MS);
  }
}

async function selectModel(name) {
  state.model = state.models.find((m) => m.name === name);
  const m = state.model;
  const eps = m.train_eps ?? 0.3;
  $("model-info").textContent =
    `${m.arch}, ${m.dataset}, ${m.method}, trained at eps ${eps.toFixed(3)}, version ${m.version}`;
  // The slider moves on the 8-bit grid; start at the grid point within the training eps.
  $("eps").value = String(Math.floor(eps * 255 + 1e-6) / 255);
  showEps();
  $("audit-eps").value = [0, eps / 2, eps].map((e) => +e.toFixed(4)).join(", ");
  state.map = null;
  state.points = { clean: null, adversarial: null };
  drawMap();
  loadMap();
  if (state.input && state.input.source === "drawing") await drawnInput();
  else if (state.input) await predict();
}

// -- drawing -----------------------------------------------------------------------------------------
const pad = $("pad");
const padCtx = pad.getContext("2d", { willReadFrequently: true });
let drawing = null; // the pointer drawing now, and its last position

function clearPad() {
  padCtx.fillStyle = "#000";
  padCtx.fillRect(0, 0, pad.width, pad.height);
}

function padPoint(event) {
  const rect = pad.getBoundingClientRect();
  return [((event.clientX - rect.left) * pad.width) / rect.width, ((event.clientY - rect.top) * pad.height) / rect.height];
}

function stroke(from, to) {
  padCtx.strokeStyle = "#fff";
  padCtx.fillStyle = "#fff";
  padCtx.lineWidth = Number($("brush").value);
  padCtx.lineCap = "round";
  padCtx.lineJoin = "round";
  padCtx.beginPath();
  if (from[0] === to[0] && from[1] === to[1]) {
    padCtx.arc(to[0], to[1], padCtx.lineWidth / 2, 0, 2 * Math.PI);
    padCtx.fill();
  } else {
    padCtx.moveTo(from[0], from[1]);
    padCtx.lineTo(to[0], to[1]);
    padCtx.stroke();
  }
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  const p = padPoint(event);
  drawing = { id: event.pointerId, last: p };
  stroke(p, p);
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing || event.pointerId !== drawing.id) return;
  const p = padPoint(event);
  stroke(drawing.last, p);
  drawing.last = p;
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, (event) => {
    if (!drawing || event.pointerId !== drawing.id) return;
    drawing = null;
    drawnInput();
  });
}

// The drawing as the model's input: H x W greyscale PNG, optionally centred like MNIST (the digit's
// bounding box scaled into a 20/28 box, then shifted so its centre of mass is the image centre).
function blackCanvas(w, h) {
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  return [canvas, ctx];
}

function toModelInput() {
  const [, h, w] = state.model.input_shape;
  const [out, ctx] = blackCanvas(w, h);
  const box = inkBox();
  if (!box) return null;
  if (!$("center").checked) {
    ctx.drawImage(pad, 0, 0, pad.width, pad.height, 0, 0, w, h);
    return out;
  }
  const scale = (0.714 * Math.min(w, h)) / Math.max(box.w, box.h);
  const dw = box.w * scale;
  const dh = box.h * scale;
  const [tmp, t] = blackCanvas(w, h);
  t.drawImage(pad, box.x, box.y, box.w, box.h, (w - dw) / 2, (h - dh) / 2, dw, dh);
  const px = t.getImageData(0, 0, w, h).data;
  let mass = 0;
  let cx = 0;
  let cy = 0;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = px[4 * (y * w + x)];
      mass += v;
      cx += v * x;
      cy += v * y;
    }
  }
  const dx = mass ? Math.round((w - 1) / 2 - cx / mass) : 0;
  const dy = mass ? Math.round((h - 1) / 2 - cy / mass) : 0;
  ctx.drawImage(tmp, dx, dy);
  return out;
}

function inkBox() {
  const { width, height } = pad;
  const px = padCtx.getImageData(0, 0, width, height).data;
  let x0 = width;
  let y0 = height;
  let x1 = -1;
  let y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (px[4 * (y * width + x)] > 24) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return x1 < 0 ? null : { x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1 };
}

async function drawnInput() {
  if (!state.model) return;
  const canvas = toModelInput();
  if (!canvas) return;
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  await setInput({ blob, type: "image/png", source: "drawing" });
}

async function setInput(input) {
  state.input = input;
  state.points.adversarial = null;
  // The preview shows the exact bytes sent (a data: URL of the same blob).
  $("input-preview").src = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(input.blob);
  });
  $("input-caption").textContent =
    input.source === "upload"
      ? `uploaded ${input.name} (${input.blob.size} bytes): the server resizes it to the model's input`
      : `your drawing as the model's ${state.model.input_shape.slice(1).join("x")} input`;
  await predict();
}

// -- prediction ---------------------------------------------------------------------------------------
async function predict() {
  if (!state.input || !state.model) return;
  const seq = ++state.predictSeq;
  try {
    const body = await api(modelPath(":predict?return_embedding=true"), {
      method: "POST",
      headers: { "content-type": state.input.type },
      body: state.input.blob,
    });
    if (seq !== state.predictSeq) return; // a newer input was sent meanwhile
    showPrediction(body.predictions[0]);
    say("");
  } catch (err) {
    if (seq === state.predictSeq) say(`Prediction failed: ${describe(err)}`, true);
  }
}

function showPrediction(p) {
  const el = $("prediction");
  el.textContent = `${p.label_name}  (${(100 * p.probabilities[p.label]).toFixed(1)} %)`;
  el.dataset.label = String(p.label);
  bars($("bars"), p.probabilities, p.label);
  const t = p.typicality;
  $("typicality").textContent = t
    ? `${t.atypical ? "Atypical: unlike the training images of any class" : "Typical embedding"} ` +
      `(Mahalanobis distance ${t.mahalanobis.toFixed(2)}, prior log-density ${t.prior_log_density.toFixed(2)})`
    : "This model has no typicality score.";
  $("typicality").dataset.atypical = t ? String(t.atypical) : "";
  state.points.clean = p.embedding;
  drawMap();
}

function bars(container, probabilities, top) {
  const names = state.model.labels || probabilities.map((_, i) => String(i));
  container.dataset.probabilities = JSON.stringify(probabilities);
  container.replaceChildren(
    ...probabilities.map((p, i) => {
      const row = document.createElement("div");
      row.className = i === top ? "bar top" : "bar";
      row.setAttribute("role", "listitem");
      const name = document.createElement("span");
      name.textContent = names[i];
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${(100 * p).toFixed(2)}%`;
      track.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = `${(100 * p).toFixed(1)} %`;
      row.append(name, track, pct);
      row.setAttribute("aria-label", `${names[i]}: ${(100 * p).toFixed(1)} percent`);
      return row;
    }),
  );
}

// -- embedding map -----------------------------------------------------------------------------------
async function loadMap() {
  const name = state.model.name;
  $("map-caption").textContent = "Computing the map of the test set's embeddings...";
  try {
    const map = await api(modelPath("/embedding-map"));
    if (!state.model || state.model.name !== name) return;
    state.map = map;
    $("map-caption").textContent =
      `${map.n} ${map.dataset} test images, ${map.embed_dim}-d embeddings: ${map.method} ` +
      "(as in the audit report). Circle: your image; cross: its adversarial version.";
    legend(map.label_names);
    drawMap();
  } catch (err) {
    $("map-caption").textContent = `No map: ${describe(err)}`;
  }
}

function legend(names) {
  $("legend").replaceChildren(
    ...names.map((n, i) => {
      const item = document.createElement("span");
      const dot = document.createElement("span");
      dot.className = "swatch";
      dot.style.background = TAB10[i % 10];
      item.append(dot, document.createTextNode(n));
      return item;
    }),
  );
}

function project(z) {
  const { mean, basis } = state.map;
  let x = 0;
  let y = 0;
  for (let k = 0; k < mean.length; k++) {
    x += (z[k] - mean[k]) * basis[k][0];
    y += (z[k] - mean[k]) * basis[k][1];
  }
  return [x, y];
}

function drawMap() {
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  const map = state.map;
  if (!map) return;
  const xs = map.points.map((p) => p[0]).sort((a, b) => a - b);
  const ys = map.points.map((p) => p[1]).sort((a, b) => a - b);
  const q = (a, f) => a[Math.min(a.length - 1, Math.max(0, Math.round(f * (a.length - 1))))];
  const [x0, x1, y0, y1] = [q(xs, 0.005), q(xs, 0.995), q(ys, 0.005), q(ys, 0.995)];
  const margin = 12;
  const sx = (x) => margin + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * margin);
  const sy = (y) => height - margin - ((y - y0) / (y1 - y0 || 1)) * (height - 2 * margin);
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  ctx.globalAlpha = 0.45;
  map.points.forEach((p, i) => {
    ctx.fillStyle = TAB10[map.labels[i] % 10];
    ctx.fillRect(sx(p[0]) - 1.5, sy(p[1]) - 1.5, 3, 3);
  });
  ctx.globalAlpha = 1;
  const at = (z) => {
    const [x, y] = project(z);
    return [clamp(sx(x), 4, width - 4), clamp(sy(y), 4, height - 4)];
  };
  const { clean, adversarial } = state.points;
  if (clean && adversarial) {
    const [ax, ay] = at(clean);
    const [bx, by] = at(adversarial);
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 1.5;
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    ctx.moveTo(ax, ay);
    ctx.lineTo(bx, by);
    ctx.stroke();
    ctx.setLineDash([]);
  }
  if (clean) {
    const [x, y] = at(clean);
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#fff";
    ctx.beginPath();
    ctx.arc(x, y, 7, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#000";
    ctx.stroke();
  }
  if (adversarial) {
    const [x, y] = at(adversarial);
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#d62728";
    ctx.beginPath();
    ctx.moveTo(x - 6, y - 6);
    ctx.lineTo(x + 6, y + 6);
    ctx.moveTo(x + 6, y - 6);
    ctx.lineTo(x - 6, y + 6);
    ctx.stroke();
  }
}

// -- attack -----------------------------------------------------------------------------------------
function showEps() {
  const eps = Number($("eps").value);
  $("eps-value").textContent = `${eps.toFixed(3)} (${Math.round(eps * 255)}/255)`;
}

async function runAttack(event) {
  event.preventDefault();
  if (!state.input) {
    say("Draw a digit or upload an image first: the attack starts from it.", true);
    return;
  }
  const params = new URLSearchParams({
    eps: $("eps").value,
    steps: $("steps").value,
    restarts: $("restarts").value,
    seed: $("seed").value,
    smallest_eps: String($("smallest").checked),
    return_embedding: "true",
  });
  const button = $("run-attack");
  button.disabled = true;
  button.textContent = "Attacking...";
  $("attack-result").setAttribute("aria-busy", "true");
  say("Attacking on the server...");
  try {
    const body = await api(modelPath(`:attack?${params}`), {
      method: "POST",
      headers: { "content-type": state.input.type },
      body: state.input.blob,
    });
    await showAttack(body);
    say("");
  } catch (err) {
    const wait = err instanceof ApiError && err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
    say(`Attack failed: ${describe(err)}.${wait}`, true);
  } finally {
    button.disabled = false;
    button.textContent = "Attack";
    $("attack-result").removeAttribute("aria-busy");
  }
}

async function showAttack(body) {
  const r = body.results[0];
  const a = body.attack;
  $("attack-details").hidden = false;
  $("attack-hint").hidden = true;
  const verdict = $("verdict");
  verdict.textContent = r.flipped
    ? `Flipped: ${r.clean.label_name} became ${r.adversarial.label_name}`
    : `Held: still ${r.clean.label_name}`;
  verdict.className = `big ${r.flipped ? "flipped" : "held"}`;
  verdict.dataset.flipped = String(r.flipped);
  $("clean-img").src = `data:image/png;base64,${r.clean.png}`;
  $("adv-img").src = `data:image/png;base64,${r.adversarial.png}`;
  $("clean-label").textContent = r.clean.label_name;
  $("adv-label").textContent = r.adversarial.label_name;
  bars($("clean-bars"), r.clean.probabilities, r.clean.label);
  bars($("adv-bars"), r.adversarial.probabilities, r.adversarial.label);
  await drawDelta(r.clean.png, r.adversarial.png);
  const facts = [
    ["attack", `${a.label}, l_inf, seed ${a.seed}`],
    ["eps", `${a.eps.toFixed(3)} requested, ${a.eps_units}/255 = ${a.eps_effective.toFixed(4)} used`],
    ["perturbation", `l_inf ${r.perturbation.linf.toFixed(4)} (${r.perturbation.linf_units}/255), ` +
      `l_2 ${r.perturbation.l2.toFixed(3)}, ${r.perturbation.changed_values} values changed`],
  ];
  if ("smallest_flipping_eps" in r) {
    const s = r.smallest_flipping_eps;
    facts.push(["smallest flipping eps",
      s === null ? `none found up to ${a.smallest_eps_max}` : `${s.toFixed(4)} (${Math.round(s * 255)}/255)`]);
  }
  facts.push(["time", `${body.seconds.attack.toFixed(2)} s attacking, ${body.seconds.queue.toFixed(2)} s queued`]);
  $("attack-facts").replaceChildren(
    ...facts.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      if (k === "smallest flipping eps") dd.id = "smallest-eps";
      return [dt, dd];
    }),
  );
  state.points.clean = r.clean.embedding;
  state.points.adversarial = r.adversarial.embedding;
  drawMap();
}

function pixels(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const ctx = c.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0);
      resolve(ctx.getImageData(0, 0, c.width, c.height));
    };
    img.onerror = reject;
    img.src = `data:image/png;base64,${b64}`;
  });
}

// The perturbation amplified to the full grey range: mid-grey is zero, lighter adds, darker removes.
async function drawDelta(cleanB64, advB64) {
  const [c, a] = await Promise.all([pixels(cleanB64), pixels(advB64)]);
  const canvas = $("delta");
  canvas.width = c.width;
  canvas.height = c.height;
  let max = 1;
  for (let i = 0; i < c.data.length; i += 4) max = Math.max(max, Math.abs(a.data[i] - c.data[i]));
  const out = new ImageData(c.width, c.height);
  for (let i = 0; i < c.data.length; i += 4) {
    for (let k = 0; k < 3; k++) out.data[i + k] = 128 + Math.round((127 * (a.data[i + k] - c.data[i + k])) / max);
    out.data[i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
}

// -- audits -------------------------------------------------------------------------------------------
function auditNeed(message, isError = false) {
  const el = $("audit-need");
  el.textContent = message;
  el.classList.toggle("error", isError);
}

function hasToken() {
  return Boolean(sessionStorage.getItem(TOKEN_KEY));
}

async function refreshAudits() {
  clearTimeout(state.pollTimer);
  const panel = $("audit-panel");
  $("forget-token").hidden = !hasToken();
  if (!hasToken()) {
    panel.hidden = true;
    auditNeed(
      "Audits need the admin token: the value of ERC_ADMIN_TOKEN the server was started with (make run " +
        "prints one when it starts). Enter it here; it stays in this browser tab (sessionStorage) and is " +
        "sent only in the Authorization header.",
    );
    return;
  }
  let body;
  try {
    body = await api("/admin/audits", { headers: adminHeaders() });
  } catch (err) {
    panel.hidden = true;
    if (err instanceof ApiError && err.status === 404) {
      auditNeed("This server runs without an admin token, so audits are off: start it with " +
        "ERC_ADMIN_TOKEN set (see docs/api.md).", true);
    } else if (err instanceof ApiError && err.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("forget-token").hidden = true;
      auditNeed("The server refused this admin token. Enter the value of its ERC_ADMIN_TOKEN.", true);
    } else {
      auditNeed(`Could not list audits: ${describe(err)}`, true);
      state.pollTimer = setTimeout(refreshAudits, 5000);
    }
    return;
  }
  panel.hidden = false;
  auditNeed("Signed in with the admin token (kept in this tab only).");
  // What each status allows comes from the API (statuses: its groups), never a list kept here.
  const statuses = body.statuses;
  renderAudits(body.audits, statuses);
  if (body.audits.some((a) => statuses.pending.includes(a.status))) {
    state.pollTimer = setTimeout(refreshAudits, 1000);
  }
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "estimating...";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} min ${Math.round(seconds % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function renderAudits(audits, statuses) {
  const rows = audits.map((a) => {
    const tr = document.createElement("tr");
    tr.dataset.id = a.id;
    tr.dataset.status = a.status;
    const cell = (content) => {
      const td = document.createElement("td");
      if (content instanceof Node) td.append(content);
      else td.textContent = content;
      tr.append(td);
      return td;
    };
    const code = document.createElement("code");
    code.textContent = a.id.slice(0, 8);
    code.title = a.id;
    cell(code);
    cell(a.model);
    cell(a.error ? `${a.status}: ${a.error}` : a.status).className = "audit-status";
    const progress = document.createElement("progress");
    progress.max = 1;
    const waiting = statuses.pending.includes(a.status) && !statuses.active.includes(a.status);
    const fraction = a.progress ? a.progress.fraction : waiting ? 0 : null;
    if (fraction !== null) progress.value = fraction;
    progress.setAttribute("aria-label", `progress of audit ${a.id.slice(0, 8)}`);
    const stage = document.createElement("div");
    stage.className = "muted";
    stage.textContent = a.progress ? `${(100 * a.progress.fraction).toFixed(1)} % ${a.progress.stage || ""}` : "";
    const box = document.createElement("div");
    box.append(progress, stage);
    box.className = "audit-progress";
    box.dataset.fraction = String(fraction ?? "");
    cell(box);
    cell(statuses.active.includes(a.status) && a.progress ? duration(a.progress.remaining_s) : "");
    const actions = cell("");
    if (statuses.cancellable.includes(a.status)) actions.append(actionButton("cancel", "Cancel", a.id));
    if (statuses.with_report.includes(a.status)) actions.append(actionButton("report", "Open report", a.id));
    return tr;
  });
  $("audit-table").tBodies[0].replaceChildren(...rows);
}

function actionButton(action, label, id) {
  const b = document.createElement("button");
  b.type = "button";
  b.dataset.action = action;
  b.dataset.id = id;
  b.textContent = label;
  b.setAttribute("aria-label", `${label} of audit ${id.slice(0, 8)}`);
  return b;
}

async function startAudit(event) {
  event.preventDefault();
  const eps = $("audit-eps").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (!eps.length || eps.some((e) => !Number.isFinite(e))) {
    say("The eps list must hold numbers separated by commas, e.g. 0, 0.1, 0.3.", true);
    return;
  }
  const request = {
    model: state.model.name,
    data: { source: "test", n: Number($("audit-n").value), seed: Number($("audit-seed").value) },
    eps,
  };
  // "default": the server's default suite; otherwise one preset or attack, with its defaults.
  const choice = $("preset").value;
  if (choice !== "default") request.attacks = [{ name: choice }];
  const button = $("start-audit");
  button.disabled = true;
  try {
    const body = await api("/admin/audits", {
      method: "POST",
      headers: adminHeaders({ "content-type": "application/json" }),
      body: JSON.stringify(request),
    });
    say(`Audit ${body.id.slice(0, 8)} ${body.status}.`);
  } catch (err) {
    say(`The audit was not started: ${describe(err)}`, true);
  } finally {
    button.disabled = false;
  }
  await refreshAudits();
}

async function auditAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const id = button.dataset.id;
  if (button.dataset.action === "cancel") {
    try {
      await api(`/admin/audits/${id}`, { method: "DELETE", headers: adminHeaders() });
      say(`Audit ${id.slice(0, 8)} cancelled.`);
    } catch (err) {
      say(`Could not cancel: ${describe(err)}`, true);
    }
    await refreshAudits();
  } else if (button.dataset.action === "report") {
    await openReport(id);
  }
}

// The report needs the token, which never goes into a URL: fetch it with the header, then open the
// HTML from a blob: URL in a new tab (with a link as well, should the browser block the tab).
async function openReport(id) {
  try {
    const html = await api(`/admin/audits/${id}/report`, { headers: adminHeaders() });
    const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
    const tab = window.open(url, "_blank");
    if (tab) tab.opener = null;
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = `report of audit ${id.slice(0, 8)}`;
    $("report-link").replaceChildren(document.createTextNode(tab ? "Opened in a new tab: " : "Open the "), link);
  } catch (err) {
    say(`Could not open the report: ${describe(err)}`, true);
  }
}

// -- wiring -------------------------------------------------------------------------------------------
function wire() {
  clearPad();
  $("brush").addEventListener("input", () => {
    $("brush-value").textContent = $("brush").value;
  });
  $("clear").addEventListener("click", () => {
    clearPad();
    state.input = null;
    state.points = { clean: null, adversarial: null };
    $("input-preview").removeAttribute("src");
    $("prediction").textContent = "\u2014";
    $("prediction").dataset.label = "";
    $("bars").replaceChildren();
    $("typicality").textContent = "";
    drawMap();
  });
  $("center").addEventListener("change", () => {
    if (state.input && state.input.source === "drawing") drawnInput();
  });
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (file) upload(file);
  });
  pad.addEventListener("dragover", (event) => {
    event.preventDefault();
    pad.classList.add("dragover");
  });
  pad.addEventListener("dragleave", () => pad.classList.remove("dragover"));
  pad.addEventListener("drop", (event) => {
    event.preventDefault();
    pad.classList.remove("dragover");
    const file = event.dataTransfer.files[0];
    if (file) upload(file);
  });
  $("model").addEventListener("change", () => selectModel($("model").value));
  $("eps").addEventListener("input", showEps);
  $("attack-form").addEventListener("submit", runAttack);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    refreshAudits();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    refreshAudits();
  });
  $("audit-form").addEventListener("submit", startAudit);
  $("audit-table").addEventListener("click", auditAction);
}

function upload(file) {
  clearPad();
  setInput({ blob: file, type: file.type || "application/octet-stream", source: "upload", name: file.name });
}

wire();
refreshAudits();
loadModels()
  .catch((err) => say(`Could not load the models: ${describe(err)}`, true))
  .finally(() => setTimeout(refreshModels, MODEL_POLL_MS));
loadAttacks().catch((err) => say(`Could not load the attack list: ${describe(err)}`, true));
