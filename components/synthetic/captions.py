"""Short English captions for the synthetic scenes, written like alt-text: 3-12 words, varied endings.

    short_caption(scene, rng)   # "two red stars, flat vector art" / "a blue circle sticker on a gray wall"

Real alt-text is terse and ends in many ways ("..., hand drawn", "... sticker", "... on a snowy
street"); language identifiers trained on sentences mistake such captions for other languages, so
the corpus carries them to keep the filter honest: every caption names the scene's colour and shape
(the evaluation classes) and nothing personal, and all are clean English the filter must keep.
"""

from __future__ import annotations

import numpy as np

from components.synthetic.vocab import COUNT_WORDS, PLURAL

OPENINGS = ("", "", "", "photo of ", "close-up of ", "drawing of ", "stock image of ")
ENDINGS = (
    ", flat vector art", ", hand drawn", " sticker", " clip art", " icon", " logo", " pattern", " wallpaper",
    ", minimalist poster", ", digital illustration", " on paper", " on a gray wall", " on a snowy street",
    " in the snow", " on a rainy window", " at the top of the page", " for a school project", ", kids drawing",
    " painted on wood", " on a white card", ", retro style", " made of felt", " cut from paper", " on a t-shirt",
    " in soft light", ", shot from above", " on the fridge door", " in an old notebook", ", printed on canvas",
    " on a cobblestone street", " beside the window", " for the blog header",
)


def short_caption(scene, rng: np.random.Generator) -> str:
    """A 3-12 word caption naming `scene`'s colour and shape, with one of ENDINGS."""
    n = scene.count
    article = "an" if scene.colour[0] in "aeiou" else "a"
    things = f"{COUNT_WORDS[n]} {scene.colour} {PLURAL[scene.shape]}" if n > 1 else \
        f"{rng.choice([article, 'one', 'a single'])} {scene.colour} {scene.shape}"
    text = str(rng.choice(OPENINGS)) + things + str(rng.choice(ENDINGS))
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text
