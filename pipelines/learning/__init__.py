"""Models and training: the CNN, training and fine-tuning, ONNX export, the per-site MLflow registry."""
