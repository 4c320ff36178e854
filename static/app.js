// hcx-server playground: a chat with the local model in the browser, over the server's own
// OpenAI-compatible route (POST /v1/chat/completions, streamed as server-sent events).
// Vanilla JS, no build step, nothing from elsewhere. Text from the model (or the user) only
// ever reaches the page as textContent (see renderText): it is never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"];
const KEY_STORAGE = "hcx-api-key";

const state = {
  health: {},         // the last /health answer (limits included)
  history: [],        // OpenAI messages of the turns so far (the system prompt is added per request)
  attachments: [],    // {name, dataUrl, thumbUrl} waiting to be sent
  controller: null,   // AbortController of the request in flight
  failed: null,       // {turn, view}: the turn to send again (Retry button, or once a key is given)
};

// -- rendering: text only --------------------------------------------------------------------

/** Model text -> text nodes and <pre><code> blocks for ``` fences (an unclosed fence, as
 *  while streaming, is a code block already). Only textContent is set: no HTML from the text. */
function renderText(text) {
  const fragment = document.createDocumentFragment();
  let prose = [], code = null, lang = "";
  const flushProse = () => {
    if (prose.length) fragment.append(document.createTextNode(prose.join("\n")));
    prose = [];
  };
  for (const line of String(text).split("\n")) {
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line);
    if (fence && code === null) {
      flushProse();
      code = [];
      lang = fence[1];
    } else if (fence && code !== null && !fence[1]) {
      fragment.append(codeBlock(code.join("\n"), lang));
      code = null;
    } else {
      (code === null ? prose : code).push(line);
    }
  }
  flushProse();
  if (code !== null) fragment.append(codeBlock(code.join("\n"), lang));
  return fragment;
}

function codeBlock(text, lang) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (lang) code.dataset.lang = lang;
  code.textContent = text;
  pre.append(code);
  return pre;
}

function addMessage(role, text = "", images = []) {
  const el = document.createElement("article");
  el.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "user") body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    for (const url of images) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "attached image";
      row.append(img);
    }
    el.append(row);
  }
  el.append(body, meta);
  $("chat").append(el);
  scrollDown();
  return {el, body, meta};
}

function scrollDown() {
  const chat = $("chat");
  chat.scrollTop = chat.scrollHeight;
}

/** The assistant's bubble: re-rendered at most once per frame while tokens stream in. */
function answerView() {
  const view = addMessage("assistant");
  view.el.classList.add("streaming");
  let pending = null;
  view.update = (text) => {
    if (pending === null) {
      requestAnimationFrame(() => {
        if (pending === null) return;
        view.body.replaceChildren(renderText(pending));
        pending = null;
        scrollDown();
      });
    }
    pending = text;
  };
  view.finish = (text, note) => {
    pending = null;
    view.el.classList.remove("streaming");
    view.body.replaceChildren(renderText(text));
    view.meta.replaceChildren(document.createTextNode(note + " "), copyButton(text));
    scrollDown();
  };
  return view;
}

function copyButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
    } catch {  // not a secure context (http on a LAN address): the old way
      const area = document.createElement("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
  });
  return button;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// -- the server: /health and the API key ---------------------------------------------------------

