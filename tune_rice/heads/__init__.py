"""Training and choosing on banks: heads, the linear probe, folds, the final model, the statistics, the data audit."""
