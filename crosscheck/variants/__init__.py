"""The variant entries: one :class:`~crosscheck.variants.variant.Variant` per supported attention layer.

* :mod:`~crosscheck.variants.variant` — the entry: every fact about one variant, as fields;
* :mod:`~crosscheck.variants.registry` — all entries and the lookups (``registry.get``, ``default_run`` ...);
* one file per family: :mod:`~crosscheck.variants.book` (chapter 3), :mod:`~crosscheck.variants.torch_mha`,
  :mod:`~crosscheck.variants.grouped_query`, :mod:`~crosscheck.variants.transformers`, sharing
  :mod:`~crosscheck.variants.common`;
* :mod:`~crosscheck.variants.portmap` — the porting tables' types and builders.

Numpy only: the ttnn worker imports this package in an interpreter without torch or JAX
(``tests/crosscheck/test_layout.py`` holds it to that).
"""
