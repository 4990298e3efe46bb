"""The per-token attribute classifier of conditional beam search (METHODS.md section 2).

For a prefix y<t of an output of prompt x, the head predicts, for every candidate next
token v at once, the logit of q(a | x, y<t, y_t = v):

    u   = h_t / rms(h_t)                           decoder hidden state at the last fed position
    a   = gelu(W1 u + b1 + S[n])                   S: one row per step count n
    z   = W2 a + b2                                small MLP, D -> H -> D
    logit_v = z . E_v + c_v + w . a                E (V, D): own copy of the LM's input embeddings,
                                                   c (V,) per-token bias, w (H,) context bias

h_t is `ModelOutput.hidden[hidden_layer]` (default -1: the last layer, after the final
norm), n the number of tokens generated before y_t (steps >= `max_steps` share the last
row of S). The LM stays frozen. E starts as the LM's embedding table divided by its RMS
(a scalar reparametrisation: embedding scales differ by orders of magnitude between
models, and unit scale lets the logits vary from the first step) and is trained, unless
`train_embeddings=False`: then E stays the LM's (scaled) table, is not saved, and is
taken from the model again at load time, which makes a saved head ~V + 2DH floats
instead of ~VD (SmolLM2-135M, H=128: ~0.8 MB instead of ~115 MB). The context bias
carries what a context says about every continuation alike (e.g. "this prompt leads to
long outputs"), which the product with E could express only through E's mean. The full
product is one vocabulary-sized matmul per step, like the LM head; the search needs
only its top-`prefilter` candidates, which `__call__` gathers from E instead (the same
numbers).

Training (`fit_classifier`): sample continuations from the model itself
(`sampling.generate`), label each whole sample with the attribute's exact labeller, and
train every prefix position, with the token actually taken, on that label by binary
cross-entropy, with the shared training loop. The LM's hidden states are computed once
(`sample_prefix_data`), so a training step costs only the head. `save_classifier` /
`load_classifier` keep a head with its config in an Orbax directory and refuse one made
for a model of another shape; `load_classifier("default", params)` is the head bundled
for the embedded SmolLM2-135M-Instruct (min-length:8).

Searching: `conditional_beam_search` is `beam.beam_search` with the head as its term
and the attribute's labeller as the filter of finished outputs; `search_text` runs any of
greedy / sample / beam / cbs / exact on prompt strings (`makemost generate --search`).

Dimensions: B batch, C candidates, D model width, H MLP width, V vocabulary, N new
tokens, M prefix rows.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from makemost_jax.models import from_hf_config, init_params
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 64})
    >>> head = init_classifier(init_params(cfg, jax.random.key(0)), attribute="min-length:4")
    >>> head(jnp.ones((2, 16)), jnp.array([[1, 2, 3], [4, 5, 6]]), 0).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from makemost_jax import training
from makemost_jax.checkpoints.bundle import read_bundle_meta, restore_bundle, save_bundle
from makemost_jax.decoding.attributes import Attribute, parse_attribute
from makemost_jax.decoding.beam import beam_search
from makemost_jax.decoding.exact import exact_mode
from makemost_jax.decoding.sampling import decoder_inputs, generate, generate_text, prefill_forward
from makemost_jax.errors import CheckpointError, ConfigError, InputError
from makemost_jax.models.cache import repeat_rows
from makemost_jax.models.model import forward
from makemost_jax.models.types import Params

FORMAT = 1  # bump when the saved layout changes
KIND = "makemost_jax.attribute_classifier"
BUNDLED = "cbs_min_length_8"  # the head in makemost_jax/assets for the embedded model


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Static shape and provenance of a classifier head (saved with it as JSON).

    `vocab_size`, `d_model`, `n_layers` are the LM's: a head works only with hidden
    states of a model of the same shape (`check_compatible`). `attribute` is the name of
    the attribute it predicts. `train_embeddings`: whether E is the head's own trained
    copy (saved with it) or the LM's table (frozen, supplied at load time).

    Example:
        >>> ClassifierConfig(vocab_size=10, d_model=16, n_layers=1).hidden_layer
        -1
    """

    vocab_size: int
    d_model: int
    n_layers: int
    hidden_layer: int = -1
    mlp_width: int = 256
    max_steps: int = 64
    attribute: str = ""
    train_embeddings: bool = True

    def __post_init__(self):
        _check_layer(self.hidden_layer, self.n_layers)
        for name in ("mlp_width", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")


def _check_layer(hidden_layer: int, n_layers: int):
    if not -(n_layers + 1) <= hidden_layer <= n_layers:
        raise ConfigError(f"hidden_layer={hidden_layer} is not a layer of a {n_layers}-layer model; "
                          f"use 0 (embeddings) .. {n_layers} (last), or -1 for the last")


def _shapes(config: ClassifierConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the trained (and saved) weights."""
    d, h = config.d_model, config.mlp_width
    shapes = {"w_in": (d, h), "b_in": (h,), "steps": (config.max_steps, h), "w_out": (h, d), "b_out": (d,),
              "w_context": (h,), "bias": (config.vocab_size,)}
    return {**shapes, "tokens": (config.vocab_size, d)} if config.train_embeddings else shapes


def _scaled_table(params: Params) -> jax.Array:
    """The input embeddings at the hidden width (through OPT's `project_in` where the table is narrower), unit RMS."""
    embed_VD = jnp.asarray(params["embed"]["tokens"], jnp.float32)
    if "project_in" in params["embed"]:
        embed_VD = embed_VD @ jnp.asarray(params["embed"]["project_in"]["kernel"], jnp.float32)
    return embed_VD / jnp.sqrt(jnp.mean(embed_VD ** 2))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttributeClassifier:
    """The head as a pytree (weights are leaves, the config is static): an AttributeTerm.

    `head(hidden_BD, candidates_BC, n_generated) -> logq_BC` (float32 log q(a | ...)).
    `weights` are trained; `table` is the LM's scaled embedding table when
    `config.train_embeddings` is False (else None, and E is `weights["tokens"]`).

    Example:
        >>> # logq_BC = head(out.hidden[head.hidden_layer][:, -1], candidates_BC, n_generated)
    """

    config: ClassifierConfig = dataclasses.field(metadata={"static": True})
    weights: dict
    table: jax.Array | None = None

    @property
    def hidden_layer(self) -> int:
        return self.config.hidden_layer

    @property
    def embeddings(self) -> jax.Array:
        """E (V, D)."""
        return self.weights["tokens"] if self.config.train_embeddings else self.table

    def features(self, hidden_BD, n_generated) -> tuple[jax.Array, jax.Array]:
        """(z_BD, context logit (B,)): the MLP of the (RMS-normalised) hidden state and the step count."""
        w = self.weights
        h_BD = jnp.asarray(hidden_BD, jnp.float32)
        u_BD = h_BD * jax.lax.rsqrt(jnp.mean(h_BD ** 2, axis=-1, keepdims=True) + 1e-6)
        step_B = jnp.clip(jnp.broadcast_to(jnp.asarray(n_generated, jnp.int32), h_BD.shape[:1]),
                          0, self.config.max_steps - 1)
        a_BH = jax.nn.gelu(u_BD @ w["w_in"] + w["b_in"] + w["steps"][step_B])
        return a_BH @ w["w_out"] + w["b_out"], a_BH @ w["w_context"]

    def logits(self, hidden_BD, n_generated) -> jax.Array:
        """(B, V) logits of q(a | x, y<t, y_t = v) for every token v: the full product."""
        z_BD, context_B = self.features(hidden_BD, n_generated)
        return z_BD @ self.embeddings.T + self.weights["bias"] + context_B[:, None]

    def token_logits(self, hidden_BD, tokens_BC, n_generated) -> jax.Array:
        """(B, C) logits for the given candidate tokens only (gathered rows of E)."""
        z_BD, context_B = self.features(hidden_BD, n_generated)
        rows_BCD = self.embeddings[tokens_BC]
        return jnp.einsum("bd,bcd->bc", z_BD, rows_BCD) + self.weights["bias"][tokens_BC] + context_B[:, None]

    def __call__(self, hidden_BD, candidates_BC, n_generated) -> jax.Array:
        return jax.nn.log_sigmoid(self.token_logits(hidden_BD, candidates_BC, n_generated))


def init_classifier(params: Params, *, attribute: str = "", hidden_layer: int = -1, mlp_width: int = 256,
                    max_steps: int = 64, train_embeddings: bool = True, prior: float = 0.5,
                    key=None) -> AttributeClassifier:
    """A fresh head for the LM `params`: E from its input embeddings (unit RMS), bias at logit(`prior`).

    `prior` is the expected fraction of positive labels (the head then starts calibrated
    on average); the MLP and the step rows start random.

    Example:
        >>> # head = init_classifier(mm.load(), attribute="min-length:8", prior=0.3)
    """
    cfg = params.config
    if not cfg.causal:
        raise ConfigError(f"{cfg.hf_model_type} is an encoder; attribute classifiers need a decoder model")
    if not 0.0 < prior < 1.0:
        raise ConfigError(f"prior={prior} must be strictly between 0 and 1")
    config = ClassifierConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                              hidden_layer=hidden_layer, mlp_width=mlp_width, max_steps=max_steps,
                              attribute=attribute, train_embeddings=train_embeddings)
    k_in, k_steps, k_out = jax.random.split(jax.random.key(0) if key is None else key, 3)
    shapes = _shapes(config)
    weights = {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}
    weights["w_in"] = jax.random.normal(k_in, shapes["w_in"]) / np.sqrt(cfg.d_model)
    # Step rows at the scale of W1 u: distinct from the start, so the head can use the step count
    # (which decides EOS for length attributes) before it memorises hidden states.
    weights["steps"] = jax.random.normal(k_steps, shapes["steps"])
    # z starts at ~1/sqrt(D) per entry, so z . E_v (E at unit scale) starts at ~1.
    weights["w_out"] = jax.random.normal(k_out, shapes["w_out"]) / np.sqrt(mlp_width * cfg.d_model)
    weights["bias"] = jnp.full(shapes["bias"], np.log(prior / (1 - prior)), jnp.float32)
    if train_embeddings:
        weights["tokens"] = _scaled_table(params)  # own copy (a new array), trained
        return AttributeClassifier(config, weights)
    return AttributeClassifier(config, weights, _scaled_table(params))


def check_compatible(classifier: AttributeClassifier, params: Params):
    """Raise `ConfigError` unless `classifier` was built for a model shaped like `params`.

    Example:
        >>> # check_compatible(load_classifier("runs/len8"), mm.load())
    """
    c, m = classifier.config, params.config
    for name in ("vocab_size", "d_model", "n_layers"):
        if getattr(c, name) != getattr(m, name):
            raise ConfigError(f"the attribute classifier was trained for a model with {name}={getattr(c, name)}, "
                              f"but this model has {name}={getattr(m, name)}; train one for this model "
                              "(makemost cbs-train MODEL ...)")


# --- training data ---------------------------------------------------------------------


@dataclasses.dataclass
class PrefixData:
    """Training rows for the head: one per generated token (EOS included) of each sample.

    Row r: the LM's hidden state before the token (`hidden`, (M, D)), the number of
    tokens generated before it (`steps`), the token (`tokens`), the label (`labels`,
    0/1), the sample it comes from (`sample`) and whether the sample took that token
    (`taken`). Taken rows carry the whole sample's label; the others are EOS rows: "had
    the sample ended here", labelled exactly by the attribute on the prefix.

    Example:
        >>> # data = sample_prefix_data(params, prompts, MinLength(8), eos_id=tok.eos_id)
        >>> # train, held_out = data.split(0.2)
    """

    hidden: np.ndarray
    steps: np.ndarray
    tokens: np.ndarray
    labels: np.ndarray
    sample: np.ndarray
    taken: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, keep: np.ndarray) -> PrefixData:
        """The rows where the boolean `keep` is True."""
        return PrefixData(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})

    def split(self, fraction: float, seed: int = 0) -> tuple[PrefixData, PrefixData]:
        """(train, held_out): a random `fraction` of the samples (all their rows) held out."""
        samples = np.unique(self.sample)
        n_out = round(fraction * len(samples))
        if not 0 < n_out < len(samples):
            raise ConfigError(f"holding out {fraction} of {len(samples)} samples leaves an empty part; "
                              "use more samples or another fraction")
        out = np.random.default_rng(seed).choice(samples, n_out, replace=False)
        held = np.isin(self.sample, out)
        return self.rows(~held), self.rows(held)

    def batch(self, index: np.ndarray) -> dict:
        return {"hidden": self.hidden[index], "steps": self.steps[index], "tokens": self.tokens[index],
                "labels": self.labels[index]}


