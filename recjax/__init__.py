"""recjax: a JAX research framework for recommender systems."""
__version__ = "0.1.0"
