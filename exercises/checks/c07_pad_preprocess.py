"""Exercise 7: LLaVA-1.5 'pad' preprocessing and normalisation."""

import torch

from .framework import describe, diagnose, exercise
from .toy import tiny_model


def test_images():
    """Non-square RGB images with structure (a gradient and a bright square), plus a grey one and
    an RGBA one."""
    from PIL import Image

    def make(w, h, mode="RGB"):
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rgb = torch.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                           (xx + yy) * 127 // (w + h)], -1)
        rgb[h // 4: h // 2, w // 4: w // 2] = torch.tensor([250, 250, 30])
        im = Image.fromarray(rgb.to(torch.uint8).numpy(), "RGB")
        return im.convert(mode) if mode != "RGB" else im
    return {"wide 40x24": make(40, 24), "tall 18x30": make(18, 30), "square 32x32": make(32, 32),
            "greyscale (mode L) 30x20": make(30, 20, "L"), "RGBA 20x28": make(20, 28, "RGBA")}


def pad_variant(image, size, mean, std, fill=None, paste=None, squash=False, resample=None):
    """The 'pad' recipe with one step changed (the fill colour, where the image is pasted, no
    padding at all, the resampling filter): each reproduces a known mistake."""
    import numpy as np
    from PIL import Image

    import data

    image = data.to_rgb(image)
    w, h = image.size
    if not squash:
        side = max(w, h)
        colour = fill if fill is not None else tuple(int(x * 255) for x in mean)
        square = Image.new("RGB", (side, side), colour)
        square.paste(image, paste if paste is not None else ((side - w) // 2, (side - h) // 2))
        image = square
    image = image.resize((size, size), resample if resample is not None else Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


@exercise(7, "07_pad_preprocess", "preprocess_pad",
          "LLaVA-1.5 'pad' preprocessing and normalisation")
def check_pad(fn, c):
    from PIL import Image

    import data

    TOL = 0.02  # normalised units: allows rounding the pad colour, not a different recipe
    encoders = ((16, data.CLIP_MEAN, data.CLIP_STD, "CLIP"),
                (24, data.SIGLIP_MEAN, data.SIGLIP_STD, "SigLIP"))
    for name, image in test_images().items():
        for size, mean, std, enc in encoders:
            want = data.preprocess_image(image.copy(), size, mean, std, mode="pad")
            got = fn(image.copy(), size, mean, std)
            if not (torch.is_tensor(got) and got.shape == want.shape):
                hint = None
                if torch.is_tensor(got) and got.shape == (size, size, 3):
                    hint = "channels first: (3, size, size), as the vision tower's Conv2d expects"
                c.check(f"[{name}, {enc}] returns a float tensor (3, {size}, {size})", False,
                        expected=f"shape {tuple(want.shape)}", got=describe(got), hint=hint)
            m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
            alt = lambda **changes: pad_variant(image, size, mean, std, **changes)  # noqa: E731
            mistakes = [(lambda: (want * s + m),
                         "normalise: (pixel / 255 - mean) / std, per channel"),
                        (lambda: alt(fill=(0, 0, 0)),
                         "pad with the MEAN colour (int(mean * 255) per channel), not black: after "
                         "normalisation the padding is ~0, i.e. 'nothing'"),
                        (lambda: alt(paste=(0, 0)),
                         "centre the image in the square: paste it at "
                         "((side - w) // 2, (side - h) // 2)"),
                        (lambda: alt(squash=True),
                         "do not stretch the image to a square: pad it to a square first "
                         "(side = max(w, h)), then resize"),
                        (lambda: alt(resample=Image.BILINEAR),
                         "resize with bicubic interpolation (Image.BICUBIC), as the CLIP "
                         "processor")]
            default = ("pad to a centred square with the mean colour, resize (bicubic), /255, "
                       "subtract mean, divide by std")
            c.close(f"[{name}, {enc} {size}px] equals data.preprocess_image(..., mode='pad')",
                    got, want, TOL, hint=diagnose(got, mistakes, default, atol=TOL))
    model = tiny_model(random_weights=True)
    im = test_images()["wide 40x24"]
    clip = (data.CLIP_MEAN, data.CLIP_STD)
    with torch.no_grad():
        want = model.encode_images(data.preprocess_image(im, 16, *clip)[None])
        got = model.encode_images(fn(im, 16, *clip)[None])
    c.close("plugged into the vision tower + projector: the image tokens are the same", got, want,
            1e-3 * max(1.0, want.abs().max().item()))
