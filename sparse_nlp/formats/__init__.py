"""Pure codecs of the checkpoint format: tensors and dicts in, tensors and dicts out, no folder I/O.

- `sparse_nlp.formats.manifest`: the file names of a checkpoint and the ``sparse_nlp.files`` list in config.json;
- `sparse_nlp.formats.masks`: masks as packed bits (``sparse_masks.safetensors``);
- `sparse_nlp.formats.compact`: the compact weight encoding (``sparse_nlp_compact.safetensors``).

`sparse_nlp.checkpoint` is the only module that reads and writes checkpoint folders; it calls these.
"""
