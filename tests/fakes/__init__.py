"""Stand-ins for what cannot run here (TensorRT's builder, a GPU), shared by the tests that need them."""
