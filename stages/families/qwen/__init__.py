"""The Qwen2.5-VL family (the paper's Table III analogue): IAS vision tower, model, data path, captioner."""
