// The playground's LoRA adapters: the ones the server offers (GET /v1/models: every entry with a `parent` is an
// adapter of the loaded model), each with a checkbox and a scale. ui.js calls `window.PlaygroundAdapters.show(models)`
// once it has the list, and asks `window.PlaygroundAdapters.fields()` for what a job carries: `loras`, the ticked
// adapters in the list's order with their scales; nothing when none is ticked (the base model, as before).
(() => {
  "use strict";

  const panel = document.getElementById("adapters");
  const list = document.getElementById("adapter-list");

  function row(name) {
    const item = document.createElement("li");
    item.className = "adapter";
    const label = document.createElement("label");
    label.className = "check";
    const use = document.createElement("input");
    use.type = "checkbox";
    use.dataset.adapter = name;
    label.append(use, ` ${name}`);
    const scale = document.createElement("input");
    Object.assign(scale, { type: "number", min: "-4", max: "4", step: "0.05", value: "1" });
    scale.dataset.scale = name;
    scale.setAttribute("aria-label", `${name} scale`);
    scale.title = "scale: 1 as trained, 0 no effect";
    item.append(label, scale);
    return item;
  }

  function show(models) {
    const names = (models || []).filter((model) => model.parent).map((model) => model.id);
    const ticked = new Set(fields().loras?.map((lora) => lora.name) || []);
    list.replaceChildren(...names.map(row));
    for (const box of list.querySelectorAll("input[data-adapter]")) box.checked = ticked.has(box.dataset.adapter);
    panel.hidden = names.length === 0;
  }

  function fields() {
    const loras = [];
    for (const box of list.querySelectorAll("input[data-adapter]:checked")) {
      const scale = list.querySelector(`input[data-scale="${CSS.escape(box.dataset.adapter)}"]`);
      const value = scale.value.trim() === "" ? 1 : Number(scale.value);
      loras.push({ name: box.dataset.adapter, scale: value });
    }
    return loras.length ? { loras } : {};
  }

  window.PlaygroundAdapters = { show, fields };
})();
