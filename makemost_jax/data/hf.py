"""Hugging Face `datasets` as a document source (map-style datasets, random access).

Wraps an in-memory or memory-mapped `datasets.Dataset`, a `DatasetDict` (pick `split`)
or a name for `datasets.load_dataset`. Streaming (`IterableDataset`) is refused: it has
no random access, so exact shuffling and resumption would be impossible.

Needs the optional extra: `pip install datasets`.

Example:
    >>> import datasets                                                       # doctest: +SKIP
    >>> ds = datasets.Dataset.from_dict({"sentence": ["Good.", "Bad."], "label": [1, 0]})  # doctest: +SKIP
    >>> HFDatasetSource(ds, fields={"text": "sentence", "label": "label"})[1]  # doctest: +SKIP
    {'text': 'Bad.', 'label': 0}
    >>> wiki = HFDatasetSource("wikitext", "train", "text", name="wikitext-103-raw-v1")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from makemost_jax.data.sources import Fields, RecordsSource, _check_fields
from makemost_jax.errors import ConfigError, InputError

__all__ = ["HFDatasetSource"]


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(
            "HFDatasetSource needs Hugging Face datasets: `pip install datasets` "
            "(or `pip install 'makemost_jax[data]'`)"
        ) from e
    return datasets


class HFDatasetSource(RecordsSource):
    """A Hugging Face dataset split as a `DocumentSource`.

    `dataset` is a `datasets.Dataset`, a `datasets.DatasetDict` (then `split` picks one)
    or a dataset name/path for `datasets.load_dataset(dataset, split=split, **load_kwargs)`.
    `fields` picks and renames columns as in `select_fields`.

    Example:
        >>> import datasets                                                   # doctest: +SKIP
        >>> ds = datasets.Dataset.from_dict({"en": ["Hello"], "es": ["Hola"]})  # doctest: +SKIP
        >>> HFDatasetSource(ds, fields={"source": "en", "target": "es"})[0]  # doctest: +SKIP
        {'source': 'Hello', 'target': 'Hola'}
    """

    def __init__(self, dataset: Any, split: str | None = None, fields: Fields = "text", **load_kwargs: Any):
        self.split, self.fields = split, fields
        self.name = dataset if isinstance(dataset, str) else type(dataset).__name__
        _check_fields(fields, repr(self))
        datasets = _import_datasets()
        if isinstance(dataset, str):
            try:
                dataset = datasets.load_dataset(dataset, split=split, **load_kwargs)
            except Exception as e:
                raise InputError(
                    f"datasets.load_dataset({self.name!r}, split={split!r}) failed: {type(e).__name__}: {e}. "
                    "Check the name and split, or load it yourself and pass the Dataset"
                ) from e
        elif load_kwargs:
            raise ConfigError(f"{self!r}: load_kwargs {sorted(load_kwargs)} apply only to a dataset name")
        if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise ConfigError(
                f"{self!r}: streaming datasets have no random access; load without streaming=True "
                "(or save a slice with Dataset.from_generator) so shuffling and resumption stay exact"
            )
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise InputError(f"{self!r}: split {split!r} is not one of {sorted(dataset)}; pass split=")
            dataset = dataset[split]
        if not isinstance(dataset, datasets.Dataset):
            raise ConfigError(f"HFDatasetSource takes a datasets.Dataset, DatasetDict or name, not {type(dataset)}")
        if len(dataset) == 0:
            raise InputError(f"{self!r} is empty; choose another split")
        self._data = dataset

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.name!r}, split={self.split!r}, fields={self.fields!r})"