@functools.partial(jax.jit, static_argnames=("attribute", "hidden_layer", "eos_id"))
def _label_and_hidden(params, prompt_UT, mask_UT, source_US, source_mask_US, tokens_BN, lengths_B, *, attribute,
                      hidden_layer, eos_id):
    """Labels of whole samples (B,), of every prefix as an output (B, N: prefix t = the
    first t tokens), and the hidden state before each generated token (B, N, D).

    Row b of the samples continues prompt b // (B / U) (of source b // (B / U) for an
    encoder-decoder; None otherwise): each prompt is run once, and its cache (with its
    encoded source) is copied to its samples, which then run in one call.
    """
    u, t = prompt_UT.shape
    b, n = tokens_BN.shape
    repeat = functools.partial(jnp.repeat, repeats=b // u, axis=0)
    prompt_BT, mask_BT = repeat(prompt_UT), repeat(mask_UT)
    ended_B = (lengths_B > 0) & (tokens_BN[jnp.arange(b), jnp.maximum(lengths_B - 1, 0)] == eos_id)
    labels_B = attribute.accepts(prompt_BT, mask_BT, tokens_BN, lengths_B - ended_B.astype(jnp.int32))
    prefix_labels_NB = jax.vmap(lambda t: attribute.accepts(prompt_BT, mask_BT, tokens_BN, jnp.full((b,), t)))(
        jnp.arange(n))
    first = prefill_forward(params, prompt_UT, mask_UT, t + n, source_US, source_mask_US,
                            return_hidden=True)  # only the hidden states are read
    cache = repeat_rows(first.cache, b // u)
    # Tokens after a row's EOS are padding at the end: they cannot affect earlier positions.
    rest = forward(params, tokens_BN, cache=cache, return_hidden=True, logits_at=-1)
    hidden_BND = jnp.concatenate([repeat(first.hidden[hidden_layer][:, -1:]), rest.hidden[hidden_layer][:, :-1]],
                                 axis=1)
    return labels_B, prefix_labels_NB.T, hidden_BND


def sample_prefix_data(params: Params, prompts: Sequence[Sequence[int]] | None, attribute: Attribute, *,
                       eos_id: int, pad_id: int | None = None, hidden_layer: int = -1, samples_per_prompt: int = 8,
                       max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       eos_rows: bool = True, batch_size: int = 64, seed: int = 0, progress: bool = True,
                       sources: Sequence[Sequence[int]] | None = None) -> PrefixData:
    """Sample `samples_per_prompt` continuations of every prompt, label them, keep the hidden states.

    An encoder-decoder samples outputs of each of its `sources` (token-id lists; `prompts`
    None: each output starts from the decoder start token).

    Sampling runs through `sampling.generate`, max(1, batch_size // samples_per_prompt)
    prompts (all their samples) at a time, one compilation per prompt-length bucket.
    Sample s of prompt p gets `sample` id p * samples_per_prompt + s. A sample that
    reaches `max_new_tokens` without EOS is labelled as it stands, so make
    `max_new_tokens` at least as long as the outputs the attribute looks at (e.g. >= L
    for `MinLength(L)`).

    `eos_rows` (choice, default on) adds, at every position where a sample did not end,
    the row "EOS here" with the exact label of the prefix as an output: the attribute
    decides it, so q(a | x, y<t, EOS) needs no estimate. Sampled outputs rarely end
    early, so without these rows the head sees few early EOS; with them it learns the
    exact answer for EOS at every step.

    Example:
        >>> # data = sample_prefix_data(params, [tok.encode_for_model(p) for p in texts], MinLength(8),
        >>> #                           eos_id=tok.eos_id, samples_per_prompt=16, max_new_tokens=24)
    """
    if prompts is None and sources is not None:
        prompts = [[params.config.decoder_start_token_id]] * len(sources)
    prompts = [list(p) for p in prompts or []]
    if not prompts or samples_per_prompt < 1:
        raise InputError(f"sample_prefix_data() got {len(prompts)} prompts and samples_per_prompt="
                         f"{samples_per_prompt}; give at least one prompt and one sample per prompt")
    pad_id = eos_id if pad_id is None else pad_id
    _check_layer(hidden_layer, params.config.n_layers)
    group = max(1, batch_size // samples_per_prompt)
    parts = []
    for start in tqdm(range(0, len(prompts), group), desc="sampling", disable=None if progress else True):
        chunk = prompts[start:start + group]
        real = len(chunk) * samples_per_prompt
        chunk = chunk + [chunk[0]] * (group - len(chunk))  # one batch shape: one compilation
        chunk_sources = None
        if sources is not None:
            chunk_sources = list(sources[start:start + group])
            chunk_sources += [chunk_sources[0]] * (group - len(chunk_sources))
        inputs = decoder_inputs(params, chunk, sources=chunk_sources, pad_id=pad_id)
        repeat = functools.partial(np.repeat, repeats=samples_per_prompt, axis=0)
        result = generate(params, repeat(inputs.prompts), repeat(inputs.prompt_mask),
                          sources=None if sources is None else repeat(inputs.sources),
                          source_mask=None if sources is None else repeat(inputs.source_mask),
                          max_new_tokens=max_new_tokens, key=jax.random.fold_in(jax.random.key(seed), start),
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
        labels_B, prefix_labels_BN, hidden_BND = _label_and_hidden(
            params, *(None if x is None else jnp.asarray(x) for x in (inputs.prompts, inputs.prompt_mask,
                                                                     inputs.sources, inputs.source_mask)),
            result.tokens, result.lengths, attribute=attribute, hidden_layer=hidden_layer, eos_id=eos_id)
        lengths_B = np.asarray(result.lengths)[:real]
        tokens_BN = np.asarray(result.tokens)[:real]
        keep_BN = np.arange(max_new_tokens)[None] < lengths_B[:, None]
        sample_BN = np.broadcast_to(start * samples_per_prompt + np.arange(real)[:, None], keep_BN.shape)
        hidden_MD = np.asarray(hidden_BND[:real], np.float32)[keep_BN]
        steps_BN = np.broadcast_to(np.arange(max_new_tokens, dtype=np.int32), keep_BN.shape)
        parts.append(PrefixData(
            hidden=hidden_MD, steps=steps_BN[keep_BN], tokens=tokens_BN[keep_BN],
            labels=np.broadcast_to(np.asarray(labels_B[:real], np.float32)[:, None], keep_BN.shape)[keep_BN],
            sample=sample_BN[keep_BN], taken=np.ones(keep_BN.sum(), bool)))
        if eos_rows:
            other_M = tokens_BN[keep_BN] != eos_id
            parts.append(PrefixData(
                hidden=hidden_MD[other_M], steps=steps_BN[keep_BN][other_M],
                tokens=np.full(other_M.sum(), eos_id, np.int32),
                labels=np.asarray(prefix_labels_BN[:real], np.float32)[keep_BN][other_M],
                sample=sample_BN[keep_BN][other_M], taken=np.zeros(other_M.sum(), bool)))
    return PrefixData(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(PrefixData)})


# --- training ------------------------------------------------------------------------------


def classifier_loss(classifier: AttributeClassifier, batch, *, rng=None, frozen=None):
    """Binary cross-entropy of each row's label given its taken token; metrics: tokens, accuracy.

    Example:
        >>> # loss, metrics = classifier_loss(head, data.batch(np.arange(256)))
    """
    logit_M = classifier.token_logits(batch["hidden"], batch["tokens"][:, None], batch["steps"])[:, 0]
    label_M = jnp.asarray(batch["labels"], jnp.float32)
    loss = jnp.mean(jax.nn.softplus(logit_M) - label_M * logit_M)
    accuracy = jnp.mean((logit_M > 0) == (label_M > 0.5))
    return loss, {"tokens": jnp.float32(label_M.shape[0]), "accuracy": accuracy}


@functools.lru_cache(maxsize=16)
def _weights_loss(config: ClassifierConfig):
    """`classifier_loss` as the training loop's loss_fn: it trains the weights, `frozen` is the table.

    Cached, so that evaluation compiles once per config.
    """
    def loss(weights, batch, *, rng, frozen):
        return classifier_loss(AttributeClassifier(config, weights, frozen), batch)
    return loss


class _RandomRows:
    """Batches of rows drawn with replacement; batch i depends only on (seed, i), so it resumes exactly."""

    def __init__(self, data: PrefixData, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed, self.position = data, batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        index = np.random.default_rng((self.seed, self.position)).integers(0, len(self.data), self.batch_size)
        self.position += 1
        return self.data.batch(index)

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict):
        self.position = int(state["position"])


def evaluate_classifier(classifier: AttributeClassifier, data: PrefixData, batch_size: int = 4096) -> dict:
    """Scores per prefix row: loss (cross-entropy), accuracy, and what a constant guess gets.

    majority: the majority-class rate (the accuracy of always guessing it); constant_loss:
    the cross-entropy of always predicting the positive rate; positives: that rate; rows.

    Example:
        >>> # evaluate_classifier(head, held_out)["accuracy"]
    """
    batches = (data.batch(np.arange(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size))
    scores = training.evaluate(classifier.weights, batches, _weights_loss(classifier.config), frozen=classifier.table)
    positives = float(np.mean(data.labels))
    rate = min(max(positives, 1e-12), 1 - 1e-12)
    return {"loss": scores["loss"], "accuracy": scores["accuracy"], "majority": max(positives, 1 - positives),
            "constant_loss": float(-rate * np.log(rate) - (1 - rate) * np.log(1 - rate)), "positives": positives,
            "rows": len(data)}


def train_classifier(classifier: AttributeClassifier, data: PrefixData, config: training.TrainConfig,
                     batch_size: int = 256, held_out: PrefixData | None = None
                     ) -> tuple[AttributeClassifier, dict]:
    """Train `classifier` on `data` with the shared loop; returns (a new classifier, history).

    The loop trains `classifier.weights` (a copy: the input stays usable); a borrowed
    table is passed as `frozen`. With `held_out`, `config.eval_every` evaluates on it
    (history["eval"]).

    Example:
        >>> # head, history = train_classifier(head, train_rows, TrainConfig(steps=300, learning_rate=3e-4))
    """
    if not len(data):
        raise InputError("train_classifier() got no training rows")
    head_config, table = classifier.config, classifier.table
    eval_fn = None if held_out is None else (
        lambda weights: evaluate_classifier(AttributeClassifier(head_config, weights, table), held_out))
    # The loop donates its input; copy so the caller's head is not consumed.
    weights = jax.tree.map(jnp.copy, classifier.weights)
    state, history = training.train(config, weights, _RandomRows(data, batch_size, config.seed),
                                    loss_fn=_weights_loss(head_config), eval_fn=eval_fn, frozen=table)
    return AttributeClassifier(head_config, state.params, table), history


def fit_classifier(params: Params, prompts: Sequence[Sequence[int]] | None, attribute: Attribute, *, eos_id: int,
                   pad_id: int | None = None, hidden_layer: int = -1, mlp_width: int = 256,
                   max_steps: int | None = None, train_embeddings: bool = True,
                   samples_per_prompt: int = 8, max_new_tokens: int = 32,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_rows: bool = True,
                   held_out: float = 0.2,
                   train_config: training.TrainConfig | None = None, batch_size: int = 256, seed: int = 0,
                   progress: bool = True, sources: Sequence[Sequence[int]] | None = None
                   ) -> tuple[AttributeClassifier, dict]:
    """Sample, label, train and evaluate a head for `attribute`: the whole pipeline (an
    encoder-decoder samples outputs of its `sources`, see `sample_prefix_data`).

    `max_steps` defaults to `max_new_tokens`; `train_config` to 300 steps of AdamW at
    3e-4 (20 warm-up steps). Returns (classifier, report) where report
    has the sample count, the positive rate, the first and last training loss and the
    held-out scores (`evaluate_classifier`) on the rows of the tokens the samples took
    (`held_out`) and on the added EOS rows (`held_out_eos`); with `held_out=0` everything
    trains and both are None.

    Example:
        >>> # head, report = fit_classifier(mm.load(), prompt_ids, MinLength(8), eos_id=tok.eos_id)
        >>> # report["held_out"]["accuracy"], report["held_out"]["majority"]
    """
    data = sample_prefix_data(params, prompts, attribute, eos_id=eos_id, pad_id=pad_id, hidden_layer=hidden_layer,
                              samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_rows=eos_rows, seed=seed,
                              progress=progress, sources=sources)
    taken = data.rows(data.taken)
    sample_labels = taken.labels[np.unique(taken.sample, return_index=True)[1]]
    if sample_labels.min() == sample_labels.max():
        raise ConfigError(f"all {len(sample_labels)} samples were labelled {bool(sample_labels[0])} by "
                          f"{attribute.name}: a classifier would learn a constant. Change max_new_tokens, the "
                          "sampling temperature or the attribute so that both outcomes occur")
    train_rows, eval_rows = data.split(held_out, seed) if held_out else (data, None)
    config = train_config or training.TrainConfig(steps=300, learning_rate=3e-4, warmup_steps=20, progress=progress)
    prior = float(np.clip(train_rows.labels.mean(), 0.01, 0.99))
    head = init_classifier(params, attribute=attribute.name, hidden_layer=hidden_layer, mlp_width=mlp_width,
                           max_steps=max_steps or max_new_tokens, train_embeddings=train_embeddings, prior=prior,
                           key=jax.random.key(seed))
    head, history = train_classifier(head, train_rows, config, batch_size, eval_rows)
    losses = [r["loss"] for r in history["train"]]
    report = {"attribute": attribute.name, "samples": len(sample_labels),
              "positive_samples": float(sample_labels.mean()), "train_rows": len(train_rows),
              "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
              "held_out": None if eval_rows is None else evaluate_classifier(head, eval_rows.rows(eval_rows.taken)),
              "held_out_eos": None if eval_rows is None or eval_rows.taken.all() else evaluate_classifier(
                  head, eval_rows.rows(~eval_rows.taken))}
    return head, report


# --- save and load ------------------------------------------------------------------------


def check_output_dir(directory: str, overwrite: bool = False) -> str:
    """The absolute path of `directory`; `ConfigError` if it holds files and `overwrite` is False.

    Example:
        >>> # check_output_dir("runs/len8")  # before a long training run that will save there
    """
    path = os.path.abspath(directory)
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"{str(directory)!r} exists and is not empty; choose a new directory or pass "
                          "overwrite=True (--overwrite)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{str(directory)!r} is a file; give a directory to save the classifier in")
    return path


def save_classifier(classifier: AttributeClassifier, directory: str, metadata: dict | None = None,
                    overwrite: bool = False):
    """Write the head (Orbax) and its config + `metadata` (JSON) into `directory`.

    Example:
        >>> # save_classifier(head, "runs/len8", metadata={"model": "default", "report": report})
    """
    path = check_output_dir(directory, overwrite)
    meta = {"kind": KIND, "format": FORMAT, "config": dataclasses.asdict(classifier.config),
            "metadata": json.loads(json.dumps(metadata or {}))}
    save_bundle(path, meta, weights=classifier.weights)


def read_classifier_metadata(directory: str) -> dict:
    """The JSON saved with a head: kind, format, config, metadata.

    Example:
        >>> # read_classifier_metadata("runs/len8")["config"]["attribute"]
    """
    meta = read_bundle_meta(directory, "attribute classifier", "save_classifier or makemost cbs-train")
    if meta.get("kind") != KIND or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory!r} is not an attribute classifier of format {FORMAT} "
                              f"(kind={meta.get('kind')!r}, format={meta.get('format')!r})")
    return meta


def load_classifier(directory: str, params: Params | None = None) -> AttributeClassifier:
    """Read a head written by `save_classifier`; with `params`, refuse one made for another model.

    A head saved with `train_embeddings=False` takes its table from `params`, which it
    then requires. `directory="default"` is the head bundled with the package for the
    embedded SmolLM2-135M-Instruct (attribute min-length:8; how it was made:
    makemost_jax/assets/README.md).

    Example:
        >>> # head = load_classifier("runs/len8", params=mm.load())
        >>> # head = load_classifier("default", params=mm.load())
    """
    if str(directory) == "default":
        directory = str(resources.files("makemost_jax.assets").joinpath(BUNDLED))
    config = ClassifierConfig(**read_classifier_metadata(directory)["config"])
    if params is not None:
        check_compatible(AttributeClassifier(config, {}), params)
    elif not config.train_embeddings:
        raise ConfigError(f"the classifier in {directory!r} uses the model's own embedding table; pass "
                          "params=<the model it was trained for> to load it")
    abstract = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in _shapes(config).items()}
    weights = restore_bundle(directory, weights=abstract)["weights"]
    return AttributeClassifier(config, weights, None if config.train_embeddings else _scaled_table(params))


