"use strict";
// kolors-trt playground: plain JavaScript against the server's own public API (no build step, no dependency).
//
//   GET  /v1/models                 the model card: sizes, defaults, and the optional features it advertises
//   GET  /v1/loras                  LoRAs (404: the server has none; the block stays hidden)
//   POST /v1/references             the reference image, uploaded once; requests then pass its id
//   POST /v1/images/generations     stream=true, partial_images=3: three previews, then the final PNG
//
// Optional blocks (sampler + guidance interval, DeepCache, LoRA) are shown only when the server advertises
// them, so the page never offers what the server cannot do.

const $ = (id) => document.getElementById(id);

const state = {
  key: null, // the API key: this page's memory only, never stored
  card: null, // the model card (GET /v1/models)
  referenceId: null, // the uploaded reference's id (POST /v1/references)
  uploading: false,
  controller: null, // AbortController of the running generation
  history: [], // {url, parameters}
  shown: -1, // index into history of the image on the stage
};

class ApiError extends Error {
  constructor(status, message, code, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

// ---- HTTP --------------------------------------------------------------------------------------------------

async function errorOf(response) {
  // OpenAI's error body {"error": {"message", "type", "param", "code"}}; anything else (a proxy's text) as text
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && error.message) return new ApiError(response.status, error.message, error.code, error.param);
  } catch (_) {
    // not JSON: the text itself
  }
  return new ApiError(response.status, text.trim() || response.statusText || "no answer", null, null);
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = Object.assign({}, opts.headers || {});
  if (state.key) opts.headers.Authorization = "Bearer " + state.key;
  const response = await fetch(path, opts);
  if (!response.ok) throw await errorOf(response);
  return response;
}

// ---- messages ----------------------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  const where = err.status ? `Error ${err.status}` : "Error";
  box.textContent = `${where}${err.code ? ` (${err.code})` : ""}: ${err.message}`;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setProgress(step, steps, label) {
  const bar = $("progress");
  bar.max = Math.max(1, steps || 1);
  bar.value = Math.min(step, bar.max);
  $("progress-label").textContent = label;
}

// ---- the model card and the optional features -----------------------------------------------------------

function askForKey(message) {
  $("key-block").hidden = false;
  $("key-hint").textContent = message;
  $("model-info").textContent = "This server needs an API key.";
  $("api-key").focus();
}

async function loadModel() {
  let card;
  try {
    card = (await (await api("/v1/models")).json()).data[0];
  } catch (err) {
    if (err.status === 401) {
      askForKey(state.key ? `The key was refused: ${err.message}` :
        "This server needs an API key. The page keeps it in memory only (never stored); every call sends it.");
    } else if (err.status === 503) {
      $("model-info").textContent = `The model is not ready yet (${err.message}); retrying…`;
      setTimeout(loadModel, 2000);
    } else {
      $("model-info").textContent = "The model card could not be read.";
      showError(err);
    }
    return;
  }
  if (state.key) $("key-hint").textContent = "Key accepted. It stays in this page's memory; every call sends it.";
  const first = state.card === null;
  state.card = card;
  const kind = card.folder_kind === "engines" ? "engine folder" : "export folder";
  $("model-info").textContent = `${card.id} · ${card.backend} · ${kind}`;
  if (first) {
    fillDefaults(card);
    samplerBlock(card);
    deepCacheBlock(card);
  }
  await loraBlock();
}

function fillDefaults(card) {
  const d = card.defaults || {};
  const select = $("size");
  select.textContent = "";
  const preferred = d.width && d.height ? `${d.width}x${d.height}` : null;
  for (const size of card.sizes || []) {
    select.add(new Option(size === preferred ? `${size} (default)` : size, size));
  }
  select.add(new Option("Custom…", "custom"));
  select.value = startingSize(card, preferred);
  showCustomSize();
  if (d.num_inference_steps != null) $("steps").value = d.num_inference_steps;
  if (d.guidance_scale != null) $("guidance").value = d.guidance_scale;
  if (d.ip_adapter_scale != null) $("ip-scale").value = d.ip_adapter_scale;
}

