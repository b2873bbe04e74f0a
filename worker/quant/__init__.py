"""Int8 quantization: the offline quantizer, its runtime projections and the verify gate."""
