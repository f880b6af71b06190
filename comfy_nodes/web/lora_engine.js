// lora-engine for ComfyUI: an "insert LoRA" picker on the "Prompt with LoRA tags" node.
// Loaded by ComfyUI as an ES module (WEB_DIRECTORY); kept apart from A1111's javascript/ folder.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PICK = "(insert a LoRA tag)";

async function loraNames() {
  try {
    const response = await api.fetchApi("/models/loras");
    if (!response.ok) return [];
    const names = await response.json();
    return Array.isArray(names) ? names : [];
  } catch (error) {
    console.warn("lora-engine: could not list LoRAs", error);
    return [];
  }
}

// "sub\\name.safetensors" -> "<lora:sub/name:1>" (lora-engine resolves sub/folder/stem names)
function tagFor(name) {
  const stem = name.replace(/\\/g, "/").replace(/\.[^./]+$/, "");
  return `<lora:${stem}:1>`;
}

app.registerExtension({
  name: "lora-engine.PromptTags",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoraEnginePromptTags") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const text = this.widgets?.find((w) => w.name === "text");
      const picker = this.addWidget("combo", "insert LoRA", PICK, (value) => {
        if (text && value && value !== PICK) {
          const current = text.value || "";
          text.value = (current && !/\s$/.test(current) ? current + " " : current) + tagFor(value);
        }
        picker.value = PICK;
      }, { values: [PICK], serialize: false });
      picker.serialize = false;
      loraNames().then((names) => { picker.options.values = [PICK, ...names]; });
      return result;
    };
  },
});
