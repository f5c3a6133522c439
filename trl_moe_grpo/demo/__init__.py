"""Demo material, not part of the method: generated data and their rewards for the quickstart, the examples, the
tests and the benchmarks.

- `visual_mc`: multi-task visual multiple-choice questions (images drawn on the fly), their evaluation splits (held-out
  rows, shifted styles, held-out tasks), the `tally` reasoning task and the answer-letter reward.
- `digit_sum`: a verifiable text task (the last digit of a sum) and its accuracy reward.
"""
