"""Old home of the synthetic world, now :mod:`depthg.world.synthetic`.

Kept only until ``depthg/pretrain.py`` and ``benchmarks/probe_backbone.py`` import from
``depthg.world``; then this file is deleted.
"""

from depthg.world.synthetic import GENERATOR_VERSION, make_world, render_scene  # noqa: F401
