"""Input data: sources, in-memory datasets, augmentation, and the feed (`feed.make`) that hands batches to training."""
