"""Serving engine: continuous batching, slot KV memory, vision and prefix caches (token ids in, token ids out)."""

from .engine import Engine, ImageInput, Request, RequestError, TokenEvent, image_key

__all__ = ["Engine", "ImageInput", "Request", "RequestError", "TokenEvent", "image_key"]
