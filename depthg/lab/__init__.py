"""The lab: what notebooks and studies use around the method and the run, never on the training path.

- :mod:`~depthg.lab.notebook`: the notebooks' shared helpers (which run to make, loading a finished run,
  example predictions, the figures' runs);
- :mod:`~depthg.lab.lesson`: what every notebook does first and last (seeding, the projector figure style,
  live or static widgets, "What this shows", printed paths);
- :mod:`~depthg.lab.runview`: a finished training run as the training notebooks show it;
- :mod:`~depthg.lab.realdata`: what a real dataset run needs, the folder check, the plan with projected times;
- :mod:`~depthg.lab.results`: the results files (whatever worlds and variants they hold) and docs/published.md;
- :mod:`~depthg.lab.viz`: plots (matplotlib, plotly, open3d);
- :mod:`~depthg.lab.ablation`: the miniature reproduction (variants x seeds, paired differences);
- :mod:`~depthg.lab.demo`: the loss on a single pair of crops (notebook 03), perfect patches and the two
  probes (notebook 04).

Nothing is imported here eagerly: the plotting libraries load only when :mod:`~depthg.lab.viz` does.
"""
