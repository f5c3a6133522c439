"""Measuring what a model's routing does, outside training.

- `measures.py`: the routing measures, one definition each (gate and sequence routing entropy, task-wise JSD in
  nats and bits, text / vision token masks, routed set vs top-K, expert utilization), shared with the trainers;
- `routing.py`: `RoutingAnalysis`, the paper's routing figures (gate and sequence routing entropy, task-wise JSD);
- `route_sensitivity.py`: before training, the share of prompts whose sampled-routing rollouts disagree in reward;
- `modality.py`: tables and plots of a modality statistics file;
- `accuracy.py`: held-out accuracy as at inference (greedy decoding, top-K routing);
- `plots.py`: matplotlib, optional (the `plots` extra).
"""
