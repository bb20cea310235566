"""Helpers shared by the tests (imported as ``tests.helpers.<module>``; pytest collects nothing here).

* ``tiny_models``: tiny random instances of the real transformers classes, one per supported
  architecture, their input ids, and a character tokenizer for their 128-token vocabulary;
* ``packed``: random packed weights (``random_packed``: random indices and codebooks;
  ``random_uniform_packed``: a random weight on a min-max grid), the grid quantizer
  ``uniform_codebook``, and ``quantize_tiny``, the pipeline's stand-in for tiny models;
* ``errors``: the relative errors the tests bound (``rel_err``, Frobenius; ``max_rel_err``);
* ``limits``: the named limits on those errors, each with what it bounds;
* ``paths``: the repository root and the bundled fixture model.

Fixtures shared by several folders live in tests/conftest.py.
"""
