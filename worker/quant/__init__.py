"""Weight quantization formats and the methods the linear layers use to run them."""
