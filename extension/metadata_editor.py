"""The card's user-metadata editor: A1111's generic editor (description, notes, preview) plus the
fields a LoRA card needs: activation text, preferred weight, negative text, sd version.

Saved as ``{stem}.json`` next to the file, in the keys A1111's built-in Lora uses ("activation
text", "preferred weight", "negative text", "sd version"), so both read the same files; the library
(``lora_engine.library.index``) reads them back as sidecars, and the cards use them (``page.card_fields``).
"""
from __future__ import annotations

SD_VERSIONS = ("Unknown", "SD1", "SD2", "SDXL")
FIELDS = ("activation text", "preferred weight", "negative text", "sd version")


def extra_values(user_metadata: dict) -> tuple:
    """Editor values of the extra fields from a ``{stem}.json`` dict (bad values fall back to defaults)."""
    try:
        weight = float(user_metadata.get("preferred weight") or 0.0)
    except (TypeError, ValueError):
        weight = 0.0
    version = str(user_metadata.get("sd version") or "Unknown")
    return (str(user_metadata.get("activation text") or ""), weight, str(user_metadata.get("negative text") or ""),
            version if version in SD_VERSIONS else "Unknown")


def updated(user_metadata: dict, activation: str, weight: float, negative: str, version: str) -> dict:
    out = dict(user_metadata)
    out.update({"activation text": activation, "preferred weight": float(weight or 0.0),
                "negative text": negative, "sd version": version})
    return out


def table_rows(controller, item: dict, rows: list) -> list:
    """The editor's file table: A1111's rows with "Hash:" filled in once the short hash is known (a
    generation computes it; listing the cards never reads whole files), then format, architecture, alias."""
    entry = next((e for e in controller.get_library().entries if e.path == item.get("filename")), None)
    if entry is None:
        return rows
    short = controller.known_short_hash(entry)
    if short:
        item["shorthash"] = short  # kept in the page item for the next opening
        rows = [(label, short if label == "Hash: " else value) for label, value in rows]
    return rows + [("Format: ", entry.format), ("Architecture: ", entry.architecture), ("Alias: ", entry.alias)]


def make_editor(controller, ui, tabname, page):
    """Instantiate the editor (A1111 only)."""
    import gradio as gr
    from modules import ui_extra_networks_user_metadata as base

    class LoraEngineMetadataEditor(base.UserMetadataEditor):
        def create_extra_default_items_in_left_column(self):
            self.edit_activation = gr.Textbox(label="Activation text", lines=2)
            self.edit_weight = gr.Slider(label="Preferred weight (0: the default weight setting)",
                                         minimum=-2.0, maximum=2.0, step=0.05)
            self.edit_negative = gr.Textbox(label="Negative text", lines=2)
            self.edit_version = gr.Radio(label="SD version", choices=list(SD_VERSIONS))

        def get_metadata_table(self, name):
            return table_rows(controller, self.page.items.get(name, {}), super().get_metadata_table(name))

        def put_values_into_components(self, name):
            return (*super().put_values_into_components(name), *extra_values(self.get_user_metadata(name)))

        def save_all(self, name, desc, notes, activation, weight, negative, version):
            meta = updated(self.get_user_metadata(name), activation, weight, negative, version)
            meta.update(description=desc, notes=notes)
            self.page.items.get(name, {})["user_metadata"] = meta
            self.write_user_metadata(name, meta)

        def create_editor(self):
            self.create_default_editor_elems()
            self.edit_notes = gr.TextArea(label="Notes", lines=4)
            self.create_default_buttons()
            extra = [self.edit_activation, self.edit_weight, self.edit_negative, self.edit_version]
            self.button_edit.click(
                fn=self.put_values_into_components, inputs=[self.edit_name_input],
                outputs=[self.edit_name, self.edit_description, self.html_filedata, self.html_preview,
                         self.edit_notes, *extra],
            ).then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
            self.setup_save_handler(self.button_save, self.save_all, [self.edit_description, self.edit_notes, *extra])

    return LoraEngineMetadataEditor(ui, tabname, page)