function startingSize(card, preferred) {
  // ONNX Runtime is this toolkit's CPU path, where a 1024x1024 image takes minutes: start small (the largest
  // offered square up to 256 px); engines start at the manifest's default size.
  const sizes = card.sizes || [];
  if (card.backend === "onnxruntime") {
    const small = sizes.find((s) => {
      const [w, h] = s.split("x").map(Number);
      return w === h && w <= 256;
    });
    if (small) {
      $("size-hint").textContent = `ONNX Runtime: ${small} preselected to finish fast on a CPU; Kolors' own ` +
        "sizes (about a megapixel) are in the list.";
      $("size-hint").hidden = false;
      return small;
    }
  }
  return preferred && sizes.includes(preferred) ? preferred : sizes.length ? sizes[0] : "custom";
}

function samplerBlock(card) {
  // "samplers": request field `scheduler`; the guidance interval ships with them (`guidance_interval`, sigmas)
  if (!Array.isArray(card.samplers) || card.samplers.length === 0) return;
  const select = $("sampler");
  const fallback = (card.defaults || {}).scheduler;
  select.add(new Option(fallback ? `server default (${fallback})` : "server default", ""));
  for (const name of card.samplers) select.add(new Option(name, name));
  $("sampler-block").hidden = false;
}

function deepCacheBlock(card) {
  // "deep_cache": true -> request field `deep_cache_interval` (int >= 1)
  if (card.deep_cache === true) $("deep-cache-block").hidden = false;
}

async function loraBlock() {
  // GET /v1/loras -> {"object": "list", "data": [{"id": name}]}; 404: no LoRA support
  let list;
  try {
    list = await (await api("/v1/loras")).json();
  } catch (err) {
    if (err.status !== 404) console.warn("GET /v1/loras:", err.message);
    $("lora-block").hidden = true;
    return;
  }
  const box = $("lora-list");
  box.textContent = "";
  const items = Array.isArray(list.data) ? list.data : [];
  items.forEach((lora, i) => {
    const row = document.createElement("div");
    row.className = "grid lora";
    const use = document.createElement("div");
    use.className = "check";
    const check = Object.assign(document.createElement("input"), { type: "checkbox", id: `lora-use-${i}` });
    check.dataset.lora = lora.id;
    const checkLabel = Object.assign(document.createElement("label"), { htmlFor: check.id, textContent: lora.id });
    use.append(check, checkLabel);
    const weightBox = document.createElement("div");
    const weight = Object.assign(document.createElement("input"), {
      type: "number", id: `lora-weight-${i}`, step: "0.05", value: "1",
    });
    const weightLabel = Object.assign(document.createElement("label"), {
      htmlFor: weight.id, textContent: `${lora.id} weight`,
    });
    weightBox.append(weightLabel, weight);
    row.append(use, weightBox);
    box.append(row);
  });
  $("lora-block").hidden = items.length === 0;
}

// ---- the request -------------------------------------------------------------------------------------------

function numberOf(id) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const value = Number(text);
  return Number.isFinite(value) ? value : null;
}

function selectedSize() {
  const value = $("size").value;
  if (value === "custom") return $("custom-size").value.trim();
  return value || "auto";
}

// Seeds are kept as digit strings, read from the server's JSON as strings and written into the request's JSON as
// digits, so none is ever rounded (the server takes 0 to 2**53 - 1, JSON's exact integers, and says so past it).
const SEED_IN_JSON = /"seed":\s*(\d+)/g;
const SEED_HOLDER = "\u0000seed\u0000";

function parseJson(text) {
  return JSON.parse(text.replace(SEED_IN_JSON, '"seed":"$1"'));
}

function jsonOf(body) {
  const seed = body.seed;
  if (typeof seed !== "string" || !/^\d+$/.test(seed)) return JSON.stringify(body);
  const text = JSON.stringify(Object.assign({}, body, { seed: SEED_HOLDER }));
  return text.replace(JSON.stringify(SEED_HOLDER), seed);
}

