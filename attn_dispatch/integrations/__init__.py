"""Integrations of attn_dispatch's operations into third-party model libraries.

Each submodule is optional and imports its library on import: ``attn_dispatch.integrations.diffusers``
(extra ``attn-dispatch[diffusers]``) registers an ``attn_dispatch`` attention backend in diffusers.
Nothing is imported from here eagerly, so ``import attn_dispatch`` never needs those libraries.
"""
