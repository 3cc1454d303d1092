"""Object colours of the simulated rooms: the demo colour encoder's hue prototypes (``CHROMATIC``) as a
circle, black as the one dark achromatic object colour, colour words in names, hue neighbours."""

from __future__ import annotations

import colorsys

from ..core.encoders.demo import CHROMATIC

#: Hue names around the colour circle (``CHROMATIC`` order, circular).
HUES: tuple[str, ...] = tuple(name for name, _ in CHROMATIC)
_HUE_DEG = dict(CHROMATIC)
#: The dark, achromatic object colour (HSV value < 0.08).
BLACK = "black"


def colour_word(name: str) -> str:
    """The palette colour named in ``name`` ("red box" -> "red"; "" when none)."""
    for word in name.lower().split():
        if word in _HUE_DEG or word == BLACK:
            return word
    return ""


def adjacent_colours(name: str) -> tuple[str, ...]:
    """Hue neighbours on the circular ``CHROMATIC`` list of the colour in ``name`` (a colour or an
    object name): "red" -> ("pink", "orange"). Empty for black or a name without a hue."""
    colour = colour_word(name)
    if colour not in _HUE_DEG:
        return ()
    i = HUES.index(colour)
    return HUES[i - 1], HUES[(i + 1) % len(HUES)]


def hue_rgb(colour: str, saturation: float, value: float) -> tuple[int, int, int]:
    """RGB 0-255 of a palette colour: HSV hue at the prototype (black: achromatic, ``value``)."""
    hue = 0.0 if colour == BLACK else _HUE_DEG[colour] / 360.0
    sat = 0.0 if colour == BLACK else saturation
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, value))
