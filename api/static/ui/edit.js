// The playground's edit mode: an image picked or dropped, a mask painted over it with a brush (and erased), and the
// strength. ui.js asks `window.PlaygroundEdit.fields()` for what a job then carries: `image` (a PNG data: URL at
// the form's width x height), `mask_image` (the same size: white where painted, to repaint; black, kept) and the
// feather `mask_blur` (when set) when anything is painted, and `strength` when set. No image: no fields, and the
// job is text-to-image as before.
// The image is decoded with createImageBitmap (no blob: URL, which the page's Content-Security-Policy refuses).
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const els = {
    details: $("edit"), drop: $("drop"), status: $("edit-status"), file: $("edit-file"), canvases: $("canvases"),
    image: $("edit-image"), mask: $("edit-mask"), tools: $("edit-tools"), paint: $("tool-paint"),
    brush: $("brush"), strength: $("strength"), feather: $("mask-blur"), mode: $("edit-mode"), clear: $("clear-mask"),
    remove: $("remove-image"), width: $("width"), height: $("height"),
  };
  const PAINT = "#ff3d8b"; // how the painted area shows (the mask canvas is drawn half transparent over the image)
  let bitmap = null; // the picked image, decoded
  let last = null; // the brush's previous point while a stroke is drawn

  // ---- the image and the canvases' size -------------------------------------------------------------------------

  // The image's size for the model: its longer side within the form's maximum, both sides multiples of 16.
  function fitted(width, height) {
    const max = Number(els.width.max) || 1024;
    const scale = Math.min(1, max / Math.max(width, height));
    const round = (side) => Math.max(16, Math.round((side * scale) / 16) * 16);
    return [Math.min(round(width), max), Math.min(round(height), max)];
  }

  // The canvases at the form's width x height: the image drawn to it, the paint so far scaled along.
  function resize() {
    if (!bitmap) return;
    const width = Number(els.width.value) || bitmap.width;
    const height = Number(els.height.value) || bitmap.height;
    if (els.image.width === width && els.image.height === height) return;
    let old = null; // the paint so far (none on a new image: its canvas is 0 wide)
    if (els.mask.width && els.mask.height) {
      old = document.createElement("canvas");
      old.width = els.mask.width;
      old.height = els.mask.height;
      old.getContext("2d").drawImage(els.mask, 0, 0);
    }
    for (const canvas of [els.image, els.mask]) {
      canvas.width = width;
      canvas.height = height;
    }
    els.image.getContext("2d").drawImage(bitmap, 0, 0, width, height);
    if (old) els.mask.getContext("2d").drawImage(old, 0, 0, width, height);
    showMode();
  }

  async function load(file) {
    if (!file || !file.type.startsWith("image/")) return;
    let decoded;
    try {
      decoded = await createImageBitmap(file);
    } catch (_) {
      els.status.textContent = "That file is not an image this browser can read.";
      return;
    }
    bitmap = decoded;
    const [width, height] = fitted(bitmap.width, bitmap.height);
    els.width.value = String(width);
    els.height.value = String(height);
    els.mask.width = 0; // a new image starts unpainted
    els.image.width = 0;
    resize();
    els.details.open = true;
    els.canvases.hidden = false;
    els.tools.hidden = false;
    els.status.textContent = `${file.name || "image"}: ${bitmap.width}×${bitmap.height}, edited at ${width}×${height}.`;
  }

  function remove() {
    bitmap = null;
    els.canvases.hidden = true;
    els.tools.hidden = true;
    els.file.value = "";
    els.status.textContent = "";
  }

  // ---- the brush ------------------------------------------------------------------------------------------------

  function point(event) {
    const box = els.mask.getBoundingClientRect();
    const scale = els.mask.width / box.width; // canvas pixels per screen pixel
    return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale };
  }

  function stroke(from, to) {
    const ctx = els.mask.getContext("2d");
    ctx.globalCompositeOperation = els.paint.checked ? "source-over" : "destination-out";
    ctx.strokeStyle = PAINT;
    ctx.lineWidth = Number(els.brush.value) * to.scale;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  function down(event) {
    if (!bitmap || event.button !== 0) return;
    event.preventDefault();
    els.mask.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last); // a click paints a dot
  }

  function move(event) {
    if (!last) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  }

  function up() {
    if (!last) return;
    last = null;
    showMode();
  }

  function clear() {
    els.mask.getContext("2d").clearRect(0, 0, els.mask.width, els.mask.height);
    showMode();
  }

  // ---- what a job carries ---------------------------------------------------------------------------------------

  // Painted: any pixel at least half covered (the server binarises the mask at one half too).
  function painted() {
    if (!els.mask.width || !els.mask.height) return false;
    const { data } = els.mask.getContext("2d").getImageData(0, 0, els.mask.width, els.mask.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
    return false;
  }

  // The mask as the server reads it: white where painted, black elsewhere, opaque, at the image's size.
  function maskURL() {
    const white = document.createElement("canvas");
    white.width = els.mask.width;
    white.height = els.mask.height;
    const ctx = white.getContext("2d");
    ctx.drawImage(els.mask, 0, 0);
    ctx.globalCompositeOperation = "source-in"; // the paint's coverage, in white
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, white.width, white.height);
    ctx.globalCompositeOperation = "destination-over"; // black under it
    ctx.fillStyle = "#000000";
    ctx.fillRect(0, 0, white.width, white.height);
    return white.toDataURL("image/png");
  }

  function showMode() {
    els.mode.textContent = painted() ? "inpainting" : "image-to-image";
  }

  function fields() {
    if (!bitmap) return {};
    resize(); // the size the form says now
    const result = { image: els.image.toDataURL("image/png") };
    if (painted()) {
      result.mask_image = maskURL();
      // Only with a mask: the server refuses a feather without one.
      if (els.feather.value.trim() !== "") result.mask_blur = Number(els.feather.value);
    }
    if (els.strength.value.trim() !== "") result.strength = Number(els.strength.value);
    return result;
  }

  function start() {
    els.file.addEventListener("change", () => load(els.file.files[0]));
    els.drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      els.drop.classList.add("over");
    });
    els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
    els.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      els.drop.classList.remove("over");
      load(event.dataTransfer.files[0]);
    });
    els.mask.addEventListener("pointerdown", down);
    els.mask.addEventListener("pointermove", move);
    els.mask.addEventListener("pointerup", up);
    els.mask.addEventListener("pointercancel", up);
    els.clear.addEventListener("click", clear);
    els.remove.addEventListener("click", remove);
    els.width.addEventListener("change", resize);
    els.height.addEventListener("change", resize);
  }

  window.PlaygroundEdit = { fields, load, mode: () => (bitmap ? els.mode.textContent : "text-to-image") };
  start();
})();
