"""The LM backbone: one wrapper around any Hugging Face model, plus the texts it encodes."""
from ttds.backbone.backbone import Backbone, BackboneConfig, LoraSettings
from ttds.backbone.texts import DEFAULT_ITEM_TEMPLATE, item_texts, user_texts

__all__ = ["Backbone", "BackboneConfig", "LoraSettings", "DEFAULT_ITEM_TEMPLATE", "item_texts", "user_texts"]
