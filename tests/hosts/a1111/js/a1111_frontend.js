// A stand-in for what AUTOMATIC1111 1.10.1's own frontend does around the txt2img/img2img prompt boxes,
// written for these tests from that version's observed behaviour (no A1111 code is copied here):
//
// - gradioApp(), updateInput(el) (a bubbling, untrusted "input" event), onUiLoaded(fn), the global `opts`;
// - the token counters: 800 ms after the last "input" on a prompt, `.click()` on the hidden
//   `<id>_token_button` while the counter is visible (a synthetic click that bubbles to `document`);
// - Ctrl+Up/Down (keyupEditAttention, called by a keydown listener on `window`) on prompt textareas matching
//   `*:is([id*='_toprow'] [id*='_prompt'], .prompt) textarea`. With nothing selected it selects the
//   enclosing <...> block, else the enclosing (...) block, from after the opening bracket to the block's
//   LAST colon, else the word around the caret (opts.keyedit_delimiters + whitespace). Then, after '<'
//   the number between the selection's end + 1 and the next '>' moves by keyedit_precision_extra; after
//   '(' the number before the next ')' moves by keyedit_precision_attention; any other selection is
//   first wrapped as "(sel:1.0)". Numbers are rounded to 12 significant digits, one-digit results get
//   ".0", a (x:1.0) is unwrapped, the selection stays where it was, and updateInput() follows;
// - cardClicked(tabname, text, negative, allowNegative): appends separator + text to the prompt.
//
// window.standin counts what happened: tokenClicks (the hidden button's clicks), keyEdits (edits made
// by this A1111 key handler, i.e. where lora_engine.js deferred to it).
(function() {
    "use strict";
    var loaded = [];
    window.standin = {tokenClicks: 0, keyEdits: 0};

    window.gradioApp = function() { return document; };
    window.onUiLoaded = function(fn) { loaded.push(fn); };
    window.updateInput = function(target) {
        var e = new Event("input", {bubbles: true});
        Object.defineProperty(e, "target", {value: target});
        target.dispatchEvent(e);
    };

    function promptArea(id) { return document.querySelector("#" + id + " > label > textarea"); }

    // ---- token counters ----
    function countTokensLater(promptId, counterId, buttonId) {
        var area = promptArea(promptId), timer = null;
        var button = document.getElementById(buttonId);
        button.addEventListener("click", function() {  // gradio's handler: recount on the server
            window.standin.tokenClicks++;
            var words = area.value.split(/\s+/).filter(Boolean).length;
            document.querySelector("#" + counterId + " span").textContent = words + "/75";
        });
        area.addEventListener("input", function() {
            clearTimeout(timer);
            timer = setTimeout(function() {
                var counter = document.getElementById(counterId);
                if (counter.classList.contains("token-counter-visible")) button.click();
            }, 800);
        });
    }

    function showTokenCounters() {
        document.querySelectorAll(".token-counter").forEach(function(c) {
            c.style.display = opts.disable_token_counters ? "none" : "block";
            c.classList.toggle("token-counter-visible", !opts.disable_token_counters);
        });
    }

    // ---- Ctrl+Up/Down ----
    // [open, close] indexes of the innermost open...close pair around pos, or null.
    function enclosing(text, pos, open, close) {
        var a = -1, b = -1, depth = 0, i;
        for (i = pos - 1; i >= 0; i--) {
            if (text[i] === close) depth++;
            else if (text[i] === open) { if (depth === 0) { a = i; break; } depth--; }
        }
        depth = 0;
        for (i = pos; i < text.length; i++) {
            if (text[i] === open) depth++;
            else if (text[i] === close) { if (depth === 0) { b = i; break; } depth--; }
        }
        return a >= 0 && b >= 0 ? [a, b] : null;
    }

    function wordAround(text, pos) {
        var delimiters = opts.keyedit_delimiters + " \r\n\t";
        var a = pos, b = pos;
        while (a > 0 && delimiters.indexOf(text[a - 1]) < 0) a--;
        while (b < text.length && delimiters.indexOf(text[b]) < 0) b++;
        return [a, b];
    }

    function formatWeight(w) {
        var s = String(parseFloat(w.toPrecision(12)));
        return s.length === 1 ? s + ".0" : s;
    }

    // A1111's handler is the global keyupEditAttention, called by a keydown listener on window.
    window.keyupEditAttention = function(event) {
        var area = event.composedPath()[0];
        if (!area.matches || !area.matches("*:is([id*='_toprow'] [id*='_prompt'], .prompt) textarea")) return;
        if (!(event.ctrlKey || event.metaKey) || (event.key !== "ArrowUp" && event.key !== "ArrowDown")) return;
        var text = area.value, s = area.selectionStart, e = area.selectionEnd, block, range;
        if (s === e) {
            block = enclosing(text, s, "<", ">") || enclosing(text, s, "(", ")");
            range = block ? [block[0] + 1, block[0] + 1 + text.slice(block[0] + 1, block[1]).lastIndexOf(":")]
                          : wordAround(text, s);
            s = range[0];
            e = range[1];
            area.setSelectionRange(s, e);
        }
        event.preventDefault();
        var close = ")", step = opts.keyedit_precision_attention;
        if (text[s - 1] === "<") {
            close = ">";
            step = opts.keyedit_precision_extra;
        } else if (text[s - 1] !== "(") {
            while (e > s && text[e - 1] === " ") e--;
            if (s === e) return;
            text = text.slice(0, s) + "(" + text.slice(s, e) + ":1.0)" + text.slice(e);
            s++;
            e++;
        }
        var end = text.indexOf(close, e + 1);
        var weight = end < 0 ? NaN : parseFloat(text.slice(e + 1, end));
        if (isNaN(weight)) return;
        weight = parseFloat((weight + (event.key === "ArrowUp" ? step : -step)).toPrecision(12));
        if (close === ")" && weight === 1) {
            text = text.slice(0, s - 1) + text.slice(s, e) + text.slice(end + 1);
            s--;
            e--;
        } else {
            text = text.slice(0, e + 1) + formatWeight(weight) + text.slice(end);
        }
        area.focus();
        area.value = text;
        area.setSelectionRange(s, e);
        window.standin.keyEdits++;
        updateInput(area);
    };
    window.addEventListener("keydown", function(event) { keyupEditAttention(event); });

    // ---- cards ----
    window.cardClicked = function(tabname, text, negative, allowNegative) {
        var area = promptArea(tabname + "_prompt");
        area.value = area.value + opts.extra_networks_add_text_separator + text;
        updateInput(area);
        return false;
    };

    window.addEventListener("load", function() {
        countTokensLater("txt2img_prompt", "txt2img_token_counter", "txt2img_token_button");
        countTokensLater("txt2img_neg_prompt", "txt2img_negative_token_counter", "txt2img_negative_token_button");
        showTokenCounters();
        loaded.forEach(function(fn) { fn(); });
        window.standin.ready = true;
    });
})();
