"""Layer 2, the model: loading a timm model (factory.py), its labels (labels.py), the inference
backends (backends/), image bytes to a checked picture (decode.py) and to tensors (preprocess.py),
the batch function (classifier.py) and the one start-up path every engine shares (prepare.py).
Knows nothing of HTTP or of the engines."""
