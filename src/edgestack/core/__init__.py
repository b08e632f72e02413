"""The torch-free base every layer shares: ONNX Runtime session options (:mod:`.ort`), the
one rule that says whether two outputs agree (:mod:`.compare`), the sentence-embedding
quality metrics (:mod:`.quality`), and the optional progress bars every layer shows on stderr
(:mod:`.progress`; tqdm is imported only when a bar is shown).

Imports only the standard library, numpy and :mod:`edgestack.errors` at load (onnxruntime
inside the functions that need it), so the exporter, the targets, the package and the
on-device runtime can all import it; the import contracts in ``pyproject.toml`` keep it so.
"""
