"""Parse ``<lora:…>`` / ``<lyco:…>`` tags out of a prompt. Never raises.

Grammar (A1111 1.10 ``modules/extra_networks.py`` + ``extra_networks_lora.py``, and the arguments of
sd-webui-lora-block-weight; every rule and corner case in docs/tag-grammar.md):

- a tag is ``<TYPE:ARGS>``; ARGS are split on every ``:``; an item that splits on ``=``
  into exactly two parts is named, the others are positional;
- ``name[:te[:unet[:dyn]]]``; te defaults to 1.0 and ``te=`` overrides it; unet defaults
  to te *after* that override (so ``<lora:x:1:te=0>`` switches both off) and ``unet=``
  overrides it; ``dyn`` is an integer;
- lora-block-weight arguments: ``lbw=``/``w=`` (preset or 12/17/20/26 vector), ``lbwe=``
  (elemental preset id), ``x=`` (value of ``X`` entries), ``start=``, ``stop=``,
  ``step=A-B``. A value in (0, 1) is a fraction of the steps, others are step numbers.

Deliberate differences from A1111, each so that one bad tag cannot cost the others:
``ARGS`` may not contain ``<`` (an unclosed ``<lora:a`` cannot swallow the next tag); a
malformed tag is skipped with one warning and the other tags still apply; the first
item is always the name; keys and values are stripped of spaces; the type is matched
case-insensitively (with a warning, A1111 ignores ``<LoRA:…>``); old LBW style
``<lora:x:1:PRESET>`` is read as ``lbw=PRESET`` with a warning instead of failing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .blocks import (DEFAULT_ELEMENT_PRESETS, DEFAULT_PRESETS, BlockSpec, ElementDirective, parse_directives,
                     parse_number, resolve_lbw)

TAG_RE = re.compile(r"<(\w+):([^<>]+)>")
TAG_TYPES = ("lora", "lyco")
_LOOSE_RE = re.compile(r"<\s*(?:lora|lyco)\s*:", re.IGNORECASE)
_INT_RE = re.compile(r"[+-]?\d+\Z")
KNOWN_NAMED = {"te", "unet", "dyn", "lbw", "w", "lbwe", "x", "start", "stop", "step"}


@dataclass(frozen=True)
class StepPoint:
    """A ``start=``/``stop=`` value: in (0, 1) a fraction of the run, otherwise a 1-based step number."""

    value: float

    @property
    def is_fraction(self) -> bool:
        return 0 < self.value < 1

    def step(self, total_steps: int) -> int:
        """The 1-based step number: ``max(1, round(f * total))`` for a fraction f (as LBW)."""
        if self.is_fraction:
            return max(1, round(self.value * total_steps))
        return int(self.value)

    def text(self) -> str:
        return repr(self.value) if self.is_fraction else str(int(self.value))


@dataclass(frozen=True)
class StepWindow:
    """When a LoRA applies during sampling (``start=``/``stop=``; None = from the first / to the last step).

    Steps follow lora-block-weight: on from 1-based step ``start``, off from 1-based step ``stop``;
    1-based step N is 0-based index N−1, and a fraction f of T steps is step ``max(1, round(f·T))``.
    As a fraction of the schedule (ComfyUI's hook keyframes), step N of T starts at (N−1)/T.
    The A1111 extension, the ComfyUI nodes and the parser all use this one type."""

    start: StepPoint | None = None
    stop: StepPoint | None = None

    @property
    def always(self) -> bool:
        return self.start is None and self.stop is None

    def active_at(self, step_index: int, total_steps: int) -> bool:
        """Whether the LoRA applies at 0-based ``step_index`` of ``total_steps``."""
        if self.start is not None and step_index < self.start.step(total_steps) - 1:
            return False
        if self.stop is not None and step_index >= self.stop.step(total_steps) - 1:
            return False
        return True

    def fractions(self, total_steps: int) -> tuple[float | None, float | None]:
        """``(start, stop)`` as fractions of the run, (N−1)/T for step N. With ``total_steps`` 0 (unknown)
        a fraction is kept as given and a whole step number raises ``ValueError``."""
        def frac(point: StepPoint | None) -> float | None:
            if point is None:
                return None
            if total_steps > 0:
                return (point.step(total_steps) - 1) / total_steps
            if point.is_fraction:
                return point.value
            raise ValueError(f"step number {point.text()} needs the number of steps (it is 0)")
        return frac(self.start), frac(self.stop)


@dataclass(frozen=True)
class LoraTag:
    """One parsed reference. ``raw`` is the tag as written and ``span`` its place in the prompt."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    lbw: BlockSpec | None = None
    lbwe: str | None = None
    elements: tuple[ElementDirective, ...] = ()
    x: float | None = None
    start: StepPoint | None = None
    stop: StepPoint | None = None
    kind: str = "lora"
    raw: str = field(default="", compare=False)
    span: tuple[int, int] = field(default=(0, 0), compare=False)
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def window(self) -> StepWindow:
        """The tag's ``start=``/``stop=`` as a :class:`StepWindow`."""
        return StepWindow(self.start, self.stop)

    def active_at(self, step_index: int, total_steps: int) -> bool:
        return self.window.active_at(step_index, total_steps)

    def to_text(self) -> str:
        """A tag that parses back to this one (A1111-readable when only name/te/unet/dyn are set)."""
        parts = [self.name, repr(self.te)]
        if self.unet != self.te:
            parts.append(repr(self.unet))
        named = (("dyn", self.dyn, str), ("lbw", self.lbw, lambda v: v.source), ("lbwe", self.lbwe, str),
                 ("x", self.x, repr), ("start", self.start, StepPoint.text), ("stop", self.stop, StepPoint.text))
        parts.extend(f"{key}={text(value)}" for key, value, text in named if value is not None)
        parts.extend(f"{k}={v}" for k, v in self.extra)
        return f"<{self.kind}:{':'.join(parts)}>"

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "name": self.name, "te": self.te, "unet": self.unet, "dyn": self.dyn,
            "lbw": None if self.lbw is None else {
                "source": self.lbw.source, "length": self.lbw.length,
                "blocks": [v.text() for v in self.lbw.values]},
            "lbwe": self.lbwe, "x": self.x,
            "start": None if self.start is None else self.start.value,
            "stop": None if self.stop is None else self.stop.value,
            "extra": dict(self.extra), "raw": self.raw, "span": list(self.span),
        }