function requestBody() {
  // partial_images 3: the most OpenAI's API takes (its default, 0, sends no previews)
  const body = { prompt: $("prompt").value, size: selectedSize(), stream: true, partial_images: 3,
                 output_format: "png" };
  if (state.card) body.model = state.card.id;
  const negative = $("negative").value;
  if (negative.trim() !== "") body.negative_prompt = negative;
  const steps = numberOf("steps");
  if (steps !== null) body.num_inference_steps = steps;
  const guidance = numberOf("guidance");
  if (guidance !== null) body.guidance_scale = guidance;
  const seed = $("seed").value.trim();
  if (!$("seed-random").checked && seed !== "") body.seed = /^\d+$/.test(seed) ? seed : Number(seed);
  if (state.referenceId) {
    body.reference_id = state.referenceId;
    const scale = numberOf("ip-scale");
    if (scale !== null) body.ip_adapter_scale = scale;
  }
  optionalFields(body);
  return body;
}

function optionalFields(body) {
  if (!$("sampler-block").hidden) {
    if ($("sampler").value) body.scheduler = $("sampler").value;
    const low = numberOf("interval-low");
    const high = numberOf("interval-high");
    if (low !== null || high !== null) body.guidance_interval = [low, high]; // one side alone: the server says
  }
  if (!$("deep-cache-block").hidden) {
    const interval = numberOf("deep-cache");
    if (interval !== null) body.deep_cache_interval = interval;
  }
  if (!$("lora-block").hidden) {
    const lora = {};
    for (const check of $("lora-list").querySelectorAll("input[type=checkbox]")) {
      if (!check.checked) continue;
      const weight = numberOf(check.id.replace("lora-use-", "lora-weight-"));
      lora[check.dataset.lora] = weight === null ? 1 : weight;
    }
    if (Object.keys(lora).length) body.lora = lora;
  }
}

function setBusy(busy) {
  $("generate").disabled = busy || state.uploading;
  $("cancel").disabled = !busy;
  $("form").setAttribute("aria-busy", busy ? "true" : "false");
}

async function generate() {
  if (state.controller || state.uploading) return;
  clearError();
  const body = requestBody();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setProgress(0, body.num_inference_steps || 1, "Waiting for the server…");
  try {
    const response = await api("/v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: jsonOf(body),
      signal: controller.signal,
    });
    await readStream(response);
  } catch (err) {
    if (err.name === "AbortError") {
      setProgress($("progress").value, $("progress").max, "Cancelled");
    } else {
      setProgress(0, 1, "Failed");
      showError(err);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function cancel() {
  // Closing the stream is the cancellation: the server stops the request between denoising steps.
  if (state.controller) state.controller.abort();
}

async function readStream(response) {
  // Server-sent events over a POST (EventSource only does GET): "data: {json}" blocks, ": keep-alive" comments,
  // "data: [DONE]" at the end; an error after the first event comes as {"error": {...}}.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let completed = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data === "") continue;
      if (data === "[DONE]") {
        if (!completed) throw new ApiError(0, "the stream ended without an image", null, null);
        return;
      }
      const event = parseJson(data);
      if (event.error) throw new ApiError(0, event.error.message, event.error.code, event.error.param);
      if (event.type.endsWith(".partial_image")) showPreview(event);
      else if (event.type.endsWith(".completed")) {
        completed = true;
        showFinal(event);
      }
    }
  }
  if (!completed) throw new ApiError(0, "the stream ended before the image (the connection broke)", null, null);
}

// ---- images ------------------------------------------------------------------------------------------------

