"""The synthetic demo world: attributes and phrase bank, the image generator and corpus, and the pretraining
corpus drawn from the same generator. Ingest reads it as the `synthetic` format; pretraining, training on
ground-truth maps and the report's attribute scores read it too."""
