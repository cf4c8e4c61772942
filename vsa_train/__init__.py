"""vsa_train: video DiT pretraining with dense attention or Video Sparse Attention."""
