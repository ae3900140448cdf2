"""Built-in architectures of hybridserve, referenced as ``hybridserve:<name>`` in specs.

The table maps each name to ``module:factory`` inside this package; modules are imported
only when a spec asks for one of their architectures.
"""

ARCHITECTURES: dict[str, str] = {
    "hybrid_classifier": "classifier:HybridClassifier",
    "hybrid_detector": "detector:HybridDetector",
    "hybrid_segmenter": "segmenter:HybridSegmenter",
    "hybrid_restorer": "restorer:HybridRestorer",
    "hybrid_iqa": "iqa:HybridIQA",
    "psnr": "metrics:PSNR",
    "ssim": "metrics:SSIM",
    "ms_ssim": "metrics:MSSSIM",
}

__all__ = ["ARCHITECTURES"]
