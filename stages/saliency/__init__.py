"""Stage 1: EAT aesthetic scores and LayerCAM saliency maps into the saliency store."""

# EAT's only input size (the official model works at 224 x 224 alone). Defined here, without torch, so the
# saliency job's driver can fingerprint the store and check what is done without importing the model.
INPUT_SIZE = 224