# --- conditional beam search: the user surface ------------------------------------------

SEARCHES = ("greedy", "sample", "beam", "cbs", "exact")


def conditional_beam_search(params: Params, prompts, classifier: AttributeClassifier,
                            attribute: Attribute | None = None, *, beams: int = 4, max_new_tokens: int = 32,
                            eos_id: int, weight: float = 1.0, prefilter: int | None = None, **options):
    """Beam search for the mode of p(y | x, a): `beam_search` with the head as the term.

    `attribute` (default: the one the head was trained for, from its name) filters the
    finished hypotheses exactly; `options` go to `beam.beam_search` (pad_id, length_penalty,
    min_length, ...). Returns its `BeamResult`; a prompt with no accepted hypothesis has
    finished[b, 0] False.

    Example:
        >>> # head = load_classifier("runs/len8", params)
        >>> # out = conditional_beam_search(params, [tok.encode_for_model("The end.")], head, eos_id=tok.eos_id)
        >>> # tok.decode(out.tokens[0, 0, :out.lengths[0, 0]]), float(out.logprobs[0, 0])
    """
    check_compatible(classifier, params)
    if attribute is None:
        try:
            attribute = parse_attribute(classifier.config.attribute)
        except ConfigError as error:
            raise ConfigError(f"the classifier's attribute {classifier.config.attribute!r} is not a built-in one; "
                              f"pass attribute= (the labeller it was trained with): {error}") from None
    return beam_search(params, prompts, beams=beams, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       attribute=attribute, term=classifier, weight=weight, prefilter=prefilter, **options)


