"""nexus-moe: assemble Mixture-of-Experts language models from dense domain experts."""

__version__ = "0.1.0"
