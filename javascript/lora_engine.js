// lora-engine in AUTOMATIC1111's prompt boxes (every textarea under an element whose id ends in "_prompt").
//
// Ctrl+Up/Down on a <lora:...> / <lyco:...> tag moves the number under the caret: te (also on the type or
// the name, and a tag without weights gets one), unet, dyn (whole numbers, at least 1) or the named te=,
// unet=, dyn=, x= values, by A1111's step for extra networks (opts.keyedit_precision_extra), below zero too.
// The selection is left from after "<" to the colon before that number, where A1111 leaves it, so the
// next press moves the same number. A1111's own handler (keyupEditAttention, a keydown listener on
// window) gets one case right, a tag's last weight when it is positional, and is left to do it; what it
// would break inside a tag (another weight, a named value, a tag without weight, the caret at the tag's
// edges, a whole tag selected, a word or a (...) block running into a tag) is done or refused here first.
//
// Autocomplete after "<lora:" / "<lyco:" offers the names the Lora cards insert, found by name, file name
// or alias, and inserts the card's name and weight (GET lora-engine/v1/names). Up/Down choose, Tab/Enter
// insert, Escape or a real click elsewhere closes. Synthetic events neither open nor close it: A1111's
// token counter clicks a hidden button 800 ms after typing, and updateInput() fires "input".
(function() {
    "use strict";

    var A1111_KEY_EDIT = "*:is([id*='_toprow'] [id*='_prompt'], .prompt) textarea";
    var TAG = /<(lora|lyco):[^<>]*>/gi;
    var NUMBER = /^\s*[-+]?(\d+\.?\d*|\.\d+)\s*$/;
    var POSITIONAL = ["name", "te", "unet", "dyn"];  // A1111's positional arguments after the type
    var STEPS = {te: "weight", unet: "weight", x: "weight", dyn: "whole"};
    var DELIMITERS = ".,\\/!?%^*;:{}=`~() ";

    function setting(name, fallback) {
        var v = window.opts ? window.opts[name] : undefined;
        return typeof v === "number" && isFinite(v) ? v : fallback;
    }

    function targetOf(e) { return e.composedPath ? e.composedPath()[0] : e.target; }

    function isPrompt(el) {
        return !!el && el.tagName === "TEXTAREA" && !!el.closest("[id$='_prompt'], .prompt");
    }

    function changed(area) {
        if (typeof updateInput === "function") updateInput(area);
        else area.dispatchEvent(new Event("input", {bubbles: true}));
    }

    // ---- tags -----------------------------------------------------------------------------------------

    // A tag at text[start, start + raw.length): its ":"-separated fields after "<", each {from, to,
    // valueFrom, value, key}; key is "type", a positional role (POSITIONAL, then "extra") or, for an item
    // that splits on "=" into two parts (as A1111 reads named arguments), the name before "=".
    function parseTag(raw, start) {
        var fields = [], from = start + 1, positional = 0;
        raw.slice(1, -1).split(":").forEach(function(part, i) {
            var f = {from: from, to: from + part.length, valueFrom: from, value: part};
            var kv = part.split("=");
            if (i === 0) {
                f.key = "type";
            } else if (kv.length === 2) {
                f.key = kv[0].trim();
                f.value = kv[1];
                f.valueFrom = from + kv[0].length + 1;
            } else {
                f.key = POSITIONAL[positional++] || "extra";
                f.positional = true;
            }
            fields.push(f);
            from = f.to + 1;
        });
        return {start: start, end: start + raw.length, fields: fields};
    }

    function tagsIn(text) {
        var out = [], m;
        TAG.lastIndex = 0;
        while ((m = TAG.exec(text)) !== null) out.push(parseTag(m[0], m.index));
        return out;
    }

    function stepKind(f) { return f && STEPS[f.key] && NUMBER.test(f.value) ? STEPS[f.key] : null; }

    function indexWhere(list, test) {
        for (var i = 0; i < list.length; i++) if (test(list[i])) return i;
        return -1;
    }

    // te's field (te= wins over the positional one, as in A1111), or -1: the tag has none and te is 1.
    function teField(tag) {
        var named = indexWhere(tag.fields, function(f) { return f.key === "te" && !f.positional; });
        return named >= 0 ? named : indexWhere(tag.fields, function(f) { return f.key === "te"; });
    }

    // The field a press moves: the one after the colon that ends A1111's selection (from after "<"),
    // else the one under the caret or the selection's start; te on the type, the name, the tag's edges
    // or anything that is not a number to step.
    function fieldFor(text, tag, s, e) {
        var at = -1;
        if (s !== e && s === tag.start + 1 && text[e] === ":" && e < tag.end - 1) {
            at = indexWhere(tag.fields, function(f) { return f.from === e + 1; });
        } else if (s > tag.start && s < tag.end) {
            at = indexWhere(tag.fields, function(f) { return f.from <= s && s <= f.to; });
        }
        return at >= 0 && stepKind(tag.fields[at]) ? at : teField(tag);
    }

    // [open, close] indexes of the innermost "(...)" around pos, or null.
    function parenBlock(text, pos) {
        var a = -1, b = -1, depth = 0, i;
        for (i = pos - 1; i >= 0 && a < 0; i--) {
            if (text[i] === ")") depth++;
            else if (text[i] === "(" && depth-- === 0) a = i;
        }
        for (depth = 0, i = pos; i < text.length && b < 0; i++) {
            if (text[i] === "(") depth++;
            else if (text[i] === ")" && depth-- === 0) b = i;
        }
        return a >= 0 && b >= 0 ? [a, b] : null;
    }

    function wordAround(text, pos) {
        var delimiters = (window.opts && typeof opts.keyedit_delimiters === "string" ? opts.keyedit_delimiters
                          : DELIMITERS) + " \t\r\n";
        var a = pos, b = pos;
        while (a > 0 && delimiters.indexOf(text[a - 1]) < 0) a--;
        while (b < text.length && delimiters.indexOf(text[b]) < 0) b++;
        return [a, b];
    }

    // What Ctrl+Up/Down on [s, e) means for lora tags: {tag, field} to move (field -1: te, not written
    // yet), {refuse: true} where A1111 would rewrite part of a tag otherwise, or null: not about a tag.
    function locate(text, s, e) {
        var tags = tagsIn(text), i, tag, range;
        for (i = 0; i < tags.length; i++) {
            tag = tags[i];
            if (s === e ? tag.start <= s && s <= tag.end
                        : (tag.start < s && s < tag.end) || (s === tag.start && e <= tag.end)) {
                return {tag: tag, field: fieldFor(text, tag, s, e)};
            }
        }
        if (s === e && text.lastIndexOf("<", s - 1) <= text.lastIndexOf(">", s - 1)) {
            var block = parenBlock(text, s);  // A1111 then edits the number after the block's last colon
            if (block) {
                var colon = text.lastIndexOf(":", block[1]);
                if (colon > block[0] && tags.some(function(t) { return t.start < colon && colon < t.end; })) {
                    return {refuse: true};
                }
                return null;
            }
        }
        range = s === e ? wordAround(text, s) : [s, e];  // A1111 wraps this as "(range:1.1)"
        for (i = 0; i < tags.length; i++) {
            tag = tags[i];
            if (range[0] < tag.end && range[1] > tag.start && !(range[0] <= tag.start && range[1] >= tag.end)) {
                return {refuse: true};
            }
        }
        return null;
    }

    // A1111's handler moves a tag's last weight right when it is positional, from the caret inside the
    // tag or from the selection it leaves (after "<" to the last colon).
    function a1111DoesIt(area, tag, at, s, e) {
        var f = tag.fields[at];
        if (typeof window.keyupEditAttention !== "function" || !area.matches(A1111_KEY_EDIT)) return false;
        if (at !== tag.fields.length - 1 || !f.positional || stepKind(f) !== "weight") return false;
        return s === e ? tag.start < s && s < tag.end : s === tag.start + 1 && e === f.from - 1;
    }

    function formatWeight(w) {
        var v = parseFloat(w.toFixed(10));
        return Number.isInteger(v) ? v.toFixed(1) : String(v);
    }

    function move(area, tag, at, up) {
        var text = area.value, f = at >= 0 ? tag.fields[at] : null;
        var kind = f ? stepKind(f) : "weight";
        if (!kind) return;  // te is not a number (<lora:x:abc>): nothing to move, nothing to break
        var old = f ? parseFloat(f.value) : 1, sign = up ? 1 : -1, shown, colon;
        if (kind === "whole") shown = String(Math.max(1, Math.round(old) + sign));
        else shown = formatWeight(old + sign * setting("keyedit_precision_extra", 0.05));
        if (f) {
            text = text.slice(0, f.valueFrom) + shown + text.slice(f.to);
            colon = f.from - 1;
        } else {
            colon = tag.fields[1].to;
            text = text.slice(0, colon) + ":" + shown + text.slice(colon);
        }
        area.value = text;
        area.setSelectionRange(tag.start + 1, colon);
        changed(area);
    }

    // ---- autocomplete ---------------------------------------------------------------------------------

    var list = null;  // the open list: {area, box, hits, chosen}
    var names = null, namesAt = 0, generation = 0;

    function loadNames() {
        if (names && Date.now() - namesAt < 10000) return names;
        namesAt = Date.now();
        names = fetch("./lora-engine/v1/names").then(function(r) {
            if (!r.ok) throw new Error("HTTP " + r.status);
            return r.json();
        }).catch(function() {  // lora-engine's routes missing: A1111's list of files
            return fetch("./sdapi/v1/loras").then(function(r) { return r.json(); }).then(function(all) {
                return all.map(function(x) { return {name: x.name, alias: x.alias}; });
            });
        }).catch(function() {
            names = null;
            return [];
        });
        return names;
    }

    // The partial name between "<lora:" and the caret, or null.
    function query(area) {
        if (area.selectionStart !== area.selectionEnd) return null;
        var m = /<(lora|lyco):([^:<>]*)$/i.exec(area.value.slice(0, area.selectionStart));
        return m ? m[2] : null;
    }

    // 0: the name, its file name or alias starts with q; 1: one contains it; -1: none does.
    function rank(x, q) {
        var words = [x.name, x.name.split("/").pop(), x.alias || ""].map(function(w) { return w.toLowerCase(); });
        if (words.some(function(w) { return w.indexOf(q) === 0; })) return 0;
        return words.some(function(w) { return w.indexOf(q) >= 0; }) ? 1 : -1;
    }

    function matches(all, q) {
        q = q.toLowerCase();
        return all.map(function(x) { return {x: x, r: rank(x, q)}; })
            .filter(function(h) { return h.r >= 0; })
            .sort(function(a, b) { return a.r - b.r || a.x.name.toLowerCase().localeCompare(b.x.name.toLowerCase()); })
            .slice(0, 30)
            .map(function(h) { return h.x; });
    }

    function close() {
        generation++;
        if (list) {
            list.box.remove();
            list = null;
        }
    }

    function render() {
        var box = list.box;
        box.textContent = "";
        list.hits.forEach(function(x, i) {
            var item = document.createElement("div");
            item.appendChild(document.createTextNode(x.name));
            if (x.alias && x.alias !== x.name.split("/").pop()) {
                var alias = document.createElement("span");
                alias.textContent = "  " + x.alias;
                alias.style.cssText = "opacity:0.6;white-space:pre";
                item.appendChild(alias);
            }
            item.style.cssText = "padding:2px 6px;cursor:pointer;" +
                (i === list.chosen ? "font-weight:bold;background:var(--block-label-background-fill, rgba(128,128,128,0.25));" : "");
            item.addEventListener("mousedown", function(e) {
                e.preventDefault();  // the textarea keeps the focus and the caret
                pick(i);
            });
            box.appendChild(item);
        });
        var r = list.area.getBoundingClientRect();
        box.style.left = (window.scrollX + r.left) + "px";
        box.style.top = (window.scrollY + r.bottom) + "px";
    }

    function show(area, hits) {
        if (!hits.length) {
            close();
            return;
        }
        if (!list || list.area !== area) {
            close();
            var box = document.createElement("div");
            box.className = "lora-engine-complete";
            box.style.cssText = "position:absolute;z-index:1000;max-height:14em;overflow:auto;" +
                "background:var(--background-fill-primary, #fff);border:1px solid var(--border-color-primary, #888);";
            document.body.appendChild(box);
            list = {area: area, box: box};
        }
        list.hits = hits;
        list.chosen = 0;
        render();
    }

    function refresh(area) {
        if (query(area) === null) {
            close();
            return;
        }
        var mine = ++generation;
        Promise.resolve(loadNames()).then(function(all) {
            if (mine !== generation) return;  // closed or typed on while the names loaded
            var q = query(area);
            if (q === null) close();
            else show(area, matches(all, q));
        });
    }

    function pick(i) {
        var area = list.area, x = list.hits[i];
        close();
        var q = query(area);
        if (q === null) return;
        var pos = area.selectionStart, start = pos - q.length, rest = area.value.slice(pos);
        var written = /^[^:<>]*(?=(:[^<>]*)?>)/.exec(rest);  // completing the name of a written tag
        var weight = x.weight === undefined || x.weight === null ? setting("lora_engine_default_weight", 1) : x.weight;
        var text = written ? x.name : x.name + ":" + weight + ">";
        area.value = area.value.slice(0, start) + text + rest.slice(written ? written[0].length : 0);
        area.setSelectionRange(start + text.length, start + text.length);
        changed(area);
    }

    // Keys for the open list; true when the key was its.
    function listKey(e) {
        if (e.ctrlKey || e.metaKey || e.altKey) return false;
        if (e.key === "Tab" || e.key === "Enter") pick(list.chosen);
        else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
            var n = list.hits.length;
            list.chosen = (list.chosen + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
            render();
        } else if (e.key === "Escape") close();
        else return false;
        e.preventDefault();
        e.stopPropagation();
        return true;
    }

    // ---- events (document, capture phase: before A1111's listeners on window) ------------------------

    document.addEventListener("keydown", function(e) {
        var area = targetOf(e);
        if (list && area === list.area && listKey(e)) return;
        if (!isPrompt(area) || !(e.ctrlKey || e.metaKey) || (e.key !== "ArrowUp" && e.key !== "ArrowDown")) return;
        var s = area.selectionStart, end = area.selectionEnd;
        var hit = locate(area.value, s, end);
        if (!hit || (hit.tag && a1111DoesIt(area, hit.tag, hit.field, s, end))) return;
        e.preventDefault();
        e.stopPropagation();
        if (hit.tag) move(area, hit.tag, hit.field, e.key === "ArrowUp");
    }, true);

    document.addEventListener("input", function(e) {
        var area = targetOf(e);
        if (e.isTrusted && isPrompt(area)) refresh(area);  // typed, not updateInput() or another script
    }, true);

    document.addEventListener("keyup", function(e) {
        if (list && e.isTrusted && targetOf(e) === list.area && /^(ArrowLeft|ArrowRight|Home|End)$/.test(e.key)) {
            refresh(list.area);
        }
    }, true);

    document.addEventListener("click", function(e) {
        if (!list || !e.isTrusted) return;  // e.g. the token counter's click on its hidden button
        var t = targetOf(e);
        if (list.box.contains(t)) return;
        if (t === list.area) refresh(list.area);
        else close();
    }, true);
})();
