"""The embedded world: generator, datasets, episodes and the small CLIP trained on it.

Importing this package only registers the world model's word tokenizer with the encoders'
tokenizer registry (by module path, so nothing heavy is imported until a model card asks for
it); the encoders never import the world by name.
"""

from clipadapt.encoders.tokenizers import register_tokenizer

register_tokenizer("word", "clipadapt.world.tokenizer:tokenizer_from_card")
