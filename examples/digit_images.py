"""A small offline image set for the examples: digits rendered with PIL.

Each image is one digit (0-9) in one of a few colours, drawn with PIL's
built-in scalable font at a random size, position and slant on a light,
slightly noisy background. Nothing is downloaded and no font file is
needed, so the same images come out on any machine with Pillow (a
dependency of matplotlib).

`render_digits` returns the images with their digit and colour labels;
`caption` and the word lists turn the labels into text for captions
(Stable Diffusion 3) and answers (PaliGemma).
"""

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

DIGIT_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
COLORS = {
    "red": (205, 30, 30),
    "green": (20, 140, 40),
    "blue": (30, 60, 210),
    "black": (20, 20, 20),
}
COLOR_WORDS = tuple(COLORS)


def caption(digit, color):
    """The caption of an image, e.g. `"a red digit seven"`."""
    return f"a {COLOR_WORDS[color]} digit {DIGIT_WORDS[digit]}"


def render_digits(num, size=32, seed=0, colors=None):
    """Renders `num` digit images.

    Args:
        num: int. Number of images.
        size: int. Height and width in pixels.
        seed: int. Seed of the digits, colours, sizes, positions and noise.
        colors: Sequence of colour names to draw from, or None for all of
            `COLOR_WORDS`.

    Returns:
        `(images, digits, colors)`: uint8 `(num, size, size, 3)`, and two
        int32 `(num,)` arrays, the digit (0-9) and the colour index into
        `COLOR_WORDS`.
    """
    rng = np.random.default_rng(seed)
    names = COLOR_WORDS if colors is None else tuple(colors)
    choices = np.array([COLOR_WORDS.index(name) for name in names])
    digits = rng.integers(0, 10, num).astype("int32")
    color_ids = rng.choice(choices, num).astype("int32")
    images = np.empty((num, size, size, 3), "uint8")
    scale = 4  # Draw large, then downsample: smooth edges.
    big = size * scale
    glyphs = {}  # (digit, font size) -> centred mask, drawn once
    for i in range(num):
        key = (int(digits[i]), int(big * rng.uniform(0.6, 0.85)))
        if key not in glyphs:
            font = ImageFont.load_default(size=key[1])
            glyph = Image.new("L", (big, big), 0)
            ImageDraw.Draw(glyph).text(
                (big / 2, big / 2),
                str(key[0]),
                fill=255,
                font=font,
                anchor="mm",
            )
            glyphs[key] = glyph
        shift = tuple(rng.uniform(-0.1, 0.1, 2) * big)
        mask = glyphs[key].rotate(
            rng.uniform(-15, 15), resample=Image.BILINEAR, translate=shift
        )
        mask = mask.resize((size, size), Image.LANCZOS)
        alpha = np.asarray(mask, "float32")[..., None] / 255.0
        background = rng.uniform(215, 250) + rng.normal(0, 4, (size, size, 1))
        ink = np.array(COLORS[COLOR_WORDS[color_ids[i]]], "float32")
        pixels = (1 - alpha) * background + alpha * ink
        images[i] = np.clip(pixels, 0, 255).astype("uint8")
    return images, digits, color_ids


def save_grid(images, path, columns=8, scale=2):
    """Saves uint8 `(n, h, w, 3)` images as one PNG grid; returns `path`."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, "uint8")
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = r * (h + 2) + 1, c * (w + 2) + 1
        grid[top : top + h, left : left + w] = image
    picture = Image.fromarray(grid)
    picture = picture.resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )
    picture.save(path)
    return path
