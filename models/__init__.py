"""hybridserve.models: architectures, weights and the one way to build a servable model.

``create_model(architecture, weights=..., args=...)`` builds an ``nn.Module`` from an
architecture reference and loads its weights. References:

- ``hybridserve:<name>``  a built-in architecture of this project (see ``builtin.ARCHITECTURES``);
- ``timm:<model_name>``    any timm model, built with ``pretrained=False``;
- ``spandrel``             a restoration checkpoint whose architecture spandrel detects;
- ``transformers:<kind>``  CvT, DETR, RT-DETR, SegFormer and UperNet through Hugging Face transformers;
- ``zoo:<name>``           AHIQ (full-reference) and MANIQA (no-reference) IQA on timm backbones;
- ``python:<module>:<factory>`` the operator's own code (a module name, or a ``.py`` file
  relative to the spec).

Task contracts every architecture follows (inputs are float tensors, NCHW):

- classification: ``x`` normalised → logits ``(N, C)``;
- detection: ``x`` normalised → ``(boxes (N, K, 4) xyxy in [0, 1] of the input, scores (N, K), labels (N, K))``;
- segmentation: ``x`` normalised ``(N, 3, H, W)`` → logits ``(N, C, h, w)``, one channel per label,
  with ``h <= H`` and ``w <= W`` (a decoder's output stride, e.g. ``H / 4``); the server upsamples
  the logits bilinearly (``align_corners=False``) to the requested output size and takes the
  argmax over ``C``;
- restoration: ``x`` in [0, 1] → ``(N, C, H*s, W*s)`` in [0, 1];
- iqa: no-reference ``x`` normalised → ``(N,)``; full-reference ``(reference, distorted)`` in [0, 1] → ``(N,)``.
"""

from hybridserve.models.factory import LoadedModel, create_model
from hybridserve.models.weights import UnsafeWeights, WeightsMismatch, read_state_dict, resolve_weights

__all__ = [
    "LoadedModel",
    "UnsafeWeights",
    "WeightsMismatch",
    "create_model",
    "read_state_dict",
    "resolve_weights",
]
