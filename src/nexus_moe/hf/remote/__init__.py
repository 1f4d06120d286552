"""Modeling code that ``export`` writes into a Hugging Face folder for ``trust_remote_code=True``
(docs/design.md §15.1).

The modules here import only ``torch`` and ``transformers``: they are copied as they are into an
export folder, where transformers imports them, so they cannot import nexus-moe.
"""
