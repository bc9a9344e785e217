// The playground: submits a job (POST /api/jobs), follows its event stream, shows progress, previews and results.
// The stream is read with fetch() and a small Server-Sent Events parser, not EventSource: EventSource cannot send
// the Authorization header a server with --api-key needs.
(() => {
  "use strict";

  const KEY_STORE = "sd-playground.api-key";
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("form"), prompt: $("prompt"), negative: $("negative"), width: $("width"), height: $("height"),
    steps: $("steps"), count: $("count"), seed: $("seed"), guidance: $("guidance"), previewEvery: $("preview-every"),
    key: $("api-key"), remember: $("remember"), generate: $("generate"), cancel: $("cancel"),
    info: $("server-info"), message: $("message"), job: $("job"), progress: $("progress"), jobText: $("job-text"),
    previews: $("previews"), gallery: $("gallery"), empty: $("empty"),
  };
  let current = null; // the job being followed: {id, params}
  let keyNeeded = false; // the last status said 401: the header asks for a key until a call goes through

  class ApiError extends Error {
    constructor(status, error, retryAfter) {
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.error = error;
      this.retryAfter = retryAfter;
    }
  }

  // ---- talking to the server ------------------------------------------------------------------------------------

  function headers(json) {
    const result = {};
    const key = els.key.value.trim();
    if (key) result.Authorization = `Bearer ${key}`;
    if (json) result["Content-Type"] = "application/json";
    return result;
  }

  async function apiError(response) {
    let error = { message: `HTTP ${response.status}` };
    try {
      const data = await response.json();
      if (data && data.error) error = data.error;
    } catch (_) { /* not the envelope (a proxy's page): keep the status line */ }
    return new ApiError(response.status, error, response.headers.get("Retry-After"));
  }

  async function api(method, path, body) {
    const init = { method, headers: headers(body !== undefined) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (!response.ok) throw await apiError(response);
    return response.json();
  }

  // Yields {type, data} for each event of a text/event-stream response (comments and ids are skipped).
  async function* sseEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let type = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop(); // an unfinished line waits for the next chunk
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { type, data: data.join("\n") };
          type = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") type = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  }

  const jobPath = (id) => `/api/jobs/${encodeURIComponent(id)}`;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // Follows a job's events until `done`; a stream cut short is opened again (it replays the job's state first).
  async function follow(job) {
    for (let attempt = 0; attempt < 5; attempt += 1) {
      let response;
      try {
        response = await fetch(`${jobPath(job.id)}/events`, { headers: headers(false) });
      } catch (_) {
        await sleep(1000);
        continue;
      }
      if (!response.ok) throw await apiError(response);
      for await (const event of sseEvents(response)) {
        const data = JSON.parse(event.data);
        if (event.type === "done") return data;
        onEvent(job, event.type, data);
      }
      await sleep(500);
    }
    return api("GET", jobPath(job.id)); // the last word, if the stream keeps failing
  }

  // ---- what the user sees ---------------------------------------------------------------------------------------

  function showMessage(text, isError) {
    els.message.textContent = text;
    els.message.classList.toggle("error", Boolean(isError));
    els.message.hidden = false;
  }

  function clearMessage() {
    els.message.hidden = true;
    els.message.textContent = "";
  }

  function explain(err) {
    if (!(err instanceof ApiError)) return `Could not reach the server (${err.message}).`;
    const message = err.error.message || `HTTP ${err.status}`;
    if (err.status === 401) {
      els.key.focus();
      return "This server needs an API key: enter it in the API key field and try again.";
    }
    if (err.status === 503 && err.retryAfter) return `The server is busy: ${message} Try again in ${err.retryAfter} s.`;
    if (err.status === 400 || err.status === 422 || err.status === 413) return `Please check the form: ${message}`;
    if (err.status === 404 && current) return "This job is gone (it expired or the server restarted).";
    if (err.status === 404) return "This server has no jobs API (POST /api/jobs answered 404): it is older than this page.";
    return `${message} (HTTP ${err.status})`;
  }

  function setJob(state, text, step, total) {
    els.job.dataset.state = state;
    els.jobText.textContent = text;
    if (step === undefined) {
      els.progress.removeAttribute("value"); // indeterminate while queued or starting
    } else {
      els.progress.max = Math.max(total, 1);
      els.progress.value = step;
    }
  }

  function seconds(value) {
    return value < 10 ? `${value.toFixed(1)} s` : `${Math.round(value)} s`;
  }

  function onEvent(job, type, data) {
    if (type === "queued") {
      const where = data.position === 1 ? "next in line" : `position ${data.position} in the queue`;
      setJob("queued", `Queued: ${where}.`);
    } else if (type === "started") {
      setJob("running", "Started: encoding the prompt…");
    } else if (type === "step") {
      const left = (data.elapsed_s / Math.max(data.step, 1)) * (data.total - data.step);
      const eta = data.step < data.total ? ` · about ${seconds(left)} left` : " · decoding…";
      setJob("running", `Step ${data.step} of ${data.total}${eta}`, data.step, data.total);
      job.step = data.step;
      job.total = data.total;
    } else if (type === "preview") {
      showPreviews(data);
    }
  }

  function showPreviews(data) {
    const images = data.images.map((b64, i) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${b64}`;
      img.alt = `Preview of image ${i + 1} after step ${data.step} of ${data.total}`;
      return img;
    });
    els.previews.replaceChildren(...images);
    els.previews.hidden = false;
  }

  function addToGallery(result) {
    const { seed, parameters } = result;
    const many = result.response.length > 1;
    const items = result.response.map((url, i) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = parameters.prompt;
      img.width = parameters.width;
      img.height = parameters.height;
      const link = document.createElement("a");
      link.href = url;
      link.target = "_blank";
      link.rel = "noopener";
      link.title = "Open the full image";
      link.append(img);
      const caption = document.createElement("figcaption");
      const label = document.createElement("span");
      label.className = "seed";
      label.textContent = `seed ${seed}`;
      const size = document.createElement("span");
      size.textContent = `${many ? `#${i + 1} · ` : ""}${parameters.width}×${parameters.height}`;
      const reuse = document.createElement("button");
      reuse.type = "button";
      reuse.textContent = "Use seed";
      reuse.addEventListener("click", () => { els.seed.value = String(seed); });
      caption.append(label, size, reuse);
      const figure = document.createElement("figure");
      figure.append(link, caption);
      const item = document.createElement("li");
      item.append(figure);
      return item;
    });
    els.gallery.prepend(...items);
    els.empty.hidden = true;
  }

  function finish(job, final) {
    els.previews.hidden = true;
    if (final.status === "succeeded") {
      const n = final.result.response.length;
      const total = final.total_steps || 1;
      setJob("succeeded", `Done: ${n} image${n > 1 ? "s" : ""}, seed ${final.result.seed}.`, total, total);
      addToGallery(final.result);
    } else if (final.status === "cancelled") {
      const where = final.step ? ` at step ${final.step} of ${final.total_steps}` : " before it started";
      setJob("cancelled", `Cancelled${where}.`, final.step || 0, final.total_steps || 1);
    } else {
      const error = final.error || { message: `The job ended as ${final.status}.` };
      setJob("failed", "Failed.", job.step || 0, job.total || 1);
      showMessage(`The generation failed: ${error.message}`, true);
    }
  }

  // ---- the form -------------------------------------------------------------------------------------------------

  function numberOf(input) {
    return input.value.trim() === "" ? undefined : Number(input.value);
  }

  function requestBody() {
    const steps = numberOf(els.steps);
    let previewEvery = numberOf(els.previewEvery);
    // Auto: about eight previews per run, whatever the step count.
    if (previewEvery === undefined) previewEvery = Math.max(1, Math.round((steps || 28) / 8));
    const body = {
      prompt: els.prompt.value,
      negative_prompt: els.negative.value.trim() || undefined,
      width: numberOf(els.width),
      height: numberOf(els.height),
      num_inference_steps: steps,
      num_images_per_prompt: numberOf(els.count),
      seed: numberOf(els.seed),
      guidance_scale: numberOf(els.guidance),
      preview_every: previewEvery,
      ...window.PlaygroundEdit.fields(), // edit mode (edit.js): image, mask_image, mask_blur, strength; or none
      ...window.PlaygroundAdapters.fields(), // adapters.js: loras, the ticked adapters; none when none is ticked
    };
    return JSON.parse(JSON.stringify(body)); // drops the undefined fields: the server's defaults apply
  }

  // Generate is off while a job is submitted or followed; Cancel is on once there is a job to cancel.
  function setBusy(busy, cancellable) {
    els.generate.disabled = busy;
    els.cancel.disabled = !cancellable;
  }

  async function generate(event) {
    event.preventDefault();
    clearMessage();
    rememberKey();
    setBusy(true, false);
    setJob("submitting", "Submitting…");
    try {
      const answer = await api("POST", "/api/jobs", requestBody());
      if (keyNeeded) loadServer(); // the key works now: the header says what the server is, not "API key needed"
      current = { id: answer.id };
      setBusy(true, true);
      setJob("queued", "Queued.");
      finish(current, await follow(current));
    } catch (err) {
      setJob("failed", current ? "Lost track of the job." : "Not started.", 0, 1);
      showMessage(explain(err), true);
    } finally {
      current = null;
      setBusy(false, false);
    }
  }

  async function cancel() {
    if (!current) return;
    els.cancel.disabled = true;
    try {
      await api("DELETE", jobPath(current.id)); // the stream's `done` event shows the outcome
    } catch (err) {
      showMessage(explain(err), true);
      els.cancel.disabled = false;
    }
  }

  function rememberKey() {
    try {
      if (els.remember.checked && els.key.value.trim()) localStorage.setItem(KEY_STORE, els.key.value.trim());
      else localStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage disabled (private mode): the key still works for this page */ }
  }

  function fill(input, value, max) {
    if (max !== undefined && max !== null) input.max = String(max);
    if (input.value === "" && value !== undefined && value !== null) input.value = String(value);
  }

  // Fills the form's defaults and limits (GET /ui/limits, which needs no key), then says what the server is and
  // whether it is ready (GET /api/status, which needs the key when the server has one).
  async function loadServer() {
    try {
      const limits = await api("GET", "/ui/limits");
      fill(els.width, limits.default_size, limits.max_size);
      fill(els.height, limits.default_size, limits.max_size);
      fill(els.steps, limits.default_steps, limits.max_steps);
      fill(els.count, undefined, limits.max_images_per_request);
      if (limits.max_prompt_chars) els.prompt.maxLength = limits.max_prompt_chars;
      const status = await api("GET", "/api/status");
      const state = status.ready ? "ready" : "loading the model";
      els.info.textContent = `${status.current_model} on ${status.device} · ${state}`;
      if (status.adapters) window.PlaygroundAdapters.show((await api("GET", "/v1/models")).data);
      keyNeeded = false;
      if (!els.message.classList.contains("error")) clearMessage();
    } catch (err) {
      keyNeeded = err instanceof ApiError && err.status === 401;
      els.info.textContent = keyNeeded ? "API key needed" : "Server unreachable";
      showMessage(explain(err), !keyNeeded);
    }
  }

  function start() {
    try {
      const saved = localStorage.getItem(KEY_STORE);
      if (saved) {
        els.key.value = saved;
        els.remember.checked = true;
      }
    } catch (_) { /* storage disabled */ }
    els.form.addEventListener("submit", generate);
    els.cancel.addEventListener("click", cancel);
    els.key.addEventListener("change", () => { rememberKey(); loadServer(); });
    els.remember.addEventListener("change", rememberKey);
    loadServer();
  }

  start();
})();
