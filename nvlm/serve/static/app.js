// nvlm chat page: an image with the tile grid the model will see, and a streamed multi-turn chat.
//
// Notable:
// - The conversation lives here, as the OpenAI messages the server gets on every turn. An image goes in the
//   first user message after it is picked (image part first, then the text); later turns re-send it inside
//   that message, and the server's vision cache keeps that cheap.
// - The grid comes from POST /v1/nvlm/tiles, so it is the server's own tiling rule. Tiles are cut from the
//   image resized to cols x rows squares, so the lines sit at equal fractions of the original image.
// - Answers stream with fetch + a ReadableStream reader over the SSE lines (EventSource cannot POST).
// - URLs are relative, so the page also works behind a proxy that serves the app under a path prefix.
// - A failed turn is dropped from the conversation (its question goes back into the box); a stopped one keeps
//   the text received so far.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const el = {
    model: $("#model"), newChat: $("#new-chat"), file: $("#file"), drop: $("#drop"),
    preview: $("#preview"), previewImg: $("#preview-img"), grid: $("#grid"), tileInfo: $("#tile-info"),
    imageState: $("#image-state"), removeImage: $("#remove-image"), settings: $("#settings"),
    maxTokens: $("#max-tokens"), temperature: $("#temperature"), maxTiles: $("#max-tiles"), apiKey: $("#api-key"),
    messages: $("#messages"), empty: $("#empty"), composer: $("#composer"), question: $("#question"),
    send: $("#send"), stop: $("#stop"), overlay: $("#drop-overlay"),
  };

  const state = {
    model: null,       // id from /v1/models
    history: [],       // OpenAI messages sent with each turn
    image: null,       // {url, name, sent}: the image in the preview; `sent` once it is part of `history`
    tilesSeq: 0,       // drops tile answers for an image that has since been replaced
    controller: null,  // AbortController of the answer being streamed
    chat: 0,           // bumped by "New chat", so a turn that ends afterwards leaves the new history alone
  };

  // ---- settings, kept in localStorage ------------------------------------------------------------------
  const store = {
    get(key) { try { return localStorage.getItem("nvlm." + key); } catch { return null; } },
    set(key, value) {
      try { value ? localStorage.setItem("nvlm." + key, value) : localStorage.removeItem("nvlm." + key); } catch { }
    },
  };
  const persisted = { apiKey: el.apiKey, maxTokens: el.maxTokens, temperature: el.temperature, maxTiles: el.maxTiles };
  for (const [key, input] of Object.entries(persisted)) {
    const saved = store.get(key);
    if (saved !== null) input.value = saved;
    input.addEventListener("change", () => store.set(key, input.value.trim()));
  }
  el.apiKey.addEventListener("change", () => { loadModel(); if (state.image) requestTiles(); });
  el.maxTiles.addEventListener("change", () => { if (state.image) requestTiles(); });

  function number(input) {  // blank -> undefined (the server's default); anything else goes as typed
    const v = input.value.trim();
    return v === "" ? undefined : Number(v);
  }

  // ---- HTTP ----------------------------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = el.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function errorOf(resp) {  // the OpenAI error body's message, or the status line
    let message = `${resp.status} ${resp.statusText}`.trim();
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch { }
    const err = new Error(message);
    err.status = resp.status;
    return err;
  }

  async function postJSON(path, body, signal) {
    const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  async function loadModel() {
    try {
      const resp = await fetch("v1/models", { headers: headers() });
      if (!resp.ok) throw await errorOf(resp);
      const data = await resp.json();
      state.model = data.data && data.data[0] ? data.data[0].id : null;
      el.model.textContent = state.model || "no model";
      el.model.classList.remove("bad");
    } catch (e) {
      el.model.textContent = e.status === 401 ? "API key needed" : "server unreachable";
      el.model.classList.add("bad");
      if (e.status === 401) el.settings.open = true;
    }
  }

  // ---- the image and its tile grid -----------------------------------------------------------------------
  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(file);
    });
  }

  async function setImage(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      showError(`"${file.name}" is not an image`);
      return;
    }
    const url = await readAsDataURL(file);
    state.image = { url, name: file.name, sent: false };
    el.previewImg.src = url;
    el.preview.hidden = false;
    el.drop.classList.add("compact");
    updateImageState();
    await requestTiles();
  }

  function clearImage() {
    state.image = null;
    state.tilesSeq++;
    el.preview.hidden = true;
    el.drop.classList.remove("compact");
    el.file.value = "";
    el.previewImg.removeAttribute("src");
    drawGrid(0, 0);
    setTileInfo("", {});
  }

  function updateImageState() {
    if (!state.image) return;
    el.imageState.textContent = state.image.sent ? "In the conversation" : "Goes with your next message";
  }

  function setTileInfo(text, data, isError = false, detail = "") {
    el.tileInfo.textContent = text;
    if (detail) {
      const span = document.createElement("span");
      span.className = "detail";
      span.textContent = " " + detail;
      el.tileInfo.appendChild(span);
    }
    el.tileInfo.classList.toggle("error", isError);
    for (const k of ["cols", "rows", "numTiles"]) {
      if (data[k] === undefined) delete el.tileInfo.dataset[k]; else el.tileInfo.dataset[k] = data[k];
    }
  }

  async function requestTiles() {
    const seq = ++state.tilesSeq;
    setTileInfo("Working out the tiles…", {});
    drawGrid(0, 0);
    try {
      const body = { image_url: { url: state.image.url } };
      const maxTiles = number(el.maxTiles);
      if (maxTiles !== undefined) body.max_tiles = maxTiles;
      const info = await (await postJSON("v1/nvlm/tiles", body)).json();
      if (seq !== state.tilesSeq) return;
      const [cols, rows] = info.grid;
      const T = info.num_tiles;
      let text = `${cols} × ${rows} tiles`;
      if (T > cols * rows) text += ` + thumbnail = ${T}`;
      let detail = `${info.width}×${info.height} px`;
      if (info.tile_size) detail += ` · ${info.tile_size} px tiles`;
      if (info.num_image_tokens) detail += ` · ${info.num_image_tokens} image tokens`;
      setTileInfo(text, { cols, rows, numTiles: T }, false, detail);
      drawGrid(cols, rows);
    } catch (e) {
      if (seq === state.tilesSeq) setTileInfo(`Tiles unavailable: ${e.message}`, {}, true);
    }
  }

  function drawGrid(cols, rows) {
    const svg = el.grid;
    svg.replaceChildren();
    if (!cols || !rows) return;
    svg.setAttribute("viewBox", `0 0 ${cols} ${rows}`);
    const line = (x1, y1, x2, y2) => {
      const l = document.createElementNS("http://www.w3.org/2000/svg", "line");
      for (const [k, v] of Object.entries({ x1, y1, x2, y2 })) l.setAttribute(k, v);
      svg.appendChild(l);
    };
    for (let c = 0; c <= cols; c++) line(c, 0, c, rows);
    for (let r = 0; r <= rows; r++) line(0, r, cols, r);
  }

  el.file.addEventListener("change", () => setImage(el.file.files[0]));
  el.removeImage.addEventListener("click", clearImage);

  // Drop anywhere on the page; the counter survives dragenter/dragleave pairs from child elements.
  let dragDepth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    if (dragDepth++ === 0) el.overlay.hidden = false;
  });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    if (--dragDepth <= 0) { dragDepth = 0; el.overlay.hidden = true; }
  });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    el.overlay.hidden = true;
    const file = Array.from(e.dataTransfer.files).find((f) => f.type.startsWith("image/"));
    file ? setImage(file) : showError("the dropped file is not an image");
  });
  document.addEventListener("paste", (e) => {
    const item = Array.from(e.clipboardData ? e.clipboardData.items : []).find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); setImage(item.getAsFile()); }
  });

  // ---- messages ------------------------------------------------------------------------------------------
  function scrollToEnd(force = false) {
    const m = el.messages;
    if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 80) m.scrollTop = m.scrollHeight;
  }

  function addMessage(role, text, imageUrl) {
    el.empty.hidden = true;
    const div = document.createElement("div");
    div.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = { user: "You", assistant: "nvlm", error: "Error" }[role];
    div.appendChild(who);
    if (imageUrl) {
      const img = document.createElement("img");
      img.className = "attached";
      img.src = imageUrl;
      img.alt = "Image sent with this message";
      div.appendChild(img);
    }
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    div.appendChild(body);
    el.messages.appendChild(div);
    scrollToEnd(true);
    return div;
  }

  function addMeta(div, text) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = text;
    div.appendChild(meta);
  }

  function showError(message) {
    const div = addMessage("error", message);
    div.setAttribute("role", "alert");
    return div;
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.hidden = !busy;
    el.send.hidden = busy;
  }

  // ---- one turn ------------------------------------------------------------------------------------------
  async function send() {
    if (state.controller) return;
    const question = el.question.value.trim();
    const image = state.image && !state.image.sent ? state.image : null;
    if (!question && !image) { el.question.focus(); return; }

    const content = image
      ? [{ type: "image_url", image_url: { url: image.url } }, ...(question ? [{ type: "text", text: question }] : [])]
      : question;
    const userMsg = { role: "user", content };
    state.history.push(userMsg);
    if (image) { image.sent = true; updateImageState(); }
    el.question.value = "";
    const userDiv = addMessage("user", question, image && image.url);
    const answerDiv = addMessage("assistant", "");
    answerDiv.classList.add("streaming");
    answerDiv.setAttribute("aria-busy", "true");
    const answerText = answerDiv.querySelector(".text");

    const body = { messages: state.history, stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model;
    for (const [name, input] of [["max_tokens", el.maxTokens], ["temperature", el.temperature],
                                 ["max_tiles", el.maxTiles]]) {
      const v = number(input);
      if (v !== undefined) body[name] = v;
    }

    const controller = new AbortController();
    state.controller = controller;
    const chat = state.chat;
    setBusy(true);
    const started = performance.now();
    let text = "", finish = null, usage = null;
    try {
      const resp = await postJSON("v1/chat/completions", body, controller.signal);
      await readEvents(resp, (event) => {
        if (event.error) throw Object.assign(new Error(event.error.message || "generation failed"), { inStream: true });
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          answerText.textContent = text;
          scrollToEnd();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      if (chat !== state.chat) return;
      state.history.push({ role: "assistant", content: text });
      const secs = (performance.now() - started) / 1000;
      const parts = [];
      if (usage) parts.push(`${usage.completion_tokens} tokens`, `${(usage.completion_tokens / secs).toFixed(1)} tok/s`);
      parts.push(secs < 1 ? `${Math.round(secs * 1000)} ms` : `${secs.toFixed(1)} s`);
      if (finish === "length") parts.push("stopped at max tokens");
      addMeta(answerDiv, parts.join(" · "));
      if (!text) answerText.textContent = "(empty answer)";
    } catch (e) {
      if (chat !== state.chat) return;
      if (e.name === "AbortError") {  // Stop: keep what arrived
        state.history.push({ role: "assistant", content: text });
        addMeta(answerDiv, "stopped");
      } else {
        // Drop the turn: the conversation stays as it was before it, and the question can be sent again.
        state.history.pop();
        if (image) { image.sent = false; updateImageState(); }
        answerDiv.remove();
        userDiv.classList.add("failed");
        addMeta(userDiv, "not sent: not part of the conversation");
        showError(e.status === 401 ? `${e.message} (set the API key in Settings)` : e.message);
        if (e.status === 401) el.settings.open = true;
        if (!el.question.value) el.question.value = question;
      }
    } finally {
      answerDiv.classList.remove("streaming");
      answerDiv.removeAttribute("aria-busy");
      state.controller = null;
      setBusy(false);
      el.question.focus();
    }
  }

  async function readEvents(resp, onEvent) {
    // SSE: "data: <json>" lines, events separated by blank lines, "data: [DONE]" at the end.
    // Cancelling the reader on the way out (an error event, a bad line) closes the connection, and the server
    // then frees the request's slot.
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        const lines = buffer.split(/\r?\n/);
        buffer = done ? "" : lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
        if (done) throw new Error("the stream ended before [DONE]");
      }
    } finally {
      reader.cancel().catch(() => { });
    }
  }

  function newChat() {
    state.chat++;
    if (state.controller) state.controller.abort();
    state.history = [];
    for (const m of el.messages.querySelectorAll(".message")) m.remove();
    el.empty.hidden = false;
    if (state.image) { state.image.sent = false; updateImageState(); }  // the image stays, for the new chat
    el.question.value = "";
    el.question.focus();
  }

  el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  el.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  el.newChat.addEventListener("click", newChat);

  loadModel();
})();
