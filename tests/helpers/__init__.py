"""Helpers shared by the tests (imported as ``tests.helpers.<module>``; pytest collects nothing here).

* ``tiny_models``: tiny random instances of the real transformers classes, and a character tokenizer;
"""
