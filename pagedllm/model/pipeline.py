"""Which layers a pipeline stage holds, and the placeholders for those it does not.

With pipeline_parallel_size = P the decoder layers are cut into P runs, one per stage:

    30 layers, P = 2:  stage 0 holds layers 0-14 (and the token embedding),
                       stage 1 holds layers 15-29 (and the final norm and lm_head)

A stage builds only its own modules; the rest become `MissingModule`s, which keep the module
tree's names (so `model.layers.17.mlp...` is the same name on every stage and in the
checkpoint) but hold nothing, and whose checkpoint weights the stage skips at load. A tied
lm_head needs the embedding's weight: the last stage then builds the embedding too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pagedllm.distributed.parallel_state import pp_group


class MissingModule(nn.Module):
    """A module another pipeline stage holds."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module lives on another pipeline stage")


@dataclass(frozen=True)
class Stage:
    start: int  # first decoder layer this stage holds
    end: int  # one past its last
    is_first: bool
    is_last: bool

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def holds(self, layer: int) -> bool:
        return self.start <= layer < self.end


def this_stage(num_layers: int) -> Stage:
    """This process's share of `num_layers`: as even as can be, the first stages taking one
    more where P does not divide the count."""
    pp = pp_group()
    if num_layers < pp.size:
        raise ValueError(f"pipeline_parallel_size {pp.size} exceeds the model's {num_layers} "
                         f"layers")
    base, extra = divmod(num_layers, pp.size)
    start = pp.rank * base + min(pp.rank, extra)
    end = start + base + (pp.rank < extra)
    return Stage(start, end, pp.is_first, pp.is_last)


def stage_layers(stage: Stage, num_layers: int, build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """Every layer index, built where this stage holds it and a MissingModule elsewhere."""
    return nn.ModuleList(build(i) if stage.holds(i) else MissingModule()
                         for i in range(num_layers))


def held_layers(layers: nn.ModuleList, stage: Stage) -> nn.ModuleList:
    """The layers this stage runs, in order (the list itself with one stage: no copy)."""
    if stage.start == 0 and stage.end == len(layers):
        return layers
    return layers[stage.start : stage.end]


def held(stage_holds: bool, build: Callable[[], nn.Module]) -> nn.Module:
    return build() if stage_holds else MissingModule()


def elsewhere(model: nn.Module) -> tuple[str, ...]:
    """The dotted prefixes (with a trailing dot) of the modules other stages hold."""
    return tuple(f"{name}." for name, module in model.named_modules()
                 if isinstance(module, MissingModule))


def on_other_stage(name: str, prefixes: tuple[str, ...]) -> bool:
    """Is checkpoint weight `name` another stage's to load?"""
    return bool(prefixes) and name.startswith(prefixes)
