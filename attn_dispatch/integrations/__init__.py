"""Integrations of attn_dispatch's operations into third-party model libraries.

Each submodule is optional and imports its library on import: ``attn_dispatch.integrations.diffusers``
(extra ``attn-dispatch[diffusers]``) registers an ``attn_dispatch`` attention backend in diffusers;
``attn_dispatch.integrations.transformers`` (extra ``attn-dispatch[transformers]``) registers an
``attn_dispatch`` attention implementation in transformers. ``common`` holds what both need from the host.
Nothing is imported from here eagerly, so ``import attn_dispatch`` never needs those libraries.
"""