@dataclass(frozen=True)
class ParsedPrompt:
    cleaned_text: str
    tags: tuple[LoraTag, ...]
    warnings: tuple[str, ...]


class _TagProblem(ValueError):
    """A reason to skip one tag (internal; never leaves this module)."""


def _number(text: str, what: str) -> float:
    v = parse_number(text)
    if v is None:
        raise _TagProblem(f"{what} {text.strip()!r} is not a number")
    return v


def _step_point(text: str, what: str) -> StepPoint:
    v = _number(text, what)
    if v < 0 or (v >= 1 and v != int(v)):
        raise _TagProblem(f"{what} {text.strip()!r} must be a fraction in (0, 1) or a whole step number")
    return StepPoint(v)


def _split_items(body: str) -> tuple[str, list[str], dict[str, str]]:
    items = body.split(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items[1:]:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1].strip()
        else:
            positional.append(item.strip())
    return items[0].strip(), positional, named


def _schedule(named: dict[str, str]) -> tuple[StepPoint | None, StepPoint | None]:
    start = _step_point(named["start"], "start") if "start" in named else None
    stop = _step_point(named["stop"], "stop") if "stop" in named else None
    if "step" in named:
        a, sep, b = named["step"].partition("-")
        if not sep or not a.strip() or not b.strip():
            raise _TagProblem(f"step={named['step']!r} must be A-B")
        start, stop = _step_point(a, "step start"), _step_point(b, "step stop")
    return start, stop


def _blocks(positional: list[str], named: dict[str, str], presets, elem_presets, warn):
    lbw_text = named.get("lbw", named.get("w"))
    old_style = len(positional) > 1 and parse_number(positional[1]) is None
    if lbw_text is None and old_style and (positional[1] in presets or "," in positional[1]):
        lbw_text = positional.pop(1)  # old LBW style <lora:x:1:PRESET>
        warn(f"block weights as third item {lbw_text!r} read as lbw={lbw_text} (A1111 would fail on it)")
    try:
        spec = None if lbw_text is None else resolve_lbw(lbw_text, presets)
    except ValueError as e:
        raise _TagProblem(f"lbw: {e}") from None
    lbwe = named.get("lbwe")
    elements: tuple[ElementDirective, ...] = ()
    if lbwe is not None:
        if lbwe not in elem_presets:
            raise _TagProblem(f"unknown elemental preset lbwe={lbwe!r}")
        try:
            elements = parse_directives(elem_presets[lbwe])
        except ValueError as e:
            raise _TagProblem(f"elemental preset {lbwe!r}: {e}") from None
    return spec, lbwe, elements


