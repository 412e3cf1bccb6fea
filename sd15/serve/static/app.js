/*
 * sd15's web page: the form, the job (POST txt2img/img2img while polling /progress), the gallery and the
 * A1111 infotext parser behind "Reuse these settings". Plain browser JavaScript, no framework, no build step.
 *
 * Safety rule for this file: text that comes from users or from the server (prompts, infotexts, file
 * names, error messages) is only ever put into the page through textContent, value or new Option(...),
 * never as HTML, so a prompt such as <img src=x onerror=alert(1)> stays text.
 *
 * The infotext parser is exposed as window.sd15Page.parseInfotext so the browser test can check it.
 */
"use strict";

const API = "sdapi/v1/";          // relative: works at / and behind a proxy that mounts the server under a path
const POLL_MS = 250;              // /progress polling period while a job runs

// ---------------------------------------------------------------------------------------------------
// A1111 infotext: the same format sd15/pipeline/infotext.py writes and reads.
//     prompt (any number of lines)
//     Negative prompt: negative (any number of lines)
//     Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...
// A value with `,`, `:`, `"` or a newline is a JSON string; a flat {...} (civitai's Hashes) is read whole.

const NEGATIVE = "Negative prompt:";
// A key starts with a word character and may hold spaces, '-' and '/'; the value is a JSON string, a flat
// JSON object, or runs to the next comma. Text between pairs that is no pair is skipped (as A1111 does).
const PAIR = /\s*([\p{L}\p{N}_][\p{L}\p{N}_ \-/]*):\s*("(?:\\.|[^\\"])*"|\{[^{}]*\}|[^,]*)(?:,|$)/gu;

function settingsPairs(line) {
  const pairs = [];
  for (const m of line.matchAll(PAIR)) {
    const key = m[1].trim();
    let value = m[2].trim();
    if (value.length >= 2 && value[0] === '"' && value[value.length - 1] === '"') {
      try { value = JSON.parse(value); } catch (e) { /* kept as written, as A1111 does */ }
    }
    pairs.push([key, value]);
  }
  return pairs;
}

function parseInfotext(text) {
  if (typeof text !== "string") throw new TypeError("an infotext is text");
  let lines = text.replace(/\r\n/g, "\n").trimEnd().split("\n");
  let pairs = settingsPairs(lines[lines.length - 1]);
  if (pairs.length >= 3) lines = lines.slice(0, -1);   // the last line holds the settings
  else pairs = [];
  const prompt = [], negative = [];
  let inNegative = false;
  for (let line of lines) {
    if (!inNegative && line.startsWith(NEGATIVE)) {
      inNegative = true;
      line = line.slice(NEGATIVE.length);
      if (line.startsWith(" ")) line = line.slice(1);
    }
    (inNegative ? negative : prompt).push(line);
  }
  return { prompt: prompt.join("\n"), negativePrompt: negative.join("\n"), fields: Object.fromEntries(pairs) };
}

// ---------------------------------------------------------------------------------------------------
// Small DOM and API helpers.

const $ = (id) => document.getElementById(id);

/** The message to show for a failed API call: A1111's {"detail": ...} (a string, or FastAPI's list of
 *  validation errors), or its {"errors": ...} for 500s, else the HTTP status. */
function errorMessage(status, body) {
  if (body && typeof body === "object") {
    const d = body.detail;
    if (typeof d === "string" && d) return d;
    if (Array.isArray(d) && d.length) {
      return d.map((e) => {
        const where = Array.isArray(e.loc) ? e.loc.filter((p) => p !== "body").join(".") : "";
        return (where ? where + ": " : "") + (e.msg || JSON.stringify(e));
      }).join("; ");
    }
    if (typeof body.errors === "string" && body.errors) return body.errors;
    if (typeof body.error === "string" && body.error) return body.error;
  }
  return `HTTP ${status}`;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(API + path, {
      method: options.body === undefined ? "GET" : "POST",
      headers: options.body === undefined ? {} : { "Content-Type": "application/json" },
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!response.ok) throw new ApiError(response.status, `${path.split("?")[0]}: ${errorMessage(response.status, body)}`);
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function showNotice(message) {
  const box = $("notice");
  box.textContent = message;
  box.hidden = !message;
}

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(({ value, label }) => new Option(label, value, false, value === selected)));
}

const normalize = (s) => String(s).trim().toLowerCase().replace(/\+\+/g, "pp").replace(/[\s_-]/g, "");

