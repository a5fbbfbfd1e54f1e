"""Stage 1: EAT aesthetic scores and LayerCAM saliency maps into the saliency store."""

from pipeline.manifest import EAT_INPUT_SIZE as INPUT_SIZE  # no torch: the job's driver checks what is done without it

__all__ = ["INPUT_SIZE"]
