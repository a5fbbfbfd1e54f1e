"""The InternVL family (the paper's base): IAS-ViT, model assembly, tiling data path, captioner, converter."""