function selectByName(select, name) {
  const want = normalize(name);
  const match = [...select.options].find((o) => normalize(o.value) === want || normalize(o.textContent) === want);
  if (match) select.value = match.value;
  return Boolean(match);
}

// ---------------------------------------------------------------------------------------------------
// The lists the form is filled from.

async function loadSamplers() {
  const samplers = await api("samplers");
  const names = samplers.map((s) => s.name);
  const preferred = names.includes("DPM++ 2M") ? "DPM++ 2M" : names[0];
  fillSelect($("sampler_name"), names.map((n) => ({ value: n, label: n })), preferred);
}

async function loadSchedulers() {
  let schedulers;
  try {
    schedulers = await api("schedulers");
  } catch (e) {
    schedulers = [];                    // older servers have none: the sampler's own schedule then
  }
  const items = schedulers.map((s) => ({ value: s.name, label: s.label || s.name }));
  if (!items.some((i) => normalize(i.value) === "automatic")) items.unshift({ value: "automatic", label: "Automatic" });
  fillSelect($("scheduler"), items, items.find((i) => normalize(i.value) === "automatic").value);
}

async function loadModels() {
  const select = $("model");
  const [models, options] = await Promise.all([api("sd-models"), api("options")]);
  const current = options && options.sd_model_checkpoint;
  fillSelect(select, models.map((m) => ({ value: m.title, label: m.model_name || m.title })), current);
  if (current && !models.some((m) => m.title === current)) select.add(new Option(current, current, true, true));
  select.disabled = select.options.length < 2;
  select.dataset.current = select.value;
}

async function switchModel() {
  const select = $("model");
  const wanted = select.value;
  select.disabled = true;
  showNotice(`Loading ${wanted} ...`);
  try {
    await api("options", { body: { sd_model_checkpoint: wanted } });
    select.dataset.current = wanted;
    showNotice(`Model: ${wanted}`);
  } catch (e) {
    select.value = select.dataset.current || "";
    showNotice("");
    showError(e.message);
  } finally {
    select.disabled = select.options.length < 2;
  }
}

// ---------------------------------------------------------------------------------------------------
// The form.

function mode() {
  return $("mode-img2img").checked ? "img2img" : "txt2img";
}

function setMode(value) {
  $(value === "img2img" ? "mode-img2img" : "mode-txt2img").checked = true;
  $("img2img-fields").hidden = value !== "img2img";
}

function numberField(id, label, integer) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"}, got "${raw}"`);
  }
  return value;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    steps: numberField("steps", "Steps", true),
    cfg_scale: numberField("cfg_scale", "CFG scale", false),
    seed: numberField("seed", "Seed", true),
    width: numberField("width", "Width", true),
    height: numberField("height", "Height", true),
    batch_size: numberField("batch_size", "Batch size", true),
    n_iter: numberField("n_iter", "Batch count", true),
  };
  if (mode() === "img2img") {
    if (!initImage.dataUrl) throw new Error("img2img needs an image: choose one, or switch to txt2img");
    body.init_images = [initImage.dataUrl];
    body.denoising_strength = numberField("denoising_strength", "Denoising strength", false);
  }
  return body;
}

/** Fill the form from an infotext; returns the names of fields the form has no place for. */
function applyInfotext(text) {
  const info = parseInfotext(text);
  $("prompt").value = info.prompt;
  $("negative_prompt").value = info.negativePrompt;
  const f = { ...info.fields };
  const take = (key) => { const v = f[key]; delete f[key]; return v; };
  const notes = [];
  const setNumber = (id, value) => { if (value !== undefined && value !== "" && Number.isFinite(Number(value))) $(id).value = Number(value); };
  setNumber("steps", take("Steps"));
  setNumber("cfg_scale", take("CFG scale"));
  setNumber("seed", take("Seed"));
  const size = take("Size");
  const m = /^(\d+)\s*x\s*(\d+)$/.exec(size || "");
  if (m) { $("width").value = Number(m[1]); $("height").value = Number(m[2]); }
  $("batch_size").value = Number(take("Batch size")) || 1;   // A1111 writes it only for batches of 2 or more
  delete f["Batch pos"];
  setNumber("denoising_strength", take("Denoising strength"));
  $("denoising-value").textContent = Number($("denoising_strength").value).toFixed(2);

  const sampler = take("Sampler");
  const schedule = take("Schedule type");
  if (sampler !== undefined) {
    if (selectByName($("sampler_name"), sampler)) {
      if (!selectByName($("scheduler"), schedule || "automatic")) notes.push(`schedule type ${schedule}`);
    } else {
      // pre-1.9 A1111 spells the schedule into the sampler's name: "DPM++ 2M Karras"
      const split = [...$("scheduler").options].find((o) => normalize(o.value) !== "automatic" &&
          normalize(sampler).endsWith(normalize(o.textContent)) &&
          selectByName($("sampler_name"), sampler.slice(0, sampler.length - o.textContent.length)));
      if (split) $("scheduler").value = split.value;
      else notes.push(`sampler ${sampler}`);
    }
  }
  const ignored = [...notes, ...Object.keys(f)];
  return ignored;
}