function bytesOf(b64) {
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

function showPreview(event) {
  const preview = $("preview");
  preview.src = `data:image/${event.output_format || "png"};base64,${event.b64_json}`;
  preview.hidden = false;
  $("result").hidden = true;
  setProgress(event.step, event.steps, `Step ${event.step} of ${event.steps}`);
}

function showFinal(event) {
  // The server's PNG already carries the parameters as text chunks: it is the download, byte for byte.
  const blob = new Blob([bytesOf(event.b64_json)], { type: `image/${event.output_format || "png"}` });
  const entry = { url: URL.createObjectURL(blob), parameters: event.parameters || {}, size: event.size };
  state.history.push(entry);
  addToHistory(entry, state.history.length - 1);
  showEntry(state.history.length - 1);
  const steps = entry.parameters.num_inference_steps || $("progress").max;
  setProgress(steps, steps, "Done");
}

function showEntry(index) {
  const entry = state.history[index];
  state.shown = index;
  const result = $("result");
  result.src = entry.url;
  result.hidden = false;
  $("preview").hidden = true;
  const p = entry.parameters;
  $("caption").textContent = `${entry.size} · seed ${p.seed}`;
  $("caption").hidden = false;
  const download = $("download");
  download.href = entry.url;
  download.download = `kolors-${p.seed}-${index + 1}.png`;
  download.hidden = false;
  $("reuse-seed").hidden = p.seed == null;
  const list = $("params");
  list.textContent = "";
  for (const [name, value] of Object.entries(p)) {
    const dt = Object.assign(document.createElement("dt"), { textContent: name });
    const dd = Object.assign(document.createElement("dd"), {
      textContent: typeof value === "object" && value !== null ? JSON.stringify(value) : String(value),
    });
    dd.dataset.param = name;
    list.append(dt, dd);
  }
  for (const button of $("history").querySelectorAll("button")) {
    button.setAttribute("aria-current", button.dataset.index === String(index) ? "true" : "false");
  }
}

function addToHistory(entry, index) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.index = String(index);
  const p = entry.parameters;
  button.setAttribute("aria-label", `Show image ${index + 1}: seed ${p.seed}, ${p.prompt || ""}`);
  const thumb = Object.assign(document.createElement("img"), { src: entry.url, alt: "" });
  button.append(thumb);
  button.addEventListener("click", () => showEntry(index));
  item.append(button);
  $("history").append(item);
}

// ---- the reference image -------------------------------------------------------------------------------------

async function setReference(file) {
  if (!file) return;
  clearError();
  clearReference();
  state.uploading = true;
  setBusy(Boolean(state.controller));
  $("reference-thumb").src = URL.createObjectURL(file);
  $("reference-id").textContent = "Uploading…";
  $("reference-view").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name || "reference.png");
  try {
    const answer = await (await api("/v1/references", { method: "POST", body: form })).json();
    state.referenceId = answer.id;
    $("reference-id").textContent = `id ${answer.id}`;
    $("ip-scale").disabled = false;
  } catch (err) {
    clearReference();
    showError(err);
  } finally {
    state.uploading = false;
    setBusy(Boolean(state.controller));
  }
}

function clearReference() {
  state.referenceId = null;
  $("reference-view").hidden = true;
  $("reference-id").textContent = "";
  $("reference-thumb").removeAttribute("src");
  $("ip-scale").disabled = true;
}

// ---- wiring ----------------------------------------------------------------------------------------------------

function showCustomSize() {
  $("custom-size-box").hidden = $("size").value !== "custom";
}

function wire() {
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("cancel").addEventListener("click", cancel);
  $("size").addEventListener("change", () => {
    showCustomSize();
    if ($("size").value === "custom") $("custom-size").focus();
  });
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
  });
  $("reuse-seed").addEventListener("click", () => {
    const p = state.history[state.shown].parameters;
    $("seed-random").checked = false;
    $("seed").disabled = false;
    $("seed").value = p.seed;
    $("seed").focus();
  });
  $("key-apply").addEventListener("click", applyKey);
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault(); // not the form's submit
      applyKey();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) cancel();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target.closest && e.target.closest("#form")) {
      e.preventDefault();
      generate();
    }
  });
  $("reference").addEventListener("change", () => setReference($("reference").files[0]));
  $("reference-clear").addEventListener("click", () => {
    clearReference();
    $("reference").value = "";
    $("reference").focus();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) setReference(file);
  });
}

function applyKey() {
  state.key = $("api-key").value.trim() || null;
  clearError();
  loadModel();
}

wire();
loadModel();