def _build_tag(kind: str, body: str, presets, elem_presets, warn) -> LoraTag:
    name, positional, named = _split_items(body)
    if not name:
        raise _TagProblem("empty name")
    spec, lbwe, elements = _blocks(positional, named, presets, elem_presets, warn)
    te = _number(positional[0], "te") if positional else 1.0
    if "te" in named:
        te = _number(named["te"], "te=")
    unet = _number(positional[1], "unet") if len(positional) > 1 else te
    if "unet" in named:
        unet = _number(named["unet"], "unet=")
    dyn_text = named.get("dyn", positional[2] if len(positional) > 2 else None)
    dyn = None
    if dyn_text is not None:
        if not _INT_RE.match(dyn_text.strip()) or int(dyn_text) < 1:
            raise _TagProblem(f"dyn {dyn_text.strip()!r} must be a whole number >= 1")
        dyn = int(dyn_text)
    if len(positional) > 3:
        warn(f"extra positional items ignored: {':'.join(positional[3:])!r}")
    x = _number(named["x"], "x=") if "x" in named else None
    start, stop = _schedule(named)
    extra = tuple((k, v) for k, v in named.items() if k not in KNOWN_NAMED)
    for k, v in extra:
        warn(f"unknown argument {k}={v} ignored")
    return LoraTag(name, te, unet, dyn, spec, lbwe, elements, x, start, stop, kind, extra=extra)


def _tidy_join(pieces: list[str]) -> str:
    """Join the text between removed tags, collapsing the whitespace a removal leaves."""
    acc = pieces[0]
    for piece in pieces[1:]:
        if (not acc or acc[-1] == "\n") or (acc[-1] in " \t" and piece[:1] in (" ", "\t")):
            piece = piece.lstrip(" \t")
        if not piece or piece[0] == "\n":
            acc = acc.rstrip(" \t")
        acc += piece
    return acc.strip()


def parse_prompt(text: str, presets: dict[str, str] | None = None,
                 element_presets: dict[str, str] | None = None) -> ParsedPrompt:
    """Remove every ``<lora:…>``/``<lyco:…>`` tag from ``text``; return the cleaned prompt,
    the parsed tags in prompt order, and one warning per problem (never raises)."""
    if not isinstance(text, str):
        return ParsedPrompt("", (), (f"prompt is not text ({type(text).__name__}); no tags read",))
    presets = DEFAULT_PRESETS if presets is None else presets
    elem_presets = DEFAULT_ELEMENT_PRESETS if element_presets is None else element_presets
    tags: list[LoraTag] = []
    warnings: list[str] = []
    pieces: list[str] = []
    pos = 0
    for m in TAG_RE.finditer(text):
        kind = m.group(1)
        if kind.lower() not in TAG_TYPES:
            continue  # another extra network's tag: not ours, left in place
        raw = m.group(0)
        tag_warn: list[str] = []
        if kind not in TAG_TYPES:
            tag_warn.append(f"tag type {kind!r} is case-sensitive in A1111 (write {kind.lower()!r})")
        pieces.append(text[pos:m.start()])
        pos = m.end()
        try:
            tag = _build_tag(kind.lower(), m.group(2), presets, elem_presets, tag_warn.append)
            tags.append(_with_origin(tag, raw, (m.start(), m.end())))
        except _TagProblem as e:
            tag_warn.append(f"{e}; tag skipped")
        except Exception as e:  # noqa: BLE001 - the host must never see an exception from a prompt
            tag_warn.append(f"internal error ({type(e).__name__}: {e}); tag skipped")
        warnings.extend(f"{_short(raw)}: {_one_line(w)}" for w in tag_warn)
    pieces.append(text[pos:])
    for piece in pieces:
        for lm in _LOOSE_RE.finditer(piece):
            warnings.append(f"{_short(piece[lm.start():lm.start() + 40])}: unclosed or malformed LoRA tag left in the prompt")
    return ParsedPrompt(_tidy_join(pieces), tuple(tags), tuple(warnings))


def _with_origin(tag: LoraTag, raw: str, span: tuple[int, int]) -> LoraTag:
    return replace(tag, raw=raw, span=span)


_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _one_line(s: str) -> str:
    """Warnings are one line each: line breaks are shown escaped."""
    return _LINE_BREAKS.sub(lambda m: repr(m.group(0))[1:-1], s)


def _short(s: str, n: int = 80) -> str:
    s = _one_line(s)
    return s if len(s) <= n else s[: n - 1] + "…"