def _beam_rows(result, eos_id: int) -> list[dict]:
    tokens, lengths = np.asarray(result.tokens[:, 0]), np.asarray(result.lengths[:, 0])
    logprobs, found = np.asarray(result.logprobs[:, 0]), np.asarray(result.finished[:, 0])
    rows = []
    for row, n, logp, ok in zip(tokens, lengths, logprobs, found):
        at_eos = bool(ok and n < len(row) and row[n] == eos_id)
        rows.append({"tokens": row[:n].tolist() if ok else None, "logprob": float(logp) if ok else None,
                     "stopped_at_eos": at_eos, "found": bool(ok)})
    return rows


def search_text(params: Params, tokenizer, prompts: Sequence[str], *, search: str = "greedy",
                max_new_tokens: int = 32, beams: int = 4, classifier: AttributeClassifier | None = None,
                attribute: Attribute | None = None, weight: float = 1.0, prefilter: int | None = None,
                length_penalty: float = 0.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0, node_budget: int = 2000) -> list[dict]:
    """Continue each prompt string with one of `SEARCHES`; one dict per prompt.

    greedy / sample (`temperature`, `top_k`, `top_p`, `seed`): `sampling.generate_text`.
    beam: `beam_search` with `beams`, `length_penalty`, and `attribute` as an exact
    filter when given. cbs: `conditional_beam_search` with `classifier` (required),
    `attribute` (default the classifier's), `weight`, `prefilter`. exact: `exact_mode`,
    the unconditional mode of outputs up to `max_new_tokens` tokens within
    `node_budget` expansions. Each dict: prompt, completion (the new text, EOS
    dropped; None when the search found no output), n_new_tokens (EOS counted),
    logprob (log p of the output, EOS included when emitted), stopped_at_eos, search,
    and found (beam, cbs, exact) / proved_optimal (exact).

    Example:
        >>> # search_text(params, tok, ["The end."], search="cbs", classifier=head)[0]["completion"]
    """
    if search not in SEARCHES:
        raise ConfigError(f"search={search!r}; use one of {SEARCHES}")
    if (classifier is not None) != (search == "cbs"):
        raise ConfigError("search='cbs' needs a classifier (--classifier DIR) and the other searches take none")
    if attribute is not None and search not in ("beam", "cbs"):
        raise ConfigError(f"an attribute applies to search 'beam' or 'cbs', not {search!r}")
    if search in ("greedy", "sample"):
        rows = generate_text(params, tokenizer, prompts, max_new_tokens,
                             temperature=0.0 if search == "greedy" else temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        return [{**r, "search": search} for r in rows]
    eos = tokenizer.eos_id
    if eos is None:
        raise ConfigError(f"search={search!r} scores outputs that end in EOS, and this tokenizer has no EOS token")
    ids = []
    for i, prompt in enumerate(prompts):
        ids.append(tokenizer.encode_for_model(prompt))
        if not ids[-1]:
            raise InputError(f"prompt {i + 1} is empty; give some text to continue")
    if search == "exact":
        rows = []
        for prompt_ids in ids:
            mode = exact_mode(params, prompt_ids, eos_id=eos, max_length=max_new_tokens, node_budget=node_budget)
            found = mode.tokens is not None
            rows.append({"tokens": list(mode.tokens) if found else None, "logprob": mode.loglik if found else None,
                         "stopped_at_eos": found and mode.ends_with_eos, "found": found,
                         "proved_optimal": mode.proved_optimal})
    else:
        options = {"beams": beams, "max_new_tokens": max_new_tokens, "eos_id": eos, "pad_id": tokenizer.pad_id,
                   "length_penalty": length_penalty}
        if search == "beam":
            result = beam_search(params, ids, attribute=attribute, **options)
        else:
            result = conditional_beam_search(params, ids, classifier, attribute, weight=weight, prefilter=prefilter,
                                             **options)
        rows = _beam_rows(result, eos)
    out = []
    for prompt, row in zip(prompts, rows):
        tokens = row.pop("tokens")
        out.append({"prompt": prompt, "completion": None if tokens is None else tokenizer.decode(tokens),
                    "n_new_tokens": 0 if tokens is None else len(tokens) + row["stopped_at_eos"], **row,
                    "search": search})
    return out
