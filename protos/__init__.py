"""Protocol definitions and their generated modules: the Open Inference Protocol and slimserve.v1."""
