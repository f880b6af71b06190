"""The prompts of one batch -> which LoRA applies to which image, and how.

A1111 strips the tags of every prompt but hands the extra networks only the first prompt's
(``extra_networks.parse_prompts``), and never reads the negative prompt. Here each image's own
prompt and negative prompt are read with the core parser (``lora_engine.syntax.prompt``), so:

- a *variant* is one file at one setting (te, unet, dyn, block weights): one ``StackEntry``;
- a *use* says which image asked for it, from which prompt (positive or negative) and over
  which steps (``start=``/``stop=``).

Semantics of a use, for image i (``Variant.factor_for``):
positive tag -> the UNet rows of image i (cond and uncond, as a merged LoRA acts in A1111) and the
text encoder for both prompts of image i; negative tag -> the uncond row of image i and the text
encoder for the negative prompt of image i. ``start``/``stop`` gate the UNet only (the conds are
computed once before sampling, as in sd-webui-lora-block-weight).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Callable

from lora_engine.errors import LoraEngineError
from lora_engine.loras import stack_entry
from lora_engine.patch import StackEntry
from lora_engine.syntax.blocks import block_ratios
from lora_engine.syntax.prompt import LoraTag, StepWindow, parse_prompt


@dataclass(frozen=True)
class Use:
    image: int
    negative: bool
    window: StepWindow = StepWindow()


@dataclass
class Variant:
    ident: str
    entry: StackEntry
    mentioned: str
    short_hash: str | None
    uses: list[Use] = field(default_factory=list)

    def unet_on(self, image: int, uncond: bool, step_index: int, total_steps: int) -> bool:
        return any(u.image == image and (uncond or not u.negative) and u.window.active_at(step_index, total_steps)
                   for u in self.uses)

    def te_on(self, image: int, negative_prompt: bool) -> bool:
        return any(u.image == image and (negative_prompt or not u.negative) for u in self.uses)


@dataclass(frozen=True)
class BatchStacks:
    n_images: int
    variants: tuple[Variant, ...]
    positives: tuple[str, ...]  # prompts without tags
    negatives: tuple[str, ...]  # negative prompts without tags
    warnings: tuple[str, ...]

    @property
    def scheduled(self) -> bool:
        return any(not u.window.always for v in self.variants for u in v.uses)

    @property
    def uniform(self) -> bool:
        """Every image has the same positive stack, no negative tags, no step schedule: one merge fits all."""
        want = set(range(self.n_images))
        return not self.scheduled and all(
            not any(u.negative for u in v.uses) and {u.image for u in v.uses} == want for v in self.variants)

    def stack(self) -> list[StackEntry]:
        return [v.entry for v in self.variants]

    def first_image_stack(self) -> list[StackEntry]:
        """A1111's behaviour: the whole batch runs with the first prompt's (positive) LoRAs."""
        return [v.entry for v in self.variants if any(u.image == 0 and not u.negative for u in v.uses)]

    def hashes(self) -> list[tuple[str, str]]:
        return [(v.mentioned, v.short_hash) for v in self.variants if v.short_hash]

    def te_distinct(self) -> "BatchStacks":
        """Images whose prompt texts are equal but whose text-encoder LoRAs differ get texts that differ by
        leading spaces (k spaces for the k-th distinct text-encoder stack of that text). A1111 encodes
        each distinct text once per batch (``prompt_parser`` de-duplicates by exact string), while both of
        its tokenizers (CLIP's and OpenCLIP's ``whitespace_clean``) collapse and strip whitespace: every
        image then gets its own encode, of the same tokens, under its own LoRAs."""
        def distinct(texts, negative: bool) -> tuple[str, ...]:
            stacks: dict[str, list[tuple]] = {}
            out = []
            for i, t in enumerate(texts):
                te = tuple(v.ident for v in self.variants if v.entry.te != 0.0 and v.te_on(i, negative))
                seen = stacks.setdefault(str(t), [])
                if te not in seen:
                    seen.append(te)
                out.append(" " * seen.index(te) + str(t))
            return tuple(out)

        return dataclasses.replace(self, positives=distinct(self.positives, False),
                                   negatives=distinct(self.negatives, True))

    def te_conflicts(self) -> list[str]:
        """A1111 encodes each distinct prompt text once per batch (``prompt_parser`` dedups), so
        images with the same text but different text-encoder LoRAs would share the first one's conds
        (``te_distinct`` prevents it where the texts can be written back)."""
        out = []
        for negative, texts in ((False, self.positives), (True, self.negatives)):
            seen: dict[str, tuple] = {}
            for i, t in enumerate(texts):
                te = tuple(v.ident for v in self.variants if v.entry.te != 0.0 and v.te_on(i, negative))
                key = str(t)
                if key in seen and seen[key] != te:
                    which = "negative prompt" if negative else "prompt"
                    out.append(f"images share the {which} {t!r} but not its text-encoder LoRAs; A1111 encodes "
                               "it once, so they all get the first image's (UNet LoRAs stay per image)")
                    break
                seen.setdefault(key, te)
        return out

    def te_signature(self) -> tuple:
        """Changes whenever what the text encoder computes for some prompt of the batch changes."""
        return tuple((v.ident, tuple(sorted((u.image, u.negative) for u in v.uses)), v.entry.te)
                     for v in self.variants if v.entry.te != 0.0)


# resolve(name) -> (LoraFile, path identity incl. mtime, short hash); raises LoraEngineError
Resolver = Callable[[str], tuple[object, str, str | None]]


def _variant_ident(file_id: str, tag: LoraTag, ratios) -> str:
    return f"{file_id}|te={tag.te!r}|unet={tag.unet!r}|dyn={tag.dyn}|blocks={ratios}|elements={tag.elements}"


class _Builder:
    def __init__(self, resolve: Resolver, rng: random.Random):
        self.resolve, self.rng = resolve, rng
        self.variants: dict[str, Variant] = {}
        self.warnings: list[str] = []
        self.failed: set[str] = set()

    def add(self, tag: LoraTag, use: Use) -> None:
        if tag.name in self.failed:
            return
        try:
            lf, file_id, short = self.resolve(tag.name)
        except LoraEngineError as e:
            self.failed.add(tag.name)
            self.warnings.append(f"{tag.raw or tag.name}: {e}; skipped")
            return
        probe = block_ratios(tag, random.Random(0)).ratios if tag.lbw is not None else None
        key = _variant_ident(file_id, tag, probe)
        v = self.variants.get(key)
        if v is None:
            entry = stack_entry(lf, tag, key=key, rng=self.rng)
            v = self.variants[key] = Variant(key, entry, tag.name, short)
            for p in getattr(lf, "problems", [])[:1]:
                self.warnings.append(f"{tag.name}: {p}")
        v.uses.append(use)

    def prompt(self, text: str, image: int, negative: bool) -> str:
        parsed = parse_prompt(text or "")
        self.warnings.extend(parsed.warnings)
        for tag in parsed.tags:
            self.add(tag, Use(image, negative, tag.window))
        return parsed.cleaned_text


def build_batch(prompts: list[str], negative_prompts: list[str], resolve: Resolver,
                rng: random.Random | None = None) -> BatchStacks:
    """Read every image's prompt and negative prompt (missing negatives count as empty)."""
    b = _Builder(resolve, rng or random.Random())
    pos = [b.prompt(t, i, False) for i, t in enumerate(prompts)]
    negs = list(negative_prompts) + [""] * (len(prompts) - len(negative_prompts))
    neg = [b.prompt(t, i, True) for i, t in enumerate(negs[:len(prompts)])]
    return BatchStacks(len(prompts), tuple(b.variants.values()), tuple(pos), tuple(neg), tuple(dict.fromkeys(b.warnings)))


def tags_text(params_list) -> str:
    """A1111 ``ExtraNetworkParams`` (``.items``: the tag split on ``:``) back to tag text for the core parser."""
    return " ".join(f"<lora:{':'.join(str(i) for i in p.items)}>" for p in params_list)
