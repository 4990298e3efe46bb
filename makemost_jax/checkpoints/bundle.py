"""Small trained artefacts (a classifier head, a memory module, a seq2seq model) as one Orbax folder.

A bundle is a folder with a JSON `meta/` item (format, config, anything the loader must check
before it builds shapes) and one or more weight trees. Loaders read `meta` first, check it,
then restore the trees into the shapes it implies, so a wrong folder fails with a message
that names it instead of an Orbax traceback.

Example:
    >>> import tempfile, numpy as np
    >>> path = save_bundle(tempfile.mkdtemp() + "/b", {"format": 1}, weights={"w": np.ones(2, np.float32)})
    >>> read_bundle_meta(path, "test bundle", "save_bundle")["format"]
    1
    >>> restore_bundle(path, weights=None)["weights"]["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import os

from makemost_jax.errors import CheckpointError


def save_bundle(directory: str, meta: dict, **trees) -> str:
    """Write `meta` (JSON) and each named weight tree to `directory`, replacing what is there.

    Returns the absolute path.

    Example:
        >>> # save_bundle("runs/head", {"format": 1, "config": {...}}, weights=head.weights)
    """
    import orbax.checkpoint as ocp  # imported on use: Orbax is slow to import

    path = os.path.abspath(directory)
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=True)
    return path


def read_bundle_meta(directory: str, what: str, writer: str) -> dict:
    """The JSON `meta` of a bundle; `CheckpointError` naming `what` and its `writer` when there is none.

    Example:
        >>> # meta = read_bundle_meta("runs/memory", "recurrence module", "save_module")
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(directory)
    if not os.path.isdir(os.path.join(path, "meta")):
        raise CheckpointError(f"{directory!r} holds no {what} (no meta/ folder inside); give a folder written by "
                              f"{writer}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_bundle(directory: str, **abstract) -> dict:
    """The named weight trees of a bundle, each restored into its abstract tree (None: as saved).

    Example:
        >>> # trees = restore_bundle("runs/memory", weights=jax.eval_shape(init_fn))
    """
    import orbax.checkpoint as ocp

    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(os.path.abspath(directory), ocp.args.Composite(**items))
    return {name: restored[name] for name in abstract}