async function loadHealth() {
  let health;
  try {
    health = await (await fetch("/health", {cache: "no-store"})).json();
  } catch (err) {
    $("model-info").textContent = `cannot reach the server (${err.message}); retrying…`;
    setTimeout(loadHealth, 3000);
    return;
  }
  state.health = health;
  if (health.status !== "ok") {
    $("model-info").textContent = `model ${health.status}${health.error ? ": " + health.error : "…"}`;
    if (health.status === "loading") setTimeout(loadHealth, 2000);
    return;
  }
  const fields = [["model", health.model], ["device", health.device], ["dtype", health.dtype],
                  ["weights", health.weights], ["backend", health.backend], ["kernel", health.kernel],
                  ["interface", health.interface], ["revision", health.revision],
                  ["context", health.context_length && `${health.context_length} tokens`]];
  $("model-info").replaceChildren(...fields.filter(([, value]) => value !== undefined && value !== null && value !== "")
    .map(([name, value]) => {
      const span = document.createElement("span");
      span.className = "field";
      span.dataset.field = name;
      span.textContent = `${name}: ${value}`;
      return span;
    }));
  $("demo-banner").textContent = health.demo ? health.note || "DEMO MODE: tiny random-weight model" : "";
  $("demo-banner").hidden = !health.demo;
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

function askForKey(refused) {
  if (refused) sessionStorage.removeItem(KEY_STORAGE);
  $("key-form").hidden = false;
  $("api-key").focus();
}

// -- a turn: the request, the SSE stream, the answer -------------------------------------------------

function settings() {
  const number = (id, parse) => {
    const value = parse($(id).value);
    return Number.isFinite(value) ? value : undefined;
  };
  const body = {max_tokens: number("max-tokens", parseInt), min_tokens: number("min-tokens", parseInt),
                temperature: number("temperature", parseFloat), top_p: number("top-p", parseFloat),
                seed: number("seed", parseInt)};
  return Object.fromEntries(Object.entries(body).filter(([, value]) => value !== undefined));
}

function userMessage(text, images) {
  if (!images.length) return {role: "user", content: text};
  const parts = images.map((url) => ({type: "image_url", image_url: {url}}));
  return {role: "user", content: text ? [{type: "text", text}, ...parts] : parts};
}

function imagesIn(messages) {
  return messages.reduce((n, m) => n + (Array.isArray(m.content) ? m.content.filter((p) => p.type === "image_url").length : 0), 0);
}

function send() {
  if (state.controller) return;
  const text = $("prompt").value;
  if (!text.trim() && !state.attachments.length) return;
  const images = state.attachments.map((a) => a.dataUrl);
  const total = imagesIn(state.history) + images.length;
  if (state.health.max_images && total > state.health.max_images) {
    notice(`This chat would send ${total} images; the server takes at most ${state.health.max_images} per request ` +
           "(MAX_IMAGES). Start a new chat or remove some.");
    return;
  }
  const turn = userMessage(text, images);
  addMessage("user", text, images);
  $("prompt").value = "";
  clearAttachments();
  run(turn);
}

async function run(turn) {
  state.failed = null;
  notice(null);
  $("key-form").hidden = true;
  const view = answerView();
  const system = $("system-prompt").value.trim();
  const history = state.history;  // "New chat" meanwhile starts a new one: this turn stays in the old
  const messages = [...(system ? [{role: "system", content: system}] : []), ...history, turn];
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = 0, text = "", usage = null, complete = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify({messages, stream: true, stream_options: {include_usage: true}, ...settings()}),
    });
    if (!response.ok) throw await httpError(response);
    for await (const data of sseEvents(response.body)) {
      if (data === "[DONE]") {
        complete = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw Object.assign(new Error(chunk.error.message || "generation failed"), {status: 500});
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) {
        first = first || performance.now();
        text += delta;
        view.update(text);
      }
    }
    view.finish(text, complete ? timing(started, first, performance.now(), usage)
                               : "the connection closed before the answer was complete");
    history.push(turn, {role: "assistant", content: text});
  } catch (err) {
    if (err.name === "AbortError") {
      view.finish(text, `stopped after ${((performance.now() - started) / 1000).toFixed(1)} s`);
      history.push(turn, {role: "assistant", content: text});
    } else {
      failed(view, turn, err);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

/** "data:" payloads of a server-sent event stream, as they arrive. */
async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      buffer = buffer.slice(end + 2);
      if (data) yield data;
    }
  }
}