// The img2img input, read in the browser as a data URL (the server never fetches URLs).
const initImage = { dataUrl: null, width: 0, height: 0 };

function readInitFile(file) {
  if (!file) return;
  if (!/^image\/(png|jpeg|webp)$/.test(file.type)) {
    showError(`${file.name}: not a PNG, JPEG or WebP image`);
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => showError(`${file.name}: could not be read`);
  reader.onload = () => setInitImage(String(reader.result), file.name);
  reader.readAsDataURL(file);
}

function setInitImage(dataUrl, name) {
  const preview = $("init-preview");
  preview.onload = () => {
    initImage.width = preview.naturalWidth;
    initImage.height = preview.naturalHeight;
    $("init-size").textContent = `${initImage.width}×${initImage.height}`;
  };
  preview.onerror = () => { showError(`${name}: the browser cannot decode this image`); clearInitImage(); };
  initImage.dataUrl = dataUrl;
  preview.src = dataUrl;
  preview.hidden = false;
  $("init-hint").hidden = true;
  $("init-name").textContent = name;
  $("init-info").hidden = false;
  showError("");
}

function clearInitImage() {
  Object.assign(initImage, { dataUrl: null, width: 0, height: 0 });
  $("init_image").value = "";
  $("init-preview").removeAttribute("src");
  $("init-preview").hidden = true;
  $("init-hint").hidden = false;
  $("init-info").hidden = true;
  $("init-name").textContent = "";
  $("init-size").textContent = "";
}

// ---------------------------------------------------------------------------------------------------
// A job: POST while polling /progress; the gallery.

const job = { running: false, timer: null, polling: false, interrupted: false, started: 0 };

function setProgress(percent, text) {
  $("progress").value = Math.max(0, Math.min(100, percent));
  $("progress-text").textContent = text;
}

async function pollProgress() {
  if (job.polling || !job.running) return;
  job.polling = true;
  try {
    const p = await api("progress?skip_current_image=true");
    if (!job.running || !p) return;
    const s = p.state || {};
    const parts = [];
    if (s.sampling_steps) parts.push(`Step ${s.sampling_step} / ${s.sampling_steps}`);
    if (s.job_count > 1) parts.push(`batch ${Math.min((s.job_no || 0) + 1, s.job_count)} / ${s.job_count}`);
    if (p.eta_relative > 0) parts.push(`ETA ${p.eta_relative.toFixed(1)} s`);
    const percent = 100 * (p.progress || 0);
    setProgress(percent, `${percent.toFixed(0)}%` + (parts.length ? " · " + parts.join(" · ") : ""));
  } catch (e) {
    // a missed poll is not an error of the job; the next one tries again
  } finally {
    job.polling = false;
  }
}

function setRunning(running) {
  job.running = running;
  $("generate").disabled = running;
  $("interrupt").disabled = !running;
  document.body.classList.toggle("busy", running);
  clearInterval(job.timer);
  job.timer = running ? setInterval(pollProgress, POLL_MS) : null;
}

async function generate(event) {
  if (event) event.preventDefault();
  if (job.running) return;
  showError("");
  showNotice("");
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e.message);
    return;
  }
  const route = mode();
  job.interrupted = false;
  job.started = performance.now();
  setProgress(0, "Starting ...");
  setRunning(true);
  try {
    const result = await api(route, { body });
    const seconds = (performance.now() - job.started) / 1000;
    const count = addResults(result, route);
    const what = `${count} image${count === 1 ? "" : "s"} in ${seconds.toFixed(1)} s`;
    setProgress(job.interrupted ? $("progress").value : 100, job.interrupted ? `Interrupted · ${what}` : `Done · ${what}`);
  } catch (e) {
    setProgress(0, job.interrupted ? "Interrupted" : "Failed");
    if (job.interrupted) showNotice(e.message);     // asked for: the server says what it stopped, no error
    else showError(e.message);
  } finally {
    setRunning(false);
    document.body.dataset.finished = String(Number(document.body.dataset.finished || 0) + 1);   // jobs ended (tests wait on it)
  }
}

