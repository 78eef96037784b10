"""Activation sites of a decoder block, by TransformerLens's names.

Design choices:
- The names are TransformerLens's hook names, so an SAE config written for
  it names the same activations here: `blocks.{b}.hook_resid_pre`,
  `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`, `hook_resid_post`,
  `blocks.{b}.mlp.hook_post` and `blocks.{b}.attn.hook_z`. Block `b` is
  0-based; a negative `b` counts from the end (-1 is the last block).
- Each site is defined by the residual identities (docs/sites.md), so it
  means the same in every family: resid_mid = resid_pre + attn_out,
  resid_post = resid_mid + mlp_out, attn_out and mlp_out after the
  post-norms of Gemma-2/3 and OLMo-2, resid_post raw (before the final norm)
  also for the last block.
- The engine takes a site as a negative code in its `layers` array
  (csrc/sites.h: -1 - (block * 7 + kind)); the kinds are in that order here.
- A site resolves to its canonical name (absolute block): what a run stores
  and what results are keyed by; `canonical` accepts either spelling.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import LayerError, LayerTypeError

# kind -> hook name suffix, in the engine's order (csrc/sites.h rl_site)
SITE_KINDS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")
HOOKS = {"resid_pre": "hook_resid_pre", "attn_z": "attn.hook_z", "attn_out": "hook_attn_out",
         "resid_mid": "hook_resid_mid", "mlp_post": "mlp.hook_post", "mlp_out": "hook_mlp_out",
         "resid_post": "hook_resid_post"}
_KIND_OF_HOOK = {v: k for k, v in HOOKS.items()}
_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")
FORMS = ("blocks.{b}.hook_resid_pre, blocks.{b}.hook_attn_out, blocks.{b}.hook_resid_mid, "
         "blocks.{b}.hook_mlp_out, blocks.{b}.hook_resid_post, blocks.{b}.mlp.hook_post, "
         "blocks.{b}.attn.hook_z (b a block index, negative from the end)")


@dataclass(frozen=True)
class Site:
    """One site of one block: `name` canonical, `code` the engine's output code."""
    block: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.block}.{HOOKS[self.kind]}"

    @property
    def code(self) -> int:
        return -1 - (self.block * len(SITE_KINDS) + SITE_KINDS.index(self.kind))

    def width(self, config: dict) -> int:
        """Floats per row: intermediate_size (mlp_post), heads x head_dim (attn_z), else hidden."""
        if self.kind == "mlp_post":
            return int(config["intermediate_size"])
        if self.kind == "attn_z":
            return int(config["num_heads"]) * int(config["head_dim"])
        return int(config["hidden_size"])

    @property
    def needs_layer(self) -> int:
        """The max_layer a Model must load for this site (blocks 0..b, resid_pre 0..b-1)."""
        return self.block if self.kind == "resid_pre" else self.block + 1


def parse_site(name: object, num_layers: int) -> Site:
    """The Site a name means for a model of `num_layers` blocks; LayerError naming
    the valid forms (LayerTypeError for a non-str)."""
    if not isinstance(name, str):
        raise LayerTypeError(f"a site must be a str such as 'blocks.0.hook_resid_post', got "
                             f"{name!r}")
    m = _NAME.fullmatch(name.strip())
    if not m or m.group(2) not in _KIND_OF_HOOK:
        raise LayerError(f"unknown site {name!r}; the sites are {FORMS}")
    b = int(m.group(1))
    block = b + num_layers if b < 0 else b
    if not 0 <= block < num_layers:
        raise LayerError(f"site {name!r}: block {b} is out of range for a model of {num_layers} "
                         f"blocks (valid: 0..{num_layers - 1} or -{num_layers}..-1)")
    return Site(block, _KIND_OF_HOOK[m.group(2)])


def resolve_sites(sites: Iterable[str] | str, num_layers: int,
                  max_layer: int | None = None) -> list[Site]:
    """Sites in the given order (one name or a sequence); duplicates (after
    resolving negative blocks) and, with `max_layer`, sites deeper than the
    loaded blocks are LayerErrors."""
    if isinstance(sites, str):
        sites = [sites]
    out = [parse_site(s, num_layers) for s in sites]
    if not out:
        raise LayerError(f"sites is empty; give one or more of {FORMS}")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LayerError(f"sites name {', '.join(dup)} more than once")
    if max_layer is not None:
        for s in out:
            if s.needs_layer > max_layer:
                raise LayerError(f"site {s.name} needs blocks 0..{s.needs_layer - 1} but this "
                                 f"model loads only max_layer={max_layer}; load it with "
                                 f"max_layer >= {s.needs_layer}")
    return out


def canonical(name: str, num_layers: int) -> str:
    """The canonical name of a site given in either spelling (negative block or not)."""
    return parse_site(name, num_layers).name
