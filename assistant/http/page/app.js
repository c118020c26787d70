// The assistant's page: the conversation live (voice and typed turns, over /events), the
// state, the camera's latest snapshot, a box to ask (with an optional picture), and every
// answer playable through /v1/audio/speech. No build step, no CDN: this file is all of it.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_NAME = "rkvlm-api-key";
let apiKey = localStorage.getItem(KEY_NAME) || "";
const turns = new Map();          // turn id -> {el, answer}
const mine = [];                  // this page's typed exchanges: [question, answer]
let picture = null;               // a data: URL
let cameraUrl = null;

// ------------------------------------------------------------------ the API, with its key

async function api(path, options = {}, retried = false) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401 && !retried) {
    const key = window.prompt("This assistant needs its API key (http.api_key):", "");
    if (key) {
      apiKey = key.trim();
      localStorage.setItem(KEY_NAME, apiKey);
      return api(path, options, true);
    }
  }
  return resp;
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

// ------------------------------------------------------------------ the conversation

function setState(state) {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = state;
}

function turnEl(t) {
  let entry = turns.get(t.id);
  if (entry) return entry;
  $("empty").hidden = true;
  const el = document.createElement("article");
  el.className = "turn pending";
  el.dataset.id = t.id;
  el.dataset.source = t.source || "";
  const q = document.createElement("div");
  q.className = "q";
  const src = document.createElement("span");
  src.className = "src " + (t.source || "");
  src.textContent = t.source === "voice" ? "voice" : "typed";
  const qt = document.createElement("span");
  qt.className = "qt";
  qt.textContent = t.question || "";
  q.append(src, qt);
  const a = document.createElement("div");
  a.className = "a";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(q, a, meta);
  $("log").append(el);
  entry = { el, a, meta, answer: "" };
  turns.set(t.id, entry);
  scrollDown();
  return entry;
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
  window.scrollTo(0, document.body.scrollHeight);
}

function finishTurn(t) {
  const entry = turnEl(t);
  entry.answer = t.answer || "";
  entry.a.textContent = entry.answer;
  entry.el.classList.remove("pending");
  entry.el.classList.add("done");
  entry.meta.replaceChildren();
  if (t.image) entry.meta.append(Object.assign(document.createElement("span"), { textContent: "with a picture" }));
  if (t.note) entry.meta.append(Object.assign(document.createElement("span"), { textContent: t.note }));
  if (entry.answer) {
    const play = document.createElement("button");
    play.type = "button";
    play.className = "play";
    play.textContent = "\u25B6 play";
    play.addEventListener("click", () => speak(entry.answer, play));
    entry.meta.prepend(play);
  }
  scrollDown();
}

// Where a spoken turn's wait went, from the last word to the first sound (assistant/stages.py).
const STAGES = [["wait", "end-of-turn wait"], ["asr", "speech recognition after the cut"],
                ["llm", "the model up to the first clause"], ["tts", "speech synthesis up to the first sound"]];
const BAR_FULL_MS = 4000;          // this wait draws the longest bar (16rem); longer ones too

function showStages(entry, st) {
  entry.el.querySelector(".stages")?.remove();
  if (!st || !(st.total > 0)) return;
  const box = document.createElement("div");
  box.className = "stages";
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.style.width = `${(16 * Math.min(1, st.total / BAR_FULL_MS)).toFixed(2)}rem`;
  const parts = [];
  for (const [key, what] of STAGES) {
    const ms = st[key] || 0;
    parts.push(`${what} ${Math.round(ms)} ms`);
    if (ms <= 0) continue;
    const seg = document.createElement("span");
    seg.className = `seg ${key}`;
    seg.style.flexGrow = String(ms);
    seg.title = `${what}: ${Math.round(ms)} ms`;
    bar.append(seg);
  }
  const label = document.createElement("span");
  label.className = "total";
  label.textContent = `${(st.total / 1000).toFixed(2)} s to the first sound`;
  box.title = parts.join(", ");
  box.append(bar, label);
  entry.el.append(box);
}

