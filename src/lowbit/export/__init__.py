"""Integer modules and (in later work) packed files and ONNX."""