async function interrupt() {
  job.interrupted = true;
  $("interrupt").disabled = true;
  $("progress-text").textContent = "Interrupting ...";
  try {
    await api("interrupt", { body: {} });
  } catch (e) {
    showError(e.message);
  }
}

function addResults(result, route) {
  const images = (result && result.images) || [];
  let info = {};
  try { info = typeof result.info === "string" ? JSON.parse(result.info) : (result.info || {}); } catch (e) { info = {}; }
  const infotexts = Array.isArray(info.infotexts) ? info.infotexts : [];
  const seeds = Array.isArray(info.all_seeds) ? info.all_seeds : [];
  const first = Number.isInteger(info.index_of_first_image) ? info.index_of_first_image : 0;
  const gallery = $("gallery");
  const cards = images.map((b64, i) => {
    const k = i - first;                      // a grid, when the server sends one, comes first and has no infotext
    return makeCard(b64, k >= 0 ? (infotexts[k] || "") : "", k >= 0 ? seeds[k] : undefined, route);
  });
  gallery.prepend(...cards);
  $("empty").hidden = gallery.children.length > 0;
  $("clear-gallery").disabled = gallery.children.length === 0;
  return images.length;
}

function makeCard(b64, infotext, seed, route) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const src = "data:image/png;base64," + b64;
  const img = card.querySelector("img.result");
  img.src = src;
  img.addEventListener("load", () => { card.querySelector(".card-size").textContent = `${img.naturalWidth}×${img.naturalHeight}`; });
  card.querySelector(".image-link").href = src;
  card.querySelector(".card-title").textContent = route + (seed !== undefined ? ` · seed ${seed}` : "");
  card.querySelector("pre.infotext").textContent = infotext;
  const download = card.querySelector(".download");
  download.href = src;
  download.download = `sd15-${seed !== undefined ? seed : Date.now()}.png`;
  const reuse = card.querySelector(".reuse");
  reuse.disabled = !infotext;
  reuse.addEventListener("click", () => {
    const ignored = applyInfotext(infotext);
    showError("");
    showNotice("Settings filled from the image" + (ignored.length ? ` (not in this form: ${ignored.join(", ")})` : ""));
    $("prompt").focus();
  });
  card.querySelector(".to-img2img").addEventListener("click", () => {
    setInitImage(src, `${download.download}`);
    setMode("img2img");
    $("form").scrollIntoView({ behavior: "smooth", block: "start" });
  });
  return card;
}

// ---------------------------------------------------------------------------------------------------
// Wiring.

function wire() {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e); });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", () => setMode(mode()));
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  $("swap-size").addEventListener("click", () => { const w = $("width").value; $("width").value = $("height").value; $("height").value = w; });
  $("denoising_strength").addEventListener("input", () => { $("denoising-value").textContent = Number($("denoising_strength").value).toFixed(2); });
  $("init_image").addEventListener("change", () => readInitFile($("init_image").files[0]));
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); readInitFile(e.dataTransfer.files[0]); });
  $("init-clear").addEventListener("click", clearInitImage);
  $("init-use-size").addEventListener("click", () => {
    if (!initImage.width) return;
    $("width").value = Math.max(8, Math.round(initImage.width / 8) * 8);
    $("height").value = Math.max(8, Math.round(initImage.height / 8) * 8);
  });
  $("init-read-settings").addEventListener("click", async () => {
    showError("");
    try {
      const r = await api("png-info", { body: { image: initImage.dataUrl } });
      if (!r || !r.info) { showNotice("This image carries no settings"); return; }
      const ignored = applyInfotext(r.info);
      showNotice("Settings filled from the image" + (ignored.length ? ` (not in this form: ${ignored.join(", ")})` : ""));
    } catch (e) {
      showError(e.message);
    }
  });
  $("clear-gallery").addEventListener("click", () => {
    $("gallery").replaceChildren();
    $("empty").hidden = false;
    $("clear-gallery").disabled = true;
  });
  $("model").addEventListener("change", switchModel);
}

async function start() {
  wire();
  setMode(mode());
  const results = await Promise.allSettled([loadSamplers(), loadSchedulers(), loadModels()]);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failed.length) showError(failed.join("\n"));
  document.body.dataset.ready = "true";      // the lists are in (the browser test waits for this)
}

window.sd15Page = { parseInfotext, applyInfotext };
document.addEventListener("DOMContentLoaded", start);
