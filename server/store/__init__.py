"""What is kept on disk: the model repository, its manifests, the traffic policy on record, and the chunked upload that registers a model."""