function onEvent(ev) {
  switch (ev.type) {
    case "hello":
      turns.clear();
      $("log").querySelectorAll(".turn").forEach((n) => n.remove());
      $("empty").hidden = ev.turns.length > 0;
      for (const t of ev.turns) {
        const entry = turnEl(t);
        if (t.done) finishTurn(t); else { entry.answer = t.answer; entry.a.textContent = t.answer; }
        if (t.stages) showStages(entry, t.stages);
      }
      setState(ev.state);
      $("camera-box").hidden = !ev.camera;
      $("use-camera-box").hidden = !ev.camera;
      refreshCamera();
      break;
    case "question":
      turnEl(ev);
      break;
    case "piece": {
      const entry = turns.get(ev.id);
      if (entry) {
        entry.answer += ev.text;
        entry.a.textContent = entry.answer.replace(/^\s+/, "");
        scrollDown();
      }
      break;
    }
    case "done":
      finishTurn(ev);
      refreshCamera();
      break;
    case "timings": {
      const entry = turns.get(ev.id);
      if (entry) showStages(entry, ev.stages);
      break;
    }
    case "state":
      setState(ev.state);
      break;
  }
}

// Server-sent events through fetch (so the API key goes in a header, not the URL);
// reconnects after a drop.
async function listen() {
  for (;;) {
    try {
      const resp = await api("/events", { headers: { Accept: "text/event-stream" } });
      if (!resp.ok) throw new Error(await errorOf(resp));
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: "))
            .map((l) => l.slice(6)).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (e) {
      console.warn("events:", e);
    }
    setState("offline");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ------------------------------------------------------------------ asking

async function shrink(file) {
  // Phone photos are large: send at most 1280 px on the long side, as JPEG.
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, 1280 / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.85);
}

async function ask(event) {
  event.preventDefault();
  const text = $("question").value.trim();
  if (!text && !picture) return;
  showError("");
  const content = picture
    ? [{ type: "text", text }, { type: "image_url", image_url: { url: picture } }]
    : text;
  const messages = [];
  for (const [q, a] of mine) messages.push({ role: "user", content: q }, { role: "assistant", content: a });
  messages.push({ role: "user", content });
  const model = $("use-camera").checked && !picture ? "rkvlm-camera" : "rkvlm";
  $("send").disabled = true;
  $("question").value = "";
  clearPicture();
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true }),
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const id = Number(resp.headers.get("X-Turn-Id"));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", answer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).replace(/^data: /, "");
        buf = buf.slice(cut + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) answer += delta.content;
      }
    }
    mine.push([text, answer]);
    // The live events show the turn; without them (a dropped stream), show it from here.
    if (id && !turns.has(id)) finishTurn({ id, source: "http", question: text, answer });
  } catch (e) {
    showError(String(e.message || e));
  } finally {
    $("send").disabled = false;
    $("question").focus();
  }
}

function clearPicture() {
  picture = null;
  $("picture").value = "";
  $("picked").hidden = true;
}

async function pick() {
  const file = $("picture").files[0];
  if (!file) return clearPicture();
  try {
    picture = await shrink(file);
    $("picked").textContent = `picture: ${file.name} (sent with the next question)`;
    $("picked").hidden = false;
  } catch (e) {
    showError("That picture could not be read: " + e);
    clearPicture();
  }
}

// ------------------------------------------------------------------ speech and camera

async function speak(text, button) {
  button.disabled = true;
  try {
    const resp = await api("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: "tts-1", input: text, voice: "alloy", response_format: "wav" }),
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const url = URL.createObjectURL(await resp.blob());
    const audio = new Audio(url);
    audio.addEventListener("ended", () => URL.revokeObjectURL(url));
    await audio.play();
  } catch (e) {
    showError("Could not play the answer: " + (e.message || e));
  } finally {
    button.disabled = false;
  }
}

async function refreshCamera() {
  if ($("camera-box").hidden) return;
  try {
    const resp = await api("/camera.jpg", { cache: "no-store" });
    if (!resp.ok) return;
    const url = URL.createObjectURL(await resp.blob());
    $("camera").src = url;
    if (cameraUrl) URL.revokeObjectURL(cameraUrl);
    cameraUrl = url;
  } catch (e) { /* the next turn tries again */ }
}

$("ask").addEventListener("submit", ask);
$("picture").addEventListener("change", pick);
listen();
