"""TensorFlow Datasets as a document source, read with `tfds.data_source` (random access).

`tfds.data_source` reads a prepared dataset's ArrayRecord files by index, without
TensorFlow and without `tf.data`; TensorFlow is needed only by some builders to
*prepare* a dataset (download and convert). Prepare once, anywhere, with
`tfds build <name> --file_format=array_record --data_dir=DIR` (or
`tfds.builder(name, file_format="array_record").download_and_prepare()`), then read
with `TfdsSource(name, split, fields, data_dir=DIR)` on every host.

Builders worth knowing for this library (field names as TFDS defines them):
- `pg19` (books, for segment recurrence): `TfdsSource("pg19", "train", "book_text")`
- `glue/sst2` (sentiment): `TfdsSource("glue/sst2", "train", {"text": "sentence", "label": "label"})`
- `wmt14_translate/de-en` (translation): `TfdsSource("wmt14_translate/de-en", "train", {"source": "de", "target": "en"})`
- `imdb_reviews`, `lm1b`, `wikipedia/20230601.en` (text), `tiny_shakespeare`.

Needs the optional extra: `pip install tensorflow-datasets` (no TensorFlow needed to read).

Example:
    >>> books = TfdsSource("pg19", "train", "book_text", data_dir="~/tensorflow_datasets")  # doctest: +SKIP
    >>> books[0]["text"][:20]                                                                # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from makemost_jax.data.sources import Fields, RecordsSource, _check_fields
from makemost_jax.errors import ConfigError, InputError

__all__ = ["TfdsSource"]

# TFDS registers its built-in builders by importing these packages, but it stops at the
# first package that fails to import (one needs h5py, another TensorFlow), so without
# TensorFlow text builders such as glue and wmt14_translate can stay unregistered.
_TEXT_BUILDER_PACKAGES = ("text", "translate", "summarization", "question_answering", "text_simplification")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ConfigError(
            "TfdsSource needs TensorFlow Datasets: `pip install tensorflow-datasets` "
            "(or `pip install 'makemost_jax[data]'`); TensorFlow itself is not needed to read"
        ) from e
    return tfds


def _register_text_builders() -> None:
    for package in _TEXT_BUILDER_PACKAGES:
        try:
            importlib.import_module(f"tensorflow_datasets.{package}")
        except ImportError:
            continue  # a package whose own dependencies are missing; its builders stay unavailable


class TfdsSource(RecordsSource):
    """A TFDS split as a `DocumentSource`, through `tfds.data_source` (ArrayRecord, random access).

    `name` is a TFDS builder name with an optional config (`"glue/sst2"`), `split` a TFDS
    split or slice (`"train"`, `"train[:1%]"`), `fields` picks and renames features as
    in `select_fields` (bytes become str, 0-d arrays Python scalars). `download=False`
    only reads data already prepared under `data_dir`.

    Example:
        >>> src = TfdsSource("glue/sst2", "validation", {"text": "sentence", "label": "label"})  # doctest: +SKIP
        >>> src[0]                                                                               # doctest: +SKIP
        {'text': "it 's a charming and often affecting journey . ", 'label': 1}
    """

    def __init__(
        self,
        name: str,
        split: str,
        fields: Fields = "text",
        data_dir: str | None = None,
        download: bool = True,
    ):
        self.name, self.split, self.fields = name, split, fields
        _check_fields(fields, repr(self))
        tfds = _import_tfds()
        try:
            self._data = self._open(tfds, name, split, data_dir, download)
        except tfds.core.registered.DatasetNotFoundError:
            _register_text_builders()
            try:
                self._data = self._open(tfds, name, split, data_dir, download)
            except tfds.core.registered.DatasetNotFoundError as e:
                raise InputError(
                    f"TFDS has no dataset {name!r} (data_dir={data_dir!r}); check the name against "
                    "https://www.tensorflow.org/datasets/catalog/overview or prepare it into data_dir"
                ) from e
        if len(self._data) == 0:
            raise InputError(f"{self!r} is empty; choose another split")

    @staticmethod
    def _open(tfds, name, split, data_dir, download):
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except tfds.core.registered.DatasetNotFoundError:
            raise
        except Exception as e:
            raise InputError(
                f"TFDS could not open {name!r} split {split!r} (data_dir={data_dir!r}): "
                f"{type(e).__name__}: {e}. Prepare it first with `tfds build {name} --file_format=array_record` "
                "(needs the network, and TensorFlow for some builders) or pass the data_dir that holds it"
            ) from e

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, fields={self.fields!r})"
