"""ttds: generative recommendation with LLMs and twin-tower dynamic semantic IDs."""

__version__ = "0.1.0"
