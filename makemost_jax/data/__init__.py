"""Data: document sources, tokenization and deterministic, resumable, sharded batches.

Sources (random access: `len(src)`, `src[i] -> dict`):
- `TextFiles(path_or_glob, split_paragraphs=False)`: a file is a document, a folder its `*.txt` files;
- `JsonlSource(path, fields)`: one JSON object a line;
- `TfdsSource(name, split, fields, data_dir=None)`: TensorFlow Datasets via `tfds.data_source`
  (optional: `pip install tensorflow-datasets`; TensorFlow is not needed to read);
- `HFDatasetSource(dataset_or_name, split, fields)`: Hugging Face `datasets` (optional: `pip install datasets`).

Batches (numpy, this process's rows; `state()` / `restore(state)` to resume exactly):
- `PackedLMBatches`: packed LM training rows (`tokens` [B, T+1], `loss_mask` [B, T], `segment_ids`, `positions`);
- `DocumentContiguousBatches`: one document per row across steps, for segment recurrence (`reset` flags);
- `RecordBatches`: shuffled lists of records for classification and translation.

TFDS and `datasets` are imported only when their adapters are used.

Example:
    >>> import makemost_jax as mm                                                        # doctest: +SKIP
    >>> from makemost_jax.data import TextFiles, DocumentContiguousBatches
    >>> it = DocumentContiguousBatches(TextFiles("books/"), mm.load_tokenizer(), batch_size=8, window=256)  # doctest: +SKIP
    >>> for batch in it: ...                                                             # doctest: +SKIP
"""

from makemost_jax.data.batching import (
    DocumentContiguousBatches,
    PackedLMBatches,
    RecordBatches,
    epoch_permutation,
    merge_states,
)
from makemost_jax.data.hf import HFDatasetSource
from makemost_jax.data.sources import DocumentSource, JsonlSource, TextFiles, select_fields
from makemost_jax.data.tfds import TfdsSource
from makemost_jax.data.tokens import DocumentTokenizer, TextTokenizer

__all__ = [
    "DocumentContiguousBatches",
    "DocumentSource",
    "DocumentTokenizer",
    "HFDatasetSource",
    "JsonlSource",
    "PackedLMBatches",
    "RecordBatches",
    "TextFiles",
    "TextTokenizer",
    "TfdsSource",
    "epoch_permutation",
    "merge_states",
    "select_fields",
]
