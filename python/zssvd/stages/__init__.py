"""The paper's stages, one module each, in the order ``pipeline`` runs them.

1 ``calibration`` -- the calibration windows; ``covariance`` + ``gradients`` -- the statistics pass;
2 ``whitening``; 3 ``decompose``; 4 ``scores`` (``curvature``: the second-order term of ``zero-sum-2nd``);
5 ``selection``; 6 ``correction``; 7 ``packing``.
"""
