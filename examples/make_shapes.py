"""Draw examples/shapes.png, the README's example image, with the synthetic scene renderer the tiny model was
trained on: a 3x2-tile image (336x224 px) with two red circles (top left, top right), a green triangle (bottom
left), a blue square (bottom) and the text "NVLM" (center), drawn at 2x the bitmap font like the training data.

    python examples/make_shapes.py      # rewrites examples/shapes.png (byte-identical)
"""

from pathlib import Path

from nvlm.train.synthetic import Obj, Scene, Text, render

SCENE = Scene(
    size=(336, 224),
    objects=(Obj("circle", "red", (0, 0)), Obj("circle", "red", (2, 0)), Obj("triangle", "green", (0, 2)),
             Obj("square", "blue", (1, 2))),
    texts=(Text("NVLM", (1, 1)),),
    background=(245, 245, 240),
    text_scale=2,
)
ANSWERS = {  # what the scene holds, for the tests and the README
    "How many circles are there?": "2",
    "What colour is the square?": "blue",
    "What text is written in the image?": "NVLM",
    "Where is the green triangle?": "bottom left",
    "Is there a blue circle?": "no",
}

if __name__ == "__main__":
    out = Path(__file__).with_name("shapes.png")
    render(SCENE).save(out, format="PNG")
    print(f"wrote {out}")
