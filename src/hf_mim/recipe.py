"""One recipe-resolution step for every training script (pretrain.py, train_tokenizer.py, finetune.py):
which value each recipe setting takes, and where it came from.

Layers, a later one winning over an earlier one:

  the paper's recipe (the method's published settings; the script's general defaults under it)
  < the digits demo's settings (no data source given)
  < the data-size rule: training FROM SCRATCH on fewer than 50,000 images, where the paper's ImageNet
    recipe learns little in a short run (finetune.py, 1,000 CIFAR-10 labels, 100 steps: top-1 0.19 with
    it, 0.25 with the rule's; benchmarks/RESULTS.md), gets the lighter recipe of the script's demo
  < the user's explicit values, always.

`resolve_recipe` is a pure function of the layers; `RecipeInputs` holds what a script knows at parse time
and applies the data-size rule, the same for the three scripts, once the data's size is known;
`recipe_line` is what the start of every run prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .cards import plain_value

# Below this many training images a from-scratch run is "small data" (the size from which
# training.model_choice picks the base presets).
SMALL_DATA_MAX_IMAGES = 50_000
PAPER, DEMO, USER = "paper", "digits demo", "user"


@dataclass(frozen=True)
class Setting:
    """One recipe value and where it came from (PAPER, DEMO, a data-size rule, USER)."""

    value: object
    origin: str


def resolve_recipe(layers: Sequence[tuple[str, Mapping[str, object]]], user: Mapping[str, object]
                   ) -> dict[str, Setting]:
    """{name: Setting}: each layer (origin, values), in order, overrides the ones before it; the user's
    explicit values override every layer."""
    resolved: dict[str, Setting] = {}
    for origin, values in layers:
        resolved.update({name: Setting(value, origin) for name, value in values.items()})
    resolved.update({name: Setting(value, USER) for name, value in user.items()})
    return resolved


def is_small_data(train_images: int | None) -> bool:
    """Fewer than SMALL_DATA_MAX_IMAGES training images (a stream, None, is never small)."""
    return train_images is not None and train_images < SMALL_DATA_MAX_IMAGES


def data_size_layer(train_images: int | None, from_scratch: bool, values: Mapping[str, object]
                    ) -> list[tuple[str, Mapping[str, object]]]:
    """The data-size rule as a layer (empty when it does not apply): `values` for a from-scratch run on
    small data."""
    if not (from_scratch and is_small_data(train_images)):
        return []
    return [(f"data-size rule: {train_images:,} training images < {SMALL_DATA_MAX_IMAGES:,}, from scratch", values)]


@dataclass(frozen=True)
class RecipeInputs:
    """What a run's recipe depends on, known when its command line is parsed: the layers below the data-size
    rule (the paper's, the digits demo's), the user's explicit values, the data-size rule's values and
    whether the run trains from scratch on the user's data (no pre-trained weights, not the demo)."""

    layers: tuple[tuple[str, Mapping[str, object]], ...]
    user: Mapping[str, object]
    small_data: Mapping[str, object]
    from_scratch: bool

    def resolve(self, train_images: int | None = None) -> dict[str, Setting]:
        """The recipe in force on `train_images` training images (None: not known yet, or a stream)."""
        layers = [*self.layers, *data_size_layer(train_images, self.from_scratch, self.small_data)]
        return resolve_recipe(layers, self.user)


def explicit_options(parser, argv: Sequence[str], names) -> set[str]:
    """The destinations among `names` that argv sets, under any of their spellings (aliases, dashes)."""
    spelled = {arg.split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("-")}
    return {action.dest for action in parser._actions if action.dest in names
            and any(option.replace("-", "_") in spelled for option in action.option_strings)}


def recipe_line(recipe: Mapping[str, Setting]) -> str:
    """'Recipe in force: paper: a=1, b=2; user: c=3', the settings grouped by origin: the paper's first,
    the user's last."""
    groups: dict[str, list[str]] = {}
    for name, setting in recipe.items():
        groups.setdefault(setting.origin, []).append(f"{name}={format_value(setting.value)}")
    order = sorted(groups, key=lambda origin: (origin != PAPER) + (origin == USER))  # stable: the rest as met
    return "Recipe in force: " + "; ".join(f"{origin}: {', '.join(groups[origin])}" for origin in order)


def format_value(value: object) -> str:
    """As the model card shows a recipe value (`cards.plain_value`: an enum's value, not its name)."""
    value = plain_value(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


__all__ = ["DEMO", "PAPER", "SMALL_DATA_MAX_IMAGES", "USER", "RecipeInputs", "Setting", "data_size_layer",
           "explicit_options", "is_small_data", "recipe_line", "resolve_recipe"]
