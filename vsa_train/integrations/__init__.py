"""Interop with other libraries. `vsa_train.integrations.diffusers`: export runs as diffusers folders that stock
diffusers loads (VSAVideoPipeline, with their own code and a model card) and install VSA in diffusers'
WanTransformer3DModel (apply_vsa). Import the submodule explicitly: this package imports nothing, so vsa_train does
not need diffusers to train."""
