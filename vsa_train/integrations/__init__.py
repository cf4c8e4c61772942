"""Interop with other libraries. `vsa_train.integrations.diffusers`: export runs as diffusers pipelines
(VSAVideoPipeline) and install VSA in diffusers' WanTransformer3DModel (apply_vsa). Import the submodule
explicitly: this package imports nothing, so vsa_train does not need diffusers to train."""
