// NearID: show the score table that the NearID nodes return as {"ui": {"text": [...]}} on the node itself.
// ComfyUI renders `text` only for its own PreviewAny node, so the NearID nodes need this small extension.
// It also points the model loader of a shipped template at this server's default model (see TEMPLATE_PROPERTY).
// Loaded by ComfyUI from WEB_DIRECTORY as /extensions/<pack folder>/nearid.js.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES_WITH_TEXT = new Set(["NearIDEmbed", "NearIDScore", "NearIDBestOfN", "NearIDThresholdFilter"]);
const WIDGET_NAME = "nearid_scores";
// Set on the NearIDModelLoader nodes of the shipped templates (workflows/NearID *.json): such a node takes the model
// dropdown's default from the server (the first model in models/nearid/, else the hub entry) instead of the model the
// template was saved with. The property is then removed, so a workflow the user saves keeps the model they chose.
const TEMPLATE_PROPERTY = "nearid_template_model";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // display only: not saved in the workflow's widgets_values ...
    if (widget.options) widget.options.serialize = false; // ... and not sent to the server as an input
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.fontFamily = "monospace";
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = text;
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0], 420), Math.max(node.size[1], wanted[1])]);
  app.graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "NearID.ScoreText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_TEXT.has(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text === undefined || text === null) return;
      showText(this, Array.isArray(text) ? text.join("\n\n") : String(text));
    };
  },
});

app.registerExtension({
  name: "NearID.TemplateModel",
  loadedGraphNode(node) {
    if (!node.properties?.[TEMPLATE_PROPERTY]) return; // the user's own workflows are left as saved
    delete node.properties[TEMPLATE_PROPERTY];
    const widget = node.widgets?.find((w) => w.name === "model");
    const serverDefault = node.constructor.nodeData?.inputs?.model?.default;
    if (widget && serverDefault !== undefined) widget.value = serverDefault;
  },
});
