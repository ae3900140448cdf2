"""Make the sample images the README's requests use (all from data that installs with packages).

    python docs/examples/make_examples.py

- digit-7.png: a held-out scikit-learn digit, drawn as the classifier's model card says;
- scene.png: a held-out generated detection scene;
- photo.png, photo-small.png, photo-noisy.png, photo-blurred.jpg: scikit-image's 'coffee'
  photograph (held out from the restoration and IQA training), cropped, downscaled, with
  Gaussian noise (sigma 25) and with blur saved as JPEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent


def main() -> None:
    import skimage.data

    from hybridserve.models.training.digits import load_split
    from hybridserve.models.training.scenes import held_out_scenes

    _, held_out = load_split()
    seven = int(np.flatnonzero(held_out.labels == 7)[0])
    Image.fromarray(held_out.images[seven]).save(HERE / "digit-7.png")

    Image.fromarray(held_out_scenes(1)[0].image).save(HERE / "scene.png")

    photo = Image.fromarray(skimage.data.coffee()[40:296, 150:406])  # 256 x 256
    photo.save(HERE / "photo.png")
    photo.resize((128, 128), Image.BICUBIC).save(HERE / "photo-small.png")
    noisy = np.asarray(photo, dtype=np.float64) + np.random.default_rng(0).normal(0, 25, (256, 256, 3))
    Image.fromarray(noisy.clip(0, 255).round().astype(np.uint8)).save(HERE / "photo-noisy.png")
    photo.filter(ImageFilter.GaussianBlur(3)).save(HERE / "photo-blurred.jpg", quality=60)


if __name__ == "__main__":
    main()
