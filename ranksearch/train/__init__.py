"""Training: the loops (``loops``: SGD steps, one-cycle pretraining, a trial's fine-tune, BatchNorm recalibration,
evaluation) and the baseline every trial decomposes (``baseline``: pretrained once and cached, resumable, or the
user's own weights)."""
