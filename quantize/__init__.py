"""Static INT8 quantization of the student encoders with onnxruntime.quantization (DESIGN §7)."""