function timing(started, first, ended, usage) {
  const parts = [];
  if (first) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (usage && first && usage.completion_tokens > 1 && ended > first) {
    parts.push(`${((usage.completion_tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  }
  return parts.join(" · ");
}

async function httpError(response) {
  let message = response.statusText || "request failed", code = null;
  try {
    const error = (await response.json()).error;
    message = (typeof error === "string" ? error : error && error.message) || message;
    code = error && error.code;
  } catch { /* not JSON: keep the status text */ }
  return Object.assign(new Error(message), {status: response.status, code});
}

function failed(view, turn, err) {
  view.el.classList.remove("streaming");
  view.el.classList.add("error");
  let text;
  if (err.status === 401) {
    const refused = Boolean(sessionStorage.getItem(KEY_STORAGE));
    text = refused ? "The API key was refused; enter it again below." : "This server needs an API key; enter it below.";
    askForKey(refused);
  } else if (err.status === 503 && err.code === "server_busy") {
    text = `The server is busy, retry in a moment (${err.message}).`;
  } else if (err.status === 403 && err.code === "origin_not_allowed") {
    text = `Error 403: ${err.message}. Add this page's origin, ${location.origin}, to ALLOWED_ORIGINS.`;
  } else if (err.status) {
    text = `Error ${err.status}: ${err.message}`;
  } else {
    text = `Cannot reach the server: ${err.message}`;
  }
  view.body.textContent = text;
  const retry = document.createElement("button");
  retry.type = "button";
  retry.className = "retry";
  retry.textContent = "Retry";
  retry.addEventListener("click", () => resend());
  view.meta.replaceChildren(retry);
  state.failed = {turn, view};
}

function resend() {
  if (!state.failed || state.controller) return;
  const {turn, view} = state.failed;
  view.el.remove();
  run(turn);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// -- images: file picker, drag-and-drop, paste -------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function bytes(n) {
  return n >= 1048576 ? `${n} bytes (${(n / 1048576).toFixed(1)} MiB)` : `${n} bytes`;
}

let attaching = Promise.resolve();

/** Add files (one batch after another, so that quick pastes cannot overrun MAX_IMAGES). */
function attach(files) {
  attaching = attaching.then(() => attachNow(files)).catch((err) => notice(`cannot read the image: ${err.message}`));
  return attaching;
}

async function attachNow(files) {
  const limit = state.health.max_image_bytes, most = state.health.max_images;
  const problems = [];
  for (const file of files) {
    const name = file.name || "pasted image";
    if (!IMAGE_TYPES.includes(file.type)) {
      problems.push(`${name}: not an image the server reads (PNG, JPEG, WebP, GIF, BMP or TIFF)`);
    } else if (limit && file.size > limit) {
      problems.push(`${name} is ${bytes(file.size)}, over the server's limit of ${bytes(limit)} (MAX_IMAGE_BYTES)`);
    } else if (most && state.attachments.length >= most) {
      problems.push(`${name}: at most ${most} images per request (MAX_IMAGES)`);
    } else {
      state.attachments.push({name, dataUrl: await readAsDataUrl(file), thumbUrl: URL.createObjectURL(file)});
    }
  }
  notice(problems.join("\n"));
  renderAttachments();
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.attachments.map((item, index) => {
    const box = document.createElement("figure");
    box.className = "thumb";
    const img = document.createElement("img");
    img.src = item.thumbUrl;
    img.alt = item.name;
    img.title = item.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `remove ${item.name}`);
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(item.thumbUrl);
      state.attachments.splice(index, 1);
      renderAttachments();
    });
    box.append(img, remove);
    return box;
  }));
}

function clearAttachments() {
  state.attachments.forEach((item) => URL.revokeObjectURL(item.thumbUrl));
  state.attachments = [];
  renderAttachments();
}


// -- wiring ----------------------------------------------------------------------------------------

function start() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (Korean,
    // Japanese, ...) only commits the characters.
    if (e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229) return;
    e.preventDefault();
    send();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("file-input").addEventListener("change", (e) => {
    attach([...e.target.files]);
    e.target.value = "";
  });
  document.addEventListener("paste", (e) => {
    const files = e.clipboardData ? [...e.clipboardData.files].filter((f) => f.type.startsWith("image/")) : [];
    if (files.length) {
      e.preventDefault();
      attach(files);
    }
  });
  document.addEventListener("dragover", (e) => {
    if (e.dataTransfer && [...e.dataTransfer.types].includes("Files")) {
      e.preventDefault();
      document.body.classList.add("dropping");
    }
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dropping");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();  // never navigate to a dropped file
    document.body.classList.remove("dropping");
    if (e.dataTransfer) attach([...e.dataTransfer.files]);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("key-form").hidden = true;
    resend();
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.failed = null;
    $("chat").replaceChildren();
    notice(null);
  });
  loadHealth();
  $("prompt").focus();
}

window.hcxPlayground = {renderText};  // for tests in the page (renderText is pure)
document.addEventListener("DOMContentLoaded", start);
