"""Small text samples shipped with the package (licences in README.md beside this file).

Example:
    >>> from makemost_jax.assets import SAMPLES, read_sample
    >>> sorted(SAMPLES)
    ['austen', 'wiki']
    >>> read_sample("austen").startswith("Persuasion")
    True
"""

from __future__ import annotations

import json
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


def read_search_prompts() -> dict[str, list[str]]:
    """The fixed prompts of the search experiments (degenerate outputs, exact modes of the real model).

    Three kinds: "chat" questions (apply the model's chat template), plain "openings", and plain
    "endings" (sentences that read like the end of a text, where the empty continuation is likely).

    Example:
        >>> {kind: len(p) for kind, p in read_search_prompts().items()}
        {'chat': 12, 'openings': 6, 'endings': 6}
    """
    return json.loads(resources.files(__name__).joinpath("search_prompts.json").read_text(encoding="utf-8"))
