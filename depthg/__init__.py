"""DepthG Workbench: depth-guided unsupervised semantic segmentation (DepthG, CVPR 2024, on STEGO).

:mod:`depthg.method` holds the method and stands alone; the run around it (config, build, train,
evaluate, backbone, depth, features) sits here at the top, the datasets in :mod:`depthg.data`, and what
notebooks and studies use in :mod:`depthg.lab`. docs/architecture.md draws the layers; README.md says how
to run it.
"""

__version__ = "0.1.0"
