"""The synthetic corpus's vocabulary: colours, shapes, backgrounds and the zero-shot prompts.

Plain data with no imports, so the torch-free serving command can use the templates.
"""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "green": (30, 165, 60), "blue": (35, 70, 225),
    "yellow": (245, 210, 20), "purple": (140, 45, 185), "orange": (250, 130, 10),
}
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross"]
PLURAL = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 248), "light gray": (200, 200, 200), "gray": (128, 128, 130),
    "dark gray": (60, 60, 62), "black": (12, 12, 12), "beige": (225, 210, 180), "brown": (110, 75, 45),
}
PATTERNS = ["plain", "gradient", "stripes", "checkered", "dotted"]
SIZES = {"small": (14, 24), "medium": (26, 40), "large": (44, 64)}
UNUSUAL_SIZES = {"tiny": (7, 11), "huge": (80, 110)}  # shape radii of the "size" shift only (never in the corpus)
REGIONS = {
    "in the top left corner": (0.25, 0.25), "in the top right corner": (0.75, 0.25),
    "in the bottom left corner": (0.25, 0.75), "in the bottom right corner": (0.75, 0.75),
    "in the center": (0.5, 0.5), "at the top": (0.5, 0.22), "at the bottom": (0.5, 0.78),
    "on the left": (0.22, 0.5), "on the right": (0.78, 0.5),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

SYNTHETIC_CLASSNAMES = list(COLOURS)
SYNTHETIC_TEMPLATES = [
    "a photo of a {} shape.",
    "a photo of {} shapes.",
    "a picture of a {} shape on a plain background.",
    "an image showing {} shapes.",
    "a drawing of a {} shape.",
    "{} shapes on a background.",
]
