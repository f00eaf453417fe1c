"""batchax: a JAX framework for batched training and inference."""
