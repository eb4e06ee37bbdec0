"""Server-side export pipeline: teacher training, distillation, ONNX export, bundle. Needs torch."""
