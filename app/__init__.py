"""ray-detect: object-detection batch inference over image folders and buckets with Ray Data."""

__version__ = "0.1.0"
