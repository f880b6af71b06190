// lora-engine for AUTOMATIC1111: LoRA name autocomplete after "<lora:" / "<lyco:" in the prompt boxes,
// and Ctrl+Up/Down on a <lora:...> tag changing its weight (negative weights included; A1111's own
// key edit matches [\d.]+ only). Names come from GET /sdapi/v1/loras.
(function() {
    "use strict";
    var names = null;
    var box = null;
    var TAG_BEFORE_CURSOR = /<(lora|lyco):([^:<>]*)$/;

    function loadNames() {
        if (names !== null) return Promise.resolve(names);
        return fetch("./sdapi/v1/loras").then(function(r) { return r.json(); }).then(function(list) {
            var seen = {};
            names = [];
            list.forEach(function(x) { [x.name, x.alias].forEach(function(n) { if (n && !seen[n]) { seen[n] = 1; names.push(n); } }); });
            names.sort(function(a, b) { return a.toLowerCase() < b.toLowerCase() ? -1 : 1; });
            return names;
        }).catch(function() { names = null; return []; });
    }

    function isPrompt(el) {
        return el && el.tagName === "TEXTAREA" && el.closest && el.closest("[id$='_prompt'], [id$='_neg_prompt']");
    }

    function closeBox() { if (box) { box.remove(); box = null; } }

    function insert(ta, m, name) {
        var pos = ta.selectionStart;
        var start = pos - m[2].length;
        var weight = (window.opts && opts.extra_networks_default_multiplier) || 1;
        var rest = ta.value.slice(pos);
        var closes = /^[^<>]*>/.test(rest);
        var text = name + (closes ? "" : ":" + weight + ">");
        ta.value = ta.value.slice(0, start) + text + rest;
        ta.selectionStart = ta.selectionEnd = start + text.length;
        updateInput(ta);
        closeBox();
    }

    function showBox(ta, m, hits) {
        closeBox();
        if (!hits.length) return;
        box = document.createElement("div");
        box.className = "lora-engine-complete";
        box.style.cssText = "position:absolute;z-index:1000;max-height:14em;overflow:auto;background:var(--background-fill-primary);border:1px solid var(--border-color-primary);";
        hits.slice(0, 30).forEach(function(n, i) {
            var item = document.createElement("div");
            item.textContent = n;
            item.style.cssText = "padding:2px 6px;cursor:pointer;" + (i === 0 ? "font-weight:bold" : "");
            item.addEventListener("mousedown", function(e) { e.preventDefault(); insert(ta, m, n); });
            box.appendChild(item);
        });
        var r = ta.getBoundingClientRect();
        box.style.left = (window.scrollX + r.left) + "px";
        box.style.top = (window.scrollY + r.bottom) + "px";
        document.body.appendChild(box);
        box._pick = function() { insert(ta, m, hits[0]); };
    }

    document.addEventListener("input", function(e) {
        var ta = e.target;
        if (!isPrompt(ta)) return;
        var m = TAG_BEFORE_CURSOR.exec(ta.value.slice(0, ta.selectionStart));
        if (!m) { closeBox(); return; }
        loadNames().then(function(list) {
            var q = m[2].toLowerCase();
            showBox(ta, m, list.filter(function(n) { return n.toLowerCase().indexOf(q) >= 0; }));
        });
    });

    // The tag around the cursor: [start, end) of "<lora:...>" or null.
    function tagAt(text, pos) {
        var start = text.lastIndexOf("<", pos - 1 < 0 ? 0 : pos - 1);
        if (start < 0) return null;
        var end = text.indexOf(">", start);
        if (end < 0 || end + 1 < pos) return null;
        var body = text.slice(start, end + 1);
        return /^<(lora|lyco):[^<>]*>$/.test(body) ? [start, end + 1] : null;
    }

    // New text of a tag with its first weight moved by delta: "<lora:name>" gains ":1", named te= is kept.
    function bumpWeight(tag, delta) {
        var body = tag.slice(1, -1).split(":");
        var precision = (window.opts && opts.keyedit_precision_extra) || 0.05;
        var i = body.length > 1 && /^\s*[-+]?(\d+\.?\d*|\.\d+)\s*$/.test(body[1]) ? 1 : -1;
        var w = i > 0 ? parseFloat(body[i]) : 1;
        w = Math.round((w + delta * precision) / precision) * precision;
        var txt = String(parseFloat(w.toFixed(4)));
        if (i > 0) body[i] = txt; else body.splice(2, 0, txt);
        return "<" + body.join(":") + ">";
    }

    document.addEventListener("keydown", function(e) {
        var ta = e.target;
        if (box && (e.key === "Tab" || e.key === "Enter")) { e.preventDefault(); box._pick(); return; }
        if (e.key === "Escape") closeBox();
        if (!isPrompt(ta) || !(e.ctrlKey || e.metaKey) || (e.key !== "ArrowUp" && e.key !== "ArrowDown")) return;
        var span = tagAt(ta.value, ta.selectionStart);
        if (!span) return;  // A1111's own key edit handles everything else
        e.preventDefault();
        e.stopImmediatePropagation();
        var tag = bumpWeight(ta.value.slice(span[0], span[1]), e.key === "ArrowUp" ? 1 : -1);
        ta.value = ta.value.slice(0, span[0]) + tag + ta.value.slice(span[1]);
        ta.selectionStart = span[0];
        ta.selectionEnd = span[0] + tag.length;
        updateInput(ta);
    }, true);

    document.addEventListener("click", function(e) { if (box && !box.contains(e.target)) closeBox(); });
    if (typeof onUiLoaded === "function") onUiLoaded(function() { names = null; });
})();
