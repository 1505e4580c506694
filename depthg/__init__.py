"""DepthG Workbench: depth-guided unsupervised semantic segmentation (DepthG, CVPR 2024, on STEGO).

The package holds the method; notebooks in ``notebooks/`` call it. See README.md.
"""

__version__ = "0.1.0"
