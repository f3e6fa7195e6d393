"""Images in, labels.csv out: reading, sized decoding, near-copy grouping, the split, the demo set."""
