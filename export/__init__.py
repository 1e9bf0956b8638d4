"""skyrt.export — torch reference modules, checkpoint loaders, ONNX export and engine builds."""
