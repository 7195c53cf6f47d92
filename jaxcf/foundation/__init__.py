"""The frozen foundation models (CLIP + a diffusion model) DiCap stands on: the shapes world's toy
pair pretrained by jaxcf (:mod:`.toy`), or CLIP + Stable Diffusion checkpoints (:mod:`.pretrained`);
exported weights and the load-or-train rule in :mod:`.weights`."""

from jaxcf.foundation.core import Foundation, build_foundation, encode_images, template_text_features
from jaxcf.foundation.weights import ASSETS, assets_dir, export_params, import_params, load_or_train

__all__ = ["ASSETS", "Foundation", "assets_dir", "build_foundation", "encode_images", "export_params",
           "import_params", "load_or_train", "template_text_features"]
