"""Small text samples shipped with the package (licences in README.md beside this file).

Example:
    >>> from makemost_jax.assets import SAMPLES, read_sample
    >>> sorted(SAMPLES)
    ['austen', 'wiki']
    >>> read_sample("austen").startswith("Persuasion")
    True
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from makemost_jax.errors import InputError

# name -> (file, one-line description)
SAMPLES = {
    "austen": ("austen_persuasion.txt", "Jane Austen, Persuasion (1817), opening; public domain"),
    "wiki": ("wiki_academy_awards.txt", "Wikipedia, 'Academy Awards' (2016), opening; CC BY-SA 3.0"),
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample, by short name ("austen" or "wiki").

    Example:
        >>> sample_path("wiki").name
        'wiki_academy_awards.txt'
    """
    if name not in SAMPLES:
        raise InputError(f"unknown sample {name!r}; choose one of {sorted(SAMPLES)}")
    return Path(str(resources.files(__name__).joinpath(SAMPLES[name][0])))


def read_sample(name: str) -> str:
    """The text of a bundled sample, by short name ("austen" or "wiki").

    Example:
        >>> len(read_sample("austen").split())
        2062
    """
    return sample_path(name).read_text(encoding="utf-8")
