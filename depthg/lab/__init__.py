"""The lab: what notebooks and studies use around the method and the run, never on the training path.

- :mod:`~depthg.lab.notebook`: the notebooks' shared helpers (which run to make, loading a finished run,
  example predictions, the figures' runs);
- :mod:`~depthg.lab.viz`: plots (matplotlib, plotly, open3d);
- :mod:`~depthg.lab.ablation`: the miniature reproduction (variants x seeds, paired differences);
- :mod:`~depthg.lab.demo`: the loss on a single pair of crops (notebook 03).

Nothing is imported here eagerly: the plotting libraries load only when :mod:`~depthg.lab.viz` does.
"""
