"""Measuring what a model's routing does, outside training.

- `routing.py`: `RoutingAnalysis`, the paper's routing figures (gate and sequence routing entropy, task-wise JSD);
- `modality.py`: tables and plots of a modality statistics file;
- `accuracy.py`: held-out accuracy as at inference (greedy decoding, top-K routing);
- `plots.py`: matplotlib, optional (the `plots` extra).
"""
